r"""Tabular data: bundled scikit-learn sets, user files and the MAF benchmark layout.

Every table goes through the same steps, for the trainer, the CLI, :class:`cnf.CNFDensity` and the
baselines of ``bench/bench_tabular.py`` alike:

1. **Column selection** (``columns="a,b,3"``: names or 0-based indices).
2. **Rows with NaN or inf**: an error naming the rows, or, with ``drop_nan=True``, dropped with a
   logged warning.
3. **A seeded split** into train / validation / test (fractions configurable; the MAF sets keep
   the MAF paper's fixed split).
4. **Degenerate columns**, decided on the training split: a constant column, or one that exactly
   repeats an earlier column, has no density (a point mass, or mass on a hyperplane), so a flow's
   likelihood would grow without bound on it. Such columns are dropped with a logged warning that
   names them; ``meta()`` records them.
5. **Dequantization** (``dequantize=True``): the columns whose training values are all integers get
   uniform noise :math:`u \sim U[0, 1)^k` added, fresh for every training batch and fixed (seeded)
   for validation and test. The NLL reported is then that of the dequantized density, and by
   Jensen's inequality :math:`\mathbb{E}_u[\log p(x + u)] \le \log P(x)`: it is an upper bound on
   the discrete negative log-likelihood (Theis et al., arXiv:1511.01844; Uria et al.,
   arXiv:1306.0186).
6. **Refusals**: a training split with no more rows than (kept) columns, whose fitted density
   would be degenerate (:func:`check_rows`); before training, values too large or training
   spreads too small for the model's dtype (:meth:`TabularData.check_range`: magnitudes above
   1e30, standard deviations below 1e-30 in float32, 1e150 and 1e-150 in float64, or a spread
   that rounding to the dtype would erase beside large values). Each error names the columns and
   the fix.

Standardization is not done here: the model holds it as a fixed affine layer
(:class:`cnf.tabular.Normalizer`) so that densities stay in the original units of the data.

The MAF benchmark sets (Papamakarios et al., "Masked Autoregressive Flow for Density Estimation",
NeurIPS 2017, arXiv:1705.07057) are read from a directory laid out like the MAF/FFJORD data
download (``power/data.npy``, ``gas/ethylene_CO.pickle``, ``hepmass/1000_train.csv`` and
``1000_test.csv``, ``miniboone/data.npy``, ``BSDS300/BSDS300.hdf5``) and preprocessed exactly as
the MAF code does. GAS needs pandas and BSDS300 needs h5py (``pip install "cnf[maf]"``); reading
GAS unpickles a pandas pickle, which can execute code: only read a file you trust.
"""

from __future__ import annotations

import csv
import logging
import math
import pickle
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cnf.data.base import DatasetInfo, content_hash, register

logger = logging.getLogger("cnf")

FILE_SUFFIXES = (".csv", ".npy", ".npz")
# what numpy raises on a .npy/.npz file that is truncated, corrupt, pickled or absurdly large
LOAD_ERRORS = (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error, MemoryError)
MAF_FIX = "download the MAF/FFJORD data again and extract it"
_MISSING = {"", "na", "nan", "null", "none", "?"}


# --- tables and cleaning ----------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """A 2-D array with column names (float64 once converted; CSV text before)."""

    values: np.ndarray
    columns: tuple[str, ...]


def select_columns(table: Table, spec: str | Sequence[str | int] | None, source: str) -> Table:
    """The columns named in ``spec`` (a comma list of names or 0-based indices), in that order."""
    if spec is None or spec == "" or (not isinstance(spec, str) and len(spec) == 0):
        return table
    tokens = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else list(spec)
    index = {name: i for i, name in enumerate(table.columns)}
    picked = [_column_index(t, index, len(table.columns), source) for t in tokens]
    if len(set(picked)) != len(picked):
        raise ValueError(f"columns {spec!r} names a column twice; name each column once")
    return Table(table.values[:, picked], tuple(table.columns[i] for i in picked))


def _column_index(token: str | int, index: dict[str, int], width: int, source: str) -> int:
    if isinstance(token, str) and token in index:
        return index[token]
    try:
        i = int(token)
    except (TypeError, ValueError):
        i = None
    if i is None or not 0 <= i < width:
        shown = ", ".join(list(index)[:20]) + (", ..." if width > 20 else "")
        raise ValueError(
            f"unknown column {token!r} in {source}: it has {width} columns ({shown}); give names "
            f"or indices 0..{width - 1}"
        )
    return i


