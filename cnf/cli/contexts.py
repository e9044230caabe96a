"""``--context`` of ``cnf sample`` and ``cnf animate``: the condition of a model of
:math:`p(x \\mid c)`, checked against what the run was trained on before any work.

* one condition: a label (``3`` or ``label=3``), or the features in order (``0.5,-1``) or by
  name (``age=50,bmi=31``, a table's condition columns, in any order);
* a CSV file of conditions, one per row (``cnf sample`` only: one set of samples per row): with
  a header naming the columns (any order; a label's one column may have any name) or without
  one (the values in order).

A table's features are given in their original units (the model standardizes them).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cnf.runs import condition_names

MAX_ROWS = 10_000  # conditions in one CSV file
MAX_BYTES = 64 * 2**20  # and its size


@dataclass(frozen=True)
class Contexts:
    """Checked conditions: ``rows`` is ``(R,)`` int64 labels or ``(R, K)`` float64 features;
    ``names`` their columns in outputs; ``from_file`` whether they came from a CSV file."""

    rows: Tensor
    names: tuple[str, ...]
    from_file: bool = False

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> Tensor:
        """Condition ``i``, as a model takes one condition for every row."""
        return self.rows[i]

    def for_model(self, model: torch.nn.Module, i: int) -> Tensor:
        """Condition ``i`` on ``model``'s device, features in its dtype."""
        p, c = next(model.parameters()), self.rows[i]
        return c.to(p.device, p.dtype if c.is_floating_point() else c.dtype)


def read_contexts(meta: dict[str, Any], text: str | None, run: Path, flag: str = "--context"):
    """``text`` as :class:`Contexts` for the run's model (``None`` for a model of :math:`p(x)`
    without ``text``); a ``ValueError`` names what is wrong and how to give it."""
    spec = meta.get("context")
    if spec is None:
        if text is not None:
            raise ValueError(f"{flag} {text}: {run} models p(x) without conditions; drop it")
        return None
    names = condition_names(spec)
    what = (f"a label in 0..{spec['classes'] - 1}" if spec["kind"] == "categorical"
            else f"{len(names)} feature value(s) in order, or NAME=VALUE for "
                 f"{', '.join(names)}")  # fmt: skip
    if text is None:
        raise ValueError(f"{run} models p(x | c): give {flag}, {what}, or a .csv file of them")
    if text.lower().endswith(".csv"):
        return Contexts(_checked(spec, _read_csv(Path(text), names, flag), text, what, flag),
                        names, from_file=True)  # fmt: skip
    values = _pairs(text, names, flag) if "=" in text else _numbers(text, what, flag)
    return Contexts(_checked(spec, [values], text, what, flag), names)


def _numbers(text: str, what: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r} is not {what}") from None


def _pairs(text: str, names: tuple[str, ...], flag: str) -> list[float]:
    """``NAME=VALUE,...`` in the order of ``names``, each named once."""
    given: dict[str, float] = {}
    for item in text.split(","):
        name, _, value = (part.strip() for part in item.partition("="))
        if name not in names:
            raise ValueError(f"{flag} {text!r}: {name!r} is not a condition of this model; its "
                             f"conditions: {', '.join(names)}")  # fmt: skip
        if name in given:
            raise ValueError(f"{flag} {text!r} gives {name} twice: give it once")
        try:
            given[name] = float(value)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {name}={value!r} is not a number") from None
    missing = [n for n in names if n not in given]
    if missing:
        raise ValueError(f"{flag} {text!r} lacks {', '.join(missing)}: give every one of "
                         f"{', '.join(names)}")  # fmt: skip
    return [given[n] for n in names]


def _read_csv(path: Path, names: tuple[str, ...], flag: str) -> list[list[float]]:
    """The rows of a CSV file of conditions, reordered by its header where it has one."""
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file; give a .csv file of conditions")
    if path.stat().st_size > MAX_BYTES:
        raise ValueError(f"{flag} {path} is larger than {MAX_BYTES // 2**20} MB: at most "
                         f"{MAX_ROWS} conditions at a time")  # fmt: skip
    with open(path, newline="") as f:
        lines = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    if not lines:
        raise ValueError(f"{flag} {path} holds no conditions: write one per row")
    order = None
    if not all(_is_number(cell) for cell in lines[0]):
        order, lines = _header(lines[0], names, path, flag), lines[1:]
    if not lines or len(lines) > MAX_ROWS:
        raise ValueError(f"{flag} {path} holds {len(lines)} conditions: give 1 to {MAX_ROWS}")
    rows = []
    for i, line in enumerate(lines, 2 if order else 1):
        if not all(_is_number(cell) for cell in line):
            raise ValueError(f"{flag} {path}, line {i}: {','.join(line)!r} is not all numbers")
        values = [float(cell) for cell in line]
        rows.append(values if order is None or len(values) != len(order) else
                    [values[j] for j in order])  # fmt: skip
    return rows


def _header(header: list[str], names: tuple[str, ...], path: Path, flag: str) -> list[int]:
    """Where each of ``names`` is in ``header`` (a label's one column may have any name)."""
    header = [cell.strip() for cell in header]
    if names == ("label",) and len(header) == 1:
        return [0]
    missing = [n for n in names if n not in header]
    if missing or len(header) != len(names):
        extra = [h for h in header if h not in names]
        raise ValueError(
            f"{flag} {path}: its header must name the model's conditions, "
            f"{', '.join(names)}; missing {', '.join(missing) or 'none'}, unknown "
            f"{', '.join(extra) or 'none'}"
        )
    return [header.index(n) for n in names]


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _checked(spec: dict[str, Any], rows: list[list[float]], text: str, what: str,
             flag: str) -> Tensor:  # fmt: skip
    """The rows as labels or features, each checked."""
    for i, values in enumerate(rows):
        where = f"{flag} {text!r}" + (f", condition {i + 1}" if len(rows) > 1 else "")
        if spec["kind"] == "categorical":
            if len(values) != 1 or values[0] not in range(spec["classes"]):
                raise ValueError(f"{where} is not {what}")
        elif len(values) != spec["features"] or not all(math.isfinite(v) for v in values):
            raise ValueError(f"{where} is not {what}")
    if spec["kind"] == "categorical":
        return torch.tensor([int(v[0]) for v in rows], dtype=torch.int64)
    return torch.tensor(rows, dtype=torch.float64)
