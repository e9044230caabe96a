"""The rows of a run's ``log.jsonl``: the loop's per-iteration rows, one row per interval of
``log_every`` iterations (:class:`LogRows`), so that a log holds about a thousand rows whatever
the length of the run (75,000 iterations of a toy made 18.6 MB at a row each).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

ROWS = 1000  # about the rows of a log with the automatic interval
SUMMED = frozenset({"time", "cpu"})  # seconds: the log's sum is the training's
LAST = frozenset({"lr", "step_size", "atol", "rtol"})  # a setting, where the interval ends


def log_interval(log_every: int, total_iters: int) -> int:
    """The iterations a row of the log covers: ``log_every``, or with 0 (automatic)
    ``total_iters // 1000``, at least 1 (runs of under 2,000 iterations keep a row each).

    Example:
        >>> log_interval(0, 75_000), log_interval(0, 600), log_interval(10, 75_000)
        (75, 1, 10)
    """
    return log_every or max(1, total_iters // ROWS)


class LogRows:
    """The loop's per-iteration rows, aggregated over intervals of ``every`` iterations aligned
    to its multiples (iterations ``k * every``): :meth:`add` takes each row and returns the rows
    to write. A row also ends early (its interval cut short) at an evaluation (a row with
    ``val_nll``), where ``ends(iteration)`` says a phase or the run ends, at :meth:`flush` (the
    recorder's, before each checkpoint: the log on disk then covers exactly the iterations up to
    the checkpoint, and a run stopped by a signal between two multiples writes a partial row,
    which a resume continues with a row from there to the next multiple), and at a row that does
    not continue the interval (another phase, or a skipped iteration).

    A written row has ``iter``, the interval's last iteration, and ``iters``, the iterations
    it covers (a log sums them to its last iteration, each iteration once), then per key:

    * ``time`` and ``cpu``: summed (the log's sum is the training's seconds);
    * ``lr``, ``step_size``, ``atol``, ``rtol`` and any text (``objective``, the phase): the
      last iteration's, the settings the interval ends with;
    * ``val_*`` (the evaluation): its iteration's, the row's last;
    * ``adapt``: the list of the interval's step-size checks, each a per-iteration row's record
      (``event``, ``gap``, ...) with its ``iter`` and the ``step_size`` and ``atol`` it left;
    * a flag (``from_best``): true if it was on any iteration;
    * every other number (``loss``, ``nll``, ``fm_loss``, ``nfe``, ``nfe_backward``,
      ``grad_norm``, ...): the mean over the iterations that have it.

    A row of one iteration keeps that iteration's values as they were (``adapt`` apart).
    """

    def __init__(self, every: int, ends: Callable[[int], bool] = lambda iteration: False):
        self.every, self.ends = every, ends
        self.pending: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Take an iteration's row; return the rows now complete (none, one or two)."""
        done = self.flush() if self.pending and not self._continues(row) else []
        self.pending.append(row)
        it = row["iter"]
        if it % self.every == 0 or "val_nll" in row or self.ends(it):
            done += self.flush()
        return done

    def flush(self) -> list[dict[str, Any]]:
        """The row of the iterations taken so far (none if there are none)."""
        rows, self.pending = self.pending, []
        return [aggregate(rows)] if rows else []

    def _continues(self, row: dict[str, Any]) -> bool:
        last = self.pending[-1]
        return row["iter"] == last["iter"] + 1 and row.get("objective") == last.get("objective")


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One log row for consecutive iterations' ``rows`` (the rules: :class:`LogRows`)."""
    out: dict[str, Any] = {"iter": rows[-1]["iter"], "iters": len(rows)}
    for key in dict.fromkeys(k for row in rows for k in row):
        if key not in out:
            out[key] = _combine(key, [row[key] for row in rows if key in row])
    checks = [_check(row) for row in rows if "adapt" in row]
    if checks:
        out["adapt"] = checks
    return out


def _combine(key: str, values: list[Any]) -> Any:
    if len(values) == 1:
        return values[0]
    if key in SUMMED:
        return math.fsum(values)
    if all(isinstance(v, bool) for v in values):
        return any(values)
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if key in LAST or key.startswith("val_") or not numbers:
        return values[-1]
    return math.fsum(values) / len(values)


def _check(row: dict[str, Any]) -> dict[str, Any]:
    """A step-size check as the log keeps it: its record, its iteration, the solver it left."""
    solver = {k: row[k] for k in ("step_size", "atol") if k in row}
    return {"iter": row["iter"], **row["adapt"], **solver}


__all__ = ["LogRows", "aggregate", "log_interval"]