def to_float(table: Table, source: str) -> Table:
    """Convert (CSV text) to float64; missing markers (empty, NA, nan, ?) become NaN."""
    if table.values.dtype.kind in "fiub":
        return Table(table.values.astype(np.float64), table.columns)
    out = np.empty(table.values.shape, dtype=np.float64)
    for j, name in enumerate(table.columns):
        for i, text in enumerate(table.values[:, j]):
            text = str(text).strip()
            try:
                out[i, j] = math.nan if text.lower() in _MISSING else float(text)
            except ValueError:
                raise ValueError(
                    f"non-numeric value {text!r} in column {name!r}, data row {i} of {source}: "
                    "cnf models numeric columns; choose them with --columns"
                ) from None
    return Table(out, table.columns)


def drop_nan_rows(x: np.ndarray, *, drop: bool, source: str) -> np.ndarray:
    """Rows with NaN or inf: a ``ValueError`` naming them, or dropped (logged) with ``drop``."""
    bad = ~np.isfinite(x).all(1)
    if not bad.any():
        return x
    rows = np.flatnonzero(bad)
    shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
    if not drop:
        raise ValueError(
            f"{source} has NaN or inf values in {len(rows)} rows (data rows {shown}): impute "
            "them, or pass --drop-nan (drop_nan=True) to drop those rows"
        )
    logger.warning("%s: dropped %d rows with NaN or inf values (data rows %s)", source, len(rows),
                   shown)  # fmt: skip
    return x[~bad]


@dataclass(frozen=True)
class ColumnPlan:
    """Which columns of a table carry a density, decided on training data.

    A constant column (a point mass) and a column that exactly repeats an earlier one (mass on a
    hyperplane) have no density, so they are dropped; :meth:`restore` puts them back into samples
    (the constant, or a copy of the column repeated).

    Attributes:
        keep: indices of the kept columns.
        constant: ``(index, value)`` of each constant column.
        duplicate: ``(index, index of the column it repeats)``.
    """

    width: int
    keep: tuple[int, ...]
    constant: tuple[tuple[int, float], ...] = ()
    duplicate: tuple[tuple[int, int], ...] = ()

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        columns: Sequence[str],
        source: str = "data",
        note: Callable[[str], None] = logger.warning,
    ) -> ColumnPlan:
        """Find constant and duplicated columns of ``x``; ``note`` a warning that names them."""
        constant = [(j, float(x[0, j])) for j in range(x.shape[1]) if (x[:, j] == x[0, j]).all()]
        seen: dict[bytes, int] = {}
        duplicate = []
        for j in range(x.shape[1]):
            key = np.ascontiguousarray(x[:, j]).tobytes()
            if j in dict(constant):
                continue
            if key in seen:
                duplicate.append((j, seen[key]))
            else:
                seen[key] = j
        keep = tuple(sorted(seen.values()))
        if not keep:
            raise ValueError(
                f"every column of {source} is constant on the training data: there is no density "
                f"to fit (got {x.shape[0]} training rows)"
            )
        plan = cls(x.shape[1], keep, tuple(constant), tuple(duplicate))
        plan._note(columns, source, note)
        return plan

    def _note(self, columns: Sequence[str], source: str, note: Callable[[str], None]) -> None:
        if self.constant:
            names = [columns[j] for j, _ in self.constant]
            note(f"{source}: dropped {len(names)} constant columns (no density): "
                 f"{', '.join(names)}")  # fmt: skip
        if self.duplicate:
            pairs = [f"{columns[j]}={columns[k]}" for j, k in self.duplicate]
            note(f"{source}: dropped {len(pairs)} columns that repeat another exactly: "
                 f"{', '.join(pairs)}")  # fmt: skip

    def dropped(self, columns: Sequence[str]) -> list[str]:
        return [columns[j] for j in range(self.width) if j not in self.keep]

    def to_meta(self) -> dict[str, Any]:
        """Plain data for a checkpoint's dataset description (see :meth:`from_meta`)."""
        return {"width": self.width, "keep": list(self.keep),
                "constant": [list(c) for c in self.constant],
                "duplicate": [list(d) for d in self.duplicate]}  # fmt: skip

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ColumnPlan:
        return cls(int(meta["width"]), tuple(int(j) for j in meta["keep"]),
                   tuple((int(j), float(v)) for j, v in meta["constant"]),
                   tuple((int(j), int(k)) for j, k in meta["duplicate"]))  # fmt: skip

    def apply(self, x: np.ndarray) -> np.ndarray:
        return x[:, list(self.keep)]

    def restore(self, kept: np.ndarray) -> np.ndarray:
        """Full-width rows from kept columns: constants filled in, duplicates copied."""
        out = np.empty((len(kept), self.width), dtype=kept.dtype)
        out[:, list(self.keep)] = kept
        for j, value in self.constant:
            out[:, j] = value
        for j, k in self.duplicate:
            out[:, j] = out[:, k]
        return out


