"""The rules for a table's columns: selection by name or index, conversion to numbers, rows with
NaN, the columns without a density (constant, or repeating another), integer columns and their
dequantization, and the values and spreads a dtype can hold (see :mod:`cnf.data.tabular`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger("cnf")
MISSING = {"", "na", "nan", "null", "none", "?"}


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
                out[i, j] = math.nan if text.lower() in MISSING else float(text)
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


def warn_integer(
    name: str, columns: Sequence[str], integer: np.ndarray, note: Callable[[str], None],
    hint: str = "--dequantize",
) -> None:  # fmt: skip
    """Tell ``note`` of the columns marked ``integer``, on which a continuous density is
    degenerate, and how to dequantize them (``hint``)."""
    if integer.any():
        names = [c for c, i in zip(columns, integer, strict=True) if i][:10]
        note(f"{name}: columns {', '.join(names)} take only integer values, on which a "
             f"continuous density is degenerate; consider {hint}")  # fmt: skip


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


def check_range(name: str, columns: Sequence[str], splits: Any, dtype: str) -> None:
    """Refuse values that training in ``dtype`` cannot represent: magnitudes so large that
    their squares (the covariance of the standardization) or the cast to float32 would
    overflow, and training spreads so small that standardizing divides by an underflowed
    standard deviation, or that the cast to ``dtype`` rounds the column to a few values.
    ``splits``: the table's train, validation and test rows (attributes)."""
    parts = [p for p in vars(splits).values() if len(p)]
    peak = np.max([np.abs(p).max(0) for p in parts], axis=0)
    _check_peak(name, columns, peak, dtype)
    _check_spread(name, columns, column_spread(splits.train), peak, dtype)


def _check_peak(name: str, columns: Sequence[str], peak: np.ndarray, dtype: str) -> None:
    limit = RANGE_LIMIT[dtype]
    if (peak <= limit).all():
        return
    j = int(np.argmax(peak))
    hint = " or train with --dtype float64" if dtype == "float32" and peak[j] < 1e150 else ""
    raise ValueError(
        f"{name}: column {columns[j]!r} has values up to {peak[j]:.3g} in "
        f"magnitude, too large for {dtype} densities (at most {limit:.0e}): rescale the "
        f"column (divide it by a power of ten, or take its log){hint}"
    )


def _check_spread(
    name: str, columns: Sequence[str], std: np.ndarray, peak: np.ndarray, dtype: str
) -> None:
    tiny, coarse = _too_narrow(std, peak, dtype)
    bad = tiny if tiny.any() else coarse
    if not bad.any():
        return
    wide64 = not any(m[bad].any() for m in _too_narrow(std, peak, "float64"))
    hint = " or train with --dtype float64" if dtype == "float32" and wide64 else ""
    if tiny.any():
        raise ValueError(
            f"{name}: {_listed(columns, tiny, std)} on the training rows, below the "
            f"{SPREAD_FLOOR[dtype]:.0e} that {dtype} densities need (standardizing divides "
            f"by it): rescale (multiply by a power of ten){hint}, or drop the column"
        )
    raise ValueError(
        f"{name}: {_listed(columns, coarse, std)} on the training rows, too small beside "
        f"values up to {peak[coarse].max():.3g} in magnitude: {dtype} would round them to "
        f"a few values; subtract an offset (such as the mean){hint}, or drop the column"
    )


def _listed(columns: Sequence[str], mask: np.ndarray, std: np.ndarray) -> str:
    picked = np.flatnonzero(mask)[:10]
    names = ", ".join(repr(columns[j]) for j in picked)
    values = ", ".join(f"{std[j]:.3g}" for j in picked)
    if mask.sum() == 1:
        return f"column {names} has a standard deviation of {values}"
    more = ", ..." if mask.sum() > 10 else ""
    return f"columns {names}{more} have standard deviations of {values}{more}"
