"""A table read as pairs: ``target`` columns given the others, for a model of
:math:`p(\\text{target} \\mid \\text{rest})` (``cnf train --data TABLE --target COLS``), or
the other way round, the others given the ``condition`` columns (``--condition COLS``).

The table is read, cleaned and split as for a model of all its columns
(:func:`cnf.data.tabular.from_table`); the rows of every split are then cut into the modelled
``x`` (the target columns) and the condition ``c`` (the other kept columns).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cnf.data.columns import integer_columns, logger, warn_integer
from cnf.data.conditional import Pairs

TabularData = Any  # cnf.data.tabular.TabularData, which builds this module's tables


def target_columns(data: TabularData, target: str, option: str = "target") -> list[int]:
    """The kept columns ``target`` names (a comma list of names, or of 0-based indices into the
    table's columns), by position among the kept ones; ``option`` names the flag in errors."""
    everything = data.info.get("all_columns", list(data.columns))
    names = []
    for item in (part.strip() for part in target.split(",")):
        if item.isdigit() and int(item) < len(everything):
            item = everything[int(item)]
        if item not in data.columns:
            why = "was dropped (constant or a repeat of another)" if item in everything else (
                f"is not a column of {data.name}")  # fmt: skip
            raise ValueError(f"{option} {item!r} {why}: choose among {', '.join(data.columns)}")
        names.append(item)
    if len(set(names)) != len(names) or len(names) >= len(data.columns):
        rest = "to condition on" if option == "target" else "to model"
        raise ValueError(f"{option} {target!r} must name distinct columns and leave at least one "
                         f"column of {data.name} {rest}")  # fmt: skip
    return [data.columns.index(n) for n in names]


class ConditionalTable:
    """The pairs ``(x, c)`` of a :class:`~cnf.data.tabular.TabularData`: ``x`` its ``target``
    columns and ``c`` the rest, or ``c`` its ``condition`` columns and ``x`` the rest (one of
    the two). Batches, splits and the fingerprint are the table's own."""

    kind = "tabular"
    entropy = None
    support = None

    def __init__(self, table: TabularData, target: str = "", condition: str = "") -> None:
        if bool(target) == bool(condition):
            raise ValueError(
                "give the modelled columns (--target COLS) or the conditioning ones "
                f"(--condition COLS), one of the two; got target {target!r}, condition "
                f"{condition!r}"
            )
        self.table = table
        every = range(len(table.columns))
        if target:
            self.target = target_columns(table, target)
            self.rest = [j for j in every if j not in self.target]
        else:
            self.rest = target_columns(table, condition, "condition")
            self.target = [j for j in every if j not in self.rest]
        self.name = table.name
        self.columns = tuple(table.columns[j] for j in self.target)
        table.integer[self.rest] = False  # a condition is given as it is, never dequantized
        integer = integer_columns(table.splits.train)[self.target]
        if not table.integer.any():
            warn_integer(self.name, self.columns, integer, logger.warning)
        self.event_shape = (len(self.target),)

    def _pairs(self, rows: np.ndarray) -> Pairs:
        return Pairs(rows[:, self.target], rows[:, self.rest])

    def train_batch(self, batch_size: int, iteration: int) -> Pairs:
        return self._pairs(self.table.train_batch(batch_size, iteration))

    def train_data(self) -> Pairs:
        return self._pairs(self.table.train_data())

    def validation(self) -> Pairs:
        return self._pairs(self.table.validation())

    def test(self, n: int | None = None) -> Pairs:
        return self._pairs(self.table.test(n))

    def fingerprint(self) -> str:
        return self.table.fingerprint()

    def to(self, device: Any) -> ConditionalTable:
        return self

    def check_range(self, dtype: str) -> None:
        self.table.check_range(dtype)

    def meta(self) -> dict[str, Any]:
        """The table's description for its target columns, and the condition: its columns,
        ``{"kind": "continuous", "features": K, "columns": [...]}``. Rows of a file are read
        as the whole table's (no column plan to restore on sampling)."""
        meta = {k: v for k, v in self.table.meta().items() if k not in ("plan", "all_columns")}
        names = [self.table.columns[j] for j in self.rest]
        return {**meta, "event_shape": list(self.event_shape), "columns": list(self.columns),
                "context": {"kind": "continuous", "features": len(self.rest),
                            "columns": names}}  # fmt: skip
