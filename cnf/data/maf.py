"""The MAF benchmark sets (Papamakarios et al., "Masked Autoregressive Flow for Density
Estimation", NeurIPS 2017, arXiv:1705.07057), read from a directory laid out like the MAF/FFJORD
data download and preprocessed exactly as the MAF code does (see :mod:`cnf.data.tabular`)."""

from __future__ import annotations

import pickle
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnf.data.columns import ColumnPlan, Table, drop_nan_rows, select_columns, to_float
from cnf.data.files import load_array, read_csv
from cnf.data.tabular import Splits, TabularData

MAF_FIX = "download the MAF/FFJORD data again and extract it"


def _need(path: Path, layout: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"expected {path} (the MAF data layout: {layout}); download the MAF/FFJORD data or "
            "point --data at the directory holding it"
        )
    return path


def _last_tenth(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MAF's split: the last ``int(0.1 n)`` rows are held out."""
    k = int(0.1 * len(x))
    return x[:-k], x[-k:]


def _power(root: Path) -> Splits:
    data = load_array(_need(root / "data.npy", "power/data.npy"), fix=MAF_FIX)
    rng = np.random.RandomState(42)  # MAF's fixed shuffle and noise
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(np.delete(data, 3, axis=1), 1, axis=1)
    voltage, gap, sm = 0.01 * rng.rand(n, 1), 0.001 * rng.rand(n, 1), rng.rand(n, 3)
    data = data + np.hstack((gap, voltage, sm, np.zeros((n, 1))))
    rest, test = _last_tenth(data)
    train, val = _last_tenth(rest)
    return _normalize_train_val(train, val, test)


def _normalize_train_val(train: np.ndarray, val: np.ndarray, test: np.ndarray) -> Splits:
    both = np.vstack((train, val))
    mu, s = both.mean(0), both.std(0)
    return Splits((train - mu) / s, (val - mu) / s, (test - mu) / s)


def _miniboone(root: Path) -> Splits:
    data = load_array(_need(root / "data.npy", "miniboone/data.npy"), fix=MAF_FIX)
    rest, test = _last_tenth(data)
    train, val = _last_tenth(rest)
    return _normalize_train_val(train, val, test)


def _hepmass(root: Path) -> Splits:
    layout = "hepmass/1000_train.csv and hepmass/1000_test.csv"
    train = _hepmass_csv(_need(root / "1000_train.csv", layout))
    test = _hepmass_csv(_need(root / "1000_test.csv", layout))
    train = train[train[:, 0] == 1][:, 1:]  # the signal class only, label dropped
    test = test[test[:, 0] == 1][:, 1:-1]  # MAF also drops the test file's last column
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"{root}: train has {train.shape[1]} features, test {test.shape[1]}")
    mu, s = train.mean(0), train.std(0, ddof=1)  # pandas' std
    train, test = (train - mu) / s, (test - mu) / s
    # MAF drops features whose smallest value recurs more than 5 times (discrete features)
    keep = [j for j in range(train.shape[1]) if Counter(train[:, j])[train[:, j].min()] <= 5]
    train, test = train[:, keep], test[:, keep]
    train, val = _last_tenth(train)
    return Splits(train, val, test)


def _hepmass_csv(path: Path) -> np.ndarray:
    table = read_csv(path)
    return to_float(Table(table.values, table.columns), str(path)).values


def _gas(root: Path) -> Splits:
    path = _need(root / "ethylene_CO.pickle", "gas/ethylene_CO.pickle")
    pd = _optional("pandas", "GAS")
    try:
        data = pd.read_pickle(path).drop(columns=["Meth", "Eth", "Time"])
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, LookupError,
            OSError, zlib.error) as err:  # fmt: skip
        raise ValueError(_unreadable(path, err)) from err

    def correlated(frame: Any) -> np.ndarray:
        return (frame.corr() > 0.98).to_numpy().sum(1)

    counts = correlated(data)
    while np.any(counts > 1):  # drop the first column correlated > 0.98 with another, repeat
        data = data.drop(columns=data.columns[np.flatnonzero(counts > 1)[0]])
        counts = correlated(data)
    data = ((data - data.mean()) / data.std()).to_numpy(dtype=np.float64)
    rest, test = _last_tenth(data)
    train, val = _last_tenth(rest)
    return Splits(train, val, test)


def _bsds300(root: Path) -> Splits:
    path = _need(root / "BSDS300.hdf5", "BSDS300/BSDS300.hdf5")
    h5py = _optional("h5py", "BSDS300")
    try:
        with h5py.File(path, "r") as f:
            parts = [np.asarray(f[k], dtype=np.float64) for k in ("train", "validation", "test")]
    except (OSError, KeyError, ValueError, TypeError) as err:  # h5py's errors for a bad file
        raise ValueError(_unreadable(path, err)) from err
    return Splits(*parts)


def _unreadable(path: Path, err: BaseException) -> str:
    detail = (str(err).strip().splitlines() or [""])[0]
    return f"{path} is truncated or corrupt ({type(err).__name__}: {detail}): {MAF_FIX}"


def _optional(module: str, dataset: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(
            f"reading {dataset} needs {module}, which cnf does not install by default: "
            f'pip install {module} (or pip install "cnf[maf]")'
        ) from None


MAF = {"power": _power, "gas": _gas, "hepmass": _hepmass, "miniboone": _miniboone,
       "bsds300": _bsds300}  # fmt: skip


def maf(
    root: str | Path,
    *,
    seed: int = 0,
    columns: str | Sequence[str | int] | None = None,
    dequantize: bool = False,
    drop_nan: bool = False,
    trust_pickle: bool = False,
    **fractions: float,
) -> TabularData:
    """A MAF benchmark set from its directory (named power, gas, hepmass, miniboone or BSDS300),
    with the MAF paper's preprocessing and fixed split. GAS is a pandas pickle, which can run
    code when read: it is read only with ``trust_pickle=True``."""
    root = Path(root).expanduser().resolve()
    loader = MAF.get(root.name.lower())
    if loader is None:
        raise ValueError(
            f"{root} is not a MAF dataset directory: expected one named {', '.join(MAF)} "
            "(BSDS300 in any case), as in the MAF/FFJORD data download"
        )
    if fractions:
        raise ValueError(f"{root.name} keeps the MAF paper's fixed split: drop {sorted(fractions)}")
    pickled = root / "ethylene_CO.pickle"
    if loader is _gas and not trust_pickle and pickled.exists():  # before anything is read
        raise PermissionError(
            f"reading GAS unpickles {pickled}, and unpickling can run any "
            "code: pass --trust-pickle (trust_pickle=True) if you trust this file"
        )
    raw = loader(root)
    names = tuple(f"x{i}" for i in range(raw.train.shape[1]))
    selected = [select_columns(Table(x, names), columns, str(root)) for x in vars(raw).values()]
    x = [drop_nan_rows(t.values, drop=drop_nan, source=str(root)) for t in selected]
    plan = ColumnPlan.fit(x[0], selected[0].columns, str(root))
    splits = Splits(*(plan.apply(part) for part in x))
    kept = [selected[0].columns[j] for j in plan.keep]
    info = {"source": f"maf-{root.name.lower()}", "dropped": plan.dropped(selected[0].columns),
            "all_columns": list(selected[0].columns), "plan": plan.to_meta()}  # fmt: skip
    return TabularData(str(root), splits, kept, seed=seed, dequantize=dequantize, info=info)
