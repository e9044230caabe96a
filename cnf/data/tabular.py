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
(:class:`cnf.table_flow.Normalizer`) so that densities stay in the original units of the data.

The MAF benchmark sets (Papamakarios et al., "Masked Autoregressive Flow for Density Estimation",
NeurIPS 2017, arXiv:1705.07057) are read from a directory laid out like the MAF/FFJORD data
download (``power/data.npy``, ``gas/ethylene_CO.pickle``, ``hepmass/1000_train.csv`` and
``1000_test.csv``, ``miniboone/data.npy``, ``BSDS300/BSDS300.hdf5``) and preprocessed exactly as
the MAF code does. GAS needs pandas and BSDS300 needs h5py (``pip install "cnf[maf]"``); reading
GAS unpickles a pandas pickle, which can execute code: only read a file you trust.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from cnf.data.base import DatasetInfo, content_hash, register
from cnf.data.columns import (
    ColumnPlan,
    Table,
    check_range,
    check_rows,
    dequantize,
    drop_nan_rows,
    integer_columns,
    select_columns,
    to_float,
    warn_integer,
)

logger = logging.getLogger("cnf")


# --- tables and cleaning ----------------------------------------------------------------------


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
        if not dequantize:
            warn_integer(name, self.columns, integer, note, dequantize_hint)

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
        """Refuse values that training in ``dtype`` cannot represent
        (:func:`~cnf.data.columns.check_range`)."""
        check_range(self.name, self.columns, self.splits, dtype)

    def meta(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "event_shape": list(self.event_shape),
            "columns": list(self.columns),
            "rows": [len(self.splits.train), len(self.splits.validation), len(self.splits.test)],
            "dequantized": [c for c, i in zip(self.columns, self.integer, strict=True) if i],
            **self.info,
        }  # fmt: skip


# the options of every table, with their defaults (a config records only the changed ones)
TABLE_DEFAULTS: dict[str, Any] = {"columns": "", "val_fraction": 0.1, "test_fraction": 0.1,
                                  "dequantize": False, "drop_nan": False,
                                  "target": "", "condition": ""}  # fmt: skip
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
    target: str = "",
    condition: str = "",
) -> TabularData:
    """Select, clean and split a table into a :class:`TabularData` (steps 1-5 of the module);
    with ``target`` (columns), its pairs of those columns given the others, or with
    ``condition``, of the others given those
    (:class:`~cnf.data.conditional_table.ConditionalTable`)."""
    table = to_float(select_columns(table, columns, name), name)
    x = drop_nan_rows(table.values, drop=drop_nan, source=name)
    train, val, test = split_indices(len(x), val_fraction, test_fraction, seed)
    plan = ColumnPlan.fit(x[train], table.columns, name)
    splits = Splits(*(plan.apply(x[i]) for i in (train, val, test)))
    kept = [table.columns[j] for j in plan.keep]
    info = {**(info or {}), "dropped": plan.dropped(table.columns),
            "all_columns": list(table.columns), "plan": plan.to_meta()}  # fmt: skip
    if not (target or condition):
        return TabularData(name, splits, kept, seed=seed, dequantize=dequantize, info=info)
    # a conditional table warns of its modelled integer columns only
    data = TabularData(name, splits, kept, seed=seed, dequantize=dequantize, info=info,
                       note=lambda message: None)  # fmt: skip
    from cnf.data.conditional_table import ConditionalTable  # it builds on TabularData

    return ConditionalTable(data, target, condition)


# --- sources: bundled, files, MAF -------------------------------------------------------------


def _sklearn_table(name: str, with_target: bool = False) -> Table:
    """A bundled set's features; ``with_target``: and scikit-learn's target as a last column,
    ``target`` (a model of p(target | features) names it with ``--target target``, one of
    p(features | target) with ``--condition target``)."""
    from sklearn import datasets

    if name == "diabetes":
        bunch = datasets.load_diabetes(scaled=False)  # original units, not sklearn's scaling
    else:
        loaders = {"breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine,
                   "iris": datasets.load_iris, "digits-tabular": datasets.load_digits}  # fmt: skip
        bunch = loaders[name]()
    values, names = np.asarray(bunch.data, dtype=np.float64), tuple(map(str, bunch.feature_names))
    if with_target:
        values, names = np.column_stack([values, bunch.target]), (*names, "target")
    return Table(values, names)


BUNDLED = {
    "breast_cancer": (30, "scikit-learn breast cancer (569 rows)"),
    "wine": (13, "scikit-learn wine (178 rows)"),
    "iris": (4, "scikit-learn iris (150 rows)"),
    "diabetes": (10, "scikit-learn diabetes, original units (442 rows)"),
    "digits-tabular": (64, "scikit-learn digits as 64 columns (1797 rows; --dequantize)"),
}


def bundled(name: str, *, seed: int = 0, **options: Any) -> TabularData:
    """One of the scikit-learn sets shipped with scikit-learn (no download); with a ``target``
    or ``condition`` option, scikit-learn's target is a column too."""
    table = _sklearn_table(
        name, with_target=bool(options.get("target") or options.get("condition"))
    )
    return from_table(table, name, seed=seed, info={"source": "sklearn"}, **options)


for _name, (_dim, _note) in BUNDLED.items():
    register(
        DatasetInfo(_name, "tabular", _dim, False, _note, TABLE_OPTIONS),
        lambda seed=0, _n=_name, **kw: bundled(_n, seed=seed, **kw),
    )