def integer_columns(x: np.ndarray) -> np.ndarray:
    """Boolean mask of the columns whose values are all integers."""
    return (x == np.round(x)).all(0)


def dequantize(x: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``x`` with uniform noise in ``[0, 1)`` added to the columns in ``mask``."""
    if not mask.any():
        return x
    out = x.copy()
    out[:, mask] += rng.random((len(x), int(mask.sum())))
    return out


def split_indices(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded random partition of ``range(n)`` into train, validation and test indices."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < f < 1:
            raise ValueError(f"{name} must be in (0, 1), got {f!r}")
    n_val, n_test = max(1, round(val_fraction * n)), max(1, round(test_fraction * n))
    if n - n_val - n_test < 2:
        raise ValueError(
            f"{n} rows leave {n - n_val - n_test} for training with val_fraction={val_fraction} "
            f"and test_fraction={test_fraction}: lower the fractions or use more data"
        )
    order = np.random.default_rng([seed, 7]).permutation(n)
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


# --- the dataset ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    """Train, validation and test rows (float64; test may be empty for an estimator's fit)."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


class TabularData:
    """A table as a dataset for the trainer: epochs of seeded batches, fixed validation and test.

    Arguments:
        name: the name that reloads it (a registry name or an absolute path).
        splits: the rows, already cleaned (see the module docstring).
        columns: the names of the columns.
        seed: the run's seed; batch order and dequantization noise are functions of it.
        dequantize: add ``U[0, 1)`` noise to the integer-valued columns (see the module doc).
        info: JSON-able facts stored in :meth:`meta` (source, dropped columns, ...).
        note: where the warning about integer columns goes (the ``cnf`` logger by default),
            and ``dequantize_hint`` how it tells to dequantize.
    """

    kind = "tabular"
    entropy = None  # unknown: a sample from an unknown density
    support = None

    def __init__(
        self,
        name: str,
        splits: Splits,
        columns: Sequence[str],
        *,
        seed: int = 0,
        dequantize: bool = False,
        info: dict[str, Any] | None = None,
        note: Callable[[str], None] = logger.warning,
        dequantize_hint: str = "--dequantize",
    ) -> None:
        check_rows(name, splits.train)
        self.name, self.splits, self.columns = name, splits, tuple(columns)
        self.seed, self.info = seed, dict(info or {})
        self.event_shape = (splits.train.shape[1],)
        self._orders: dict[int, np.ndarray] = {}
        integer = integer_columns(splits.train)
        self.integer = integer if dequantize else np.zeros_like(integer)
        if integer.any() and not dequantize:
            names = [c for c, i in zip(self.columns, integer, strict=True) if i][:10]
            note(f"{name}: columns {', '.join(names)} take only integer values, on which a "
                 f"continuous density is degenerate; consider {dequantize_hint}")  # fmt: skip

    def _noisy(self, x: np.ndarray, *stream: int) -> np.ndarray:
        return dequantize(x, self.integer, np.random.default_rng([self.seed, *stream]))

    def train_batch(self, batch_size: int, iteration: int) -> np.ndarray:
        """Rows ``(iteration - 1) * batch_size ...`` of an endless sequence of seeded epochs
        (each a permutation of the training rows), freshly dequantized."""
        n = len(self.splits.train)
        start = (iteration - 1) * batch_size
        first, last = start // n, (start + batch_size - 1) // n
        order = np.concatenate([self._epoch(e) for e in range(first, last + 1)])
        rows = order[start - first * n : start - first * n + batch_size]
        return self._noisy(self.splits.train[rows], 1, iteration)

    def _epoch(self, epoch: int) -> np.ndarray:
        """The order of the training rows in ``epoch`` (the last two are cached: large sets)."""
        if epoch not in self._orders:
            n = len(self.splits.train)
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = np.random.default_rng([self.seed, 0, epoch]).permutation(n)
        return self._orders[epoch]

    def train_data(self) -> np.ndarray:
        """The whole training split, dequantized once (fits the model's standardization)."""
        return self._train_data

    @cached_property
    def _train_data(self) -> np.ndarray:
        return self._noisy(self.splits.train, 4)

    @cached_property
    def _validation(self) -> np.ndarray:
        return self._noisy(self.splits.validation, 2)

    @cached_property
    def _test(self) -> np.ndarray:
        return self._noisy(self.splits.test, 3)

    def validation(self) -> np.ndarray:
        return self._validation

    def test(self, n: int | None = None) -> np.ndarray:
        """The test split (its first ``n`` rows if ``n`` is given)."""
        return self._test if n is None else self._test[:n]

    def fingerprint(self) -> str:
        """A hash of the training and validation rows (after column selection and cleaning), the
        column names and the dequantized columns: a resume refuses data that changed."""
        return content_hash(self.name, list(self.columns), self.splits.train,
                            self.splits.validation, self.integer)  # fmt: skip

    def to(self, device: Any) -> TabularData:
        return self  # batches are numpy arrays, moved by the trainer

    def check_range(self, dtype: str) -> None:
        """Refuse values that training in ``dtype`` cannot represent: magnitudes so large that
        their squares (the covariance of the standardization) or the cast to float32 would
        overflow, and training spreads so small that standardizing divides by an underflowed
        standard deviation, or that the cast to ``dtype`` rounds the column to a few values."""
        parts = [p for p in vars(self.splits).values() if len(p)]
        peak = np.max([np.abs(p).max(0) for p in parts], axis=0)
        self._check_peak(peak, dtype)
        self._check_spread(column_spread(self.splits.train), peak, dtype)

    def _check_peak(self, peak: np.ndarray, dtype: str) -> None:
        limit = RANGE_LIMIT[dtype]
        if (peak <= limit).all():
            return
        j = int(np.argmax(peak))
        hint = " or train with --dtype float64" if dtype == "float32" and peak[j] < 1e150 else ""
        raise ValueError(
            f"{self.name}: column {self.columns[j]!r} has values up to {peak[j]:.3g} in "
            f"magnitude, too large for {dtype} densities (at most {limit:.0e}): rescale the "
            f"column (divide it by a power of ten, or take its log){hint}"
        )

    def _check_spread(self, std: np.ndarray, peak: np.ndarray, dtype: str) -> None:
        tiny, coarse = _too_narrow(std, peak, dtype)
        bad = tiny if tiny.any() else coarse
        if not bad.any():
            return
        wide64 = not any(m[bad].any() for m in _too_narrow(std, peak, "float64"))
        hint = " or train with --dtype float64" if dtype == "float32" and wide64 else ""
        if tiny.any():
            raise ValueError(
                f"{self.name}: {self._listed(tiny, std)} on the training rows, below the "
                f"{SPREAD_FLOOR[dtype]:.0e} that {dtype} densities need (standardizing divides "
                f"by it): rescale (multiply by a power of ten){hint}, or drop the column"
            )
        raise ValueError(
            f"{self.name}: {self._listed(coarse, std)} on the training rows, too small beside "
            f"values up to {peak[coarse].max():.3g} in magnitude: {dtype} would round them to "
            f"a few values; subtract an offset (such as the mean){hint}, or drop the column"
        )

    def _listed(self, mask: np.ndarray, std: np.ndarray) -> str:
        picked = np.flatnonzero(mask)[:10]
        names = ", ".join(repr(self.columns[j]) for j in picked)
        values = ", ".join(f"{std[j]:.3g}" for j in picked)
        if mask.sum() == 1:
            return f"column {names} has a standard deviation of {values}"
        more = ", ..." if mask.sum() > 10 else ""
        return f"columns {names}{more} have standard deviations of {values}{more}"

    def meta(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "event_shape": list(self.event_shape),
            "columns": list(self.columns),
            "rows": [len(self.splits.train), len(self.splits.validation), len(self.splits.test)],
            "dequantized": [c for c, i in zip(self.columns, self.integer, strict=True) if i],
            **self.info,
        }  # fmt: skip


# the largest magnitude a value may have, per training dtype: float32 leaves room for the
# normalizer's arithmetic, float64 for squaring in the covariance
RANGE_LIMIT = {"float32": 1e30, "float64": 1e150}
# the smallest training standard deviation a column may have, the mirror image: standardizing
# multiplies by its inverse (at most RANGE_LIMIT), whitening squares it (no underflow)
SPREAD_FLOOR = {"float32": 1e-30, "float64": 1e-150}
# a column's standard deviation must span this many steps of the dtype's resolution at its
# largest value, or the cast to the dtype leaves only a few distinct values
RESOLUTION = 16


def column_spread(x: np.ndarray) -> np.ndarray:
    """Standard deviations of the columns of ``x``, computed on the columns divided by their
    largest magnitude: the squares of values near 1e-300 would underflow to zero."""
    scale = np.abs(x).max(0)
    scale = np.where(scale > 0, scale, 1.0)
    return (x / scale).std(0) * scale


def _too_narrow(std: np.ndarray, peak: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the columns whose spread is below ``dtype``'s floor, and of those whose spread
    is too fine for its resolution at the column's largest value."""
    return std < SPREAD_FLOOR[dtype], std < RESOLUTION * np.finfo(dtype).eps * peak


def check_rows(name: str, train: np.ndarray) -> None:
    """Refuse a training split with no more rows than columns: ``n <= d`` rows lie on a
    hyperplane, their covariance is singular, and the fitted log-density grows without bound."""
    n, dim = train.shape
    if n <= dim:
        raise ValueError(
            f"{name}: the training split has {n} rows for {dim} columns, so the fitted density "
            f"would be degenerate (rows on a hyperplane, a singular covariance): give at least "
            f"{dim + 1} training rows, or fewer columns (--columns on the command line, a "
            "narrower X in Python)"
        )


# the options of every table, with their defaults (a config records only the changed ones)
TABLE_DEFAULTS: dict[str, Any] = {"columns": "", "val_fraction": 0.1, "test_fraction": 0.1,
                                  "dequantize": False, "drop_nan": False}  # fmt: skip
TABLE_OPTIONS = tuple(TABLE_DEFAULTS)


def from_table(
    table: Table,
    name: str,
    *,
    seed: int = 0,
    columns: str | Sequence[str | int] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    dequantize: bool = False,
    drop_nan: bool = False,
    info: dict[str, Any] | None = None,
) -> TabularData:
    """Select, clean and split a table into a :class:`TabularData` (steps 1-5 of the module)."""
    table = to_float(select_columns(table, columns, name), name)
    x = drop_nan_rows(table.values, drop=drop_nan, source=name)
    train, val, test = split_indices(len(x), val_fraction, test_fraction, seed)
    plan = ColumnPlan.fit(x[train], table.columns, name)
    splits = Splits(*(plan.apply(x[i]) for i in (train, val, test)))
    kept = [table.columns[j] for j in plan.keep]
    info = {**(info or {}), "dropped": plan.dropped(table.columns),
            "all_columns": list(table.columns), "plan": plan.to_meta()}  # fmt: skip
    return TabularData(name, splits, kept, seed=seed, dequantize=dequantize, info=info)


# --- sources: bundled, files, MAF -------------------------------------------------------------


def _sklearn_table(name: str) -> Table:
    from sklearn import datasets

    if name == "diabetes":
        bunch = datasets.load_diabetes(scaled=False)  # original units, not sklearn's scaling
    else:
        loaders = {"breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine,
                   "iris": datasets.load_iris, "digits-tabular": datasets.load_digits}  # fmt: skip
        bunch = loaders[name]()
    return Table(np.asarray(bunch.data, dtype=np.float64), tuple(map(str, bunch.feature_names)))


BUNDLED = {
    "breast_cancer": (30, "scikit-learn breast cancer (569 rows)"),
    "wine": (13, "scikit-learn wine (178 rows)"),
    "iris": (4, "scikit-learn iris (150 rows)"),
    "diabetes": (10, "scikit-learn diabetes, original units (442 rows)"),
    "digits-tabular": (64, "scikit-learn digits as 64 columns (1797 rows; --dequantize)"),
}


def bundled(name: str, *, seed: int = 0, **options: Any) -> TabularData:
    """One of the scikit-learn sets shipped with scikit-learn (no download)."""
    return from_table(_sklearn_table(name), name, seed=seed, info={"source": "sklearn"}, **options)


def read_table(path: Path, key: str | None = None) -> Table:
    """Read ``.csv`` (header detected: a first row that is not all numbers), ``.npy`` or ``.npz``
    (one array, or ``key``) into a :class:`Table`; headerless columns are named ``x0, x1, ...``."""
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(f"cannot read {path}: expected a {', '.join(FILE_SUFFIXES)} file")
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    if suffix == ".csv":
        return _read_csv(path)
    return _named(load_array(path, key, "save it with np.save of a float array, or as .csv"), path)


def load_array(path: Path, key: str | None = None, fix: str = "save it again") -> np.ndarray:
    """The array of a ``.npy`` file, or one of a ``.npz`` file (``key``, needed when it holds
    several), never unpickled; whatever fails, a ``ValueError`` that names the file and ``fix``."""
    try:  # never with allow_pickle: an object array would unpickle, and so could run code
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as archive:
            return _member(archive, key, path)
    except LOAD_ERRORS as err:
        if str(err).startswith(str(path)):
            raise
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"{path} is not a numeric {path.suffix} array numpy can read without unpickling, "
            f"or is truncated or corrupt ({detail}): {fix}"
        ) from err


def _member(archive: Any, key: str | None, path: Path) -> np.ndarray:
    keys = list(archive.keys())
    if key is None and len(keys) != 1:
        raise ValueError(f"{path} holds arrays {keys}: choose one with --data {path}:NAME")
    if key is not None and key not in keys:
        raise ValueError(f"{path} has no array {key!r}; it holds {keys}")
    return archive[key or keys[0]]


def _named(array: np.ndarray, path: Path) -> Table:
    if array.ndim != 2 or array.dtype.kind not in "fiub":
        raise ValueError(
            f"{path}: expected a 2-D numeric array (rows x columns), got shape {array.shape} of "
            f"dtype {array.dtype}"
        )
    return Table(array, tuple(f"x{i}" for i in range(array.shape[1])))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text.strip().lower() in _MISSING - {""}
    return True


def _read_csv(path: Path) -> Table:
    """A CSV file as a :class:`Table`; text that is not CSV (binary, a field beyond the csv
    module's limit) is a ``ValueError`` naming the file."""
    try:
        return _parse_csv(path)
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(
            f"{path} is not a CSV text file, or is corrupt ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}): save it as UTF-8 text of "
            "comma-separated numbers, or as .npy"
        ) from err


def _parse_csv(path: Path) -> Table:
    with open(path, newline="") as f:
        first = next((r for r in csv.reader(f) if any(c.strip() for c in r)), None)
    if first is None:
        raise ValueError(f"{path} is empty")
    header = not all(_is_number(c) for c in first)
    columns = (
        tuple(c.strip() for c in first) if header else tuple(f"x{i}" for i in range(len(first)))
    )
    try:  # numpy's C parser for all-numeric files (MAF's HEPMASS has millions of rows)
        with warnings.catch_warnings():  # "input contained no data": our own error says it
            warnings.simplefilter("ignore")
            values = np.loadtxt(path, delimiter=",", skiprows=int(header), ndmin=2, comments=None)
        if values.shape[1] == len(columns) and len(values):
            return Table(values, columns)
    except ValueError:
        pass
    return _read_csv_text(path, header, columns)


def _read_csv_text(path: Path, header: bool, columns: tuple[str, ...]) -> Table:
    """The slow path: text cells (converted after column selection) and missing values."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    body = rows[1:] if header else rows
    for i, row in enumerate(body):
        if len(row) != len(columns):
            raise ValueError(
                f"{path}: line {i + 1 + header} has {len(row)} fields, expected {len(columns)}"
            )
    if not body:
        raise ValueError(f"{path} has a header but no data rows")
    return Table(np.array(body, dtype=object), columns)


def from_file(
    name: str, *, seed: int = 0, trust_pickle: bool = False, **options: Any
) -> TabularData:
    """A user's ``.csv``/``.npy``/``.npz`` file (``file.npz:key`` picks an array), or a MAF
    dataset directory (``trust_pickle``: see :func:`maf`)."""
    text, key = name, None
    if ".npz:" in name:
        text, key = name.rsplit(":", 1)
    path = Path(text).expanduser().resolve()
    if path.is_dir():
        return maf(path, seed=seed, trust_pickle=trust_pickle, **options)
    table = read_table(path, key)
    full = f"{path}:{key}" if key else str(path)
    return from_table(table, full, seed=seed, info={"source": "file"}, **options)


def looks_like_path(name: str) -> bool:
    """Whether ``get_dataset`` should treat ``name`` as a file or directory."""
    base = name.split(".npz:")[0] if ".npz:" in name else name
    return Path(base).expanduser().exists() or base.lower().endswith(FILE_SUFFIXES) or "/" in base


# --- the MAF benchmark layout -----------------------------------------------------------------


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
    table = _read_csv(path)
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


for _name, (_dim, _note) in BUNDLED.items():
    register(
        DatasetInfo(_name, "tabular", _dim, False, _note, TABLE_OPTIONS),
        lambda seed=0, _n=_name, **kw: bundled(_n, seed=seed, **kw),
    )
