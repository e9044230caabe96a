"""Validated options: the one set of checks for every config dataclass, the solvers, the
flow-matching objective, the animations and the command line.

A config (:class:`cnf.model_config.ModelConfig`, :class:`cnf.training.TrainConfig`) is a
dataclass of plain values (saved as JSON and inside checkpoints). Its ``__post_init__``
validates every field with the helpers here, which raise :class:`ConfigError` naming the field,
so that the command line can name the flag the user typed (``--lr``) and Python users the
argument (``lr``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A config value is out of range; ``field`` names it (the CLI shows it as a flag)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


def option(default: Any, help: str) -> Any:
    """A config field with its help text beside it: the command line's flag, its ``--help``
    and the docs read this one definition (:func:`help_of`)."""
    return dataclasses.field(default=default, metadata={"help": help})


def help_of(field: dataclasses.Field) -> str:
    """The help text of a config field made with :func:`option`."""
    return field.metadata["help"]


def listed(values: Any) -> str:
    """Choices as a comma list, for help texts."""
    return ", ".join(values)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def finite_floats(record: Any) -> None:
    """Refuse NaN and infinite values in any float field."""
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f.name, f"must be a finite number, got {value}")


def booleans(record: Any) -> None:
    """Refuse anything but ``True`` or ``False`` in a field whose default is a bool: a config
    from JSON or Python saying ``"no"`` or ``0`` would otherwise read as true (or false) without
    a word."""
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if isinstance(f.default, bool) and not isinstance(value, bool):
            raise ConfigError(f.name, f"must be true or false, got {value!r}")


def integer(name: str, value: object, low: int, what: str = "") -> None:
    if not is_int(value) or value < low:
        raise ConfigError(name, f"must be {what or f'an integer >= {low}'}, got {value!r}")


def number(
    name: str, value: object, *, low: float = 0, strict: bool = True, high: float | None = None
) -> None:
    """A finite number above ``low`` (``strict``) or at least ``low``, and at most ``high``."""
    bad = not is_number(value) or value < low or (strict and value == low)
    if bad or (high is not None and value > high):
        if high is not None:
            what = f"a number in {'(' if strict else '['}{low:g}, {high:g}]"
        else:
            what = "a positive finite number" if strict and low == 0 else f"a number >= {low:g}"
        raise ConfigError(name, f"must be {what}, got {value!r}")


def within(name: str, value: object, low: float, high: float, *, closed: bool = False) -> None:
    """A finite number in ``(low, high)``, or ``[low, high)`` if ``closed``."""
    if not is_number(value) or not low <= value < high or (not closed and value == low):
        text = f"{'[' if closed else '('}{low:g}, {high:g})"
        raise ConfigError(name, f"must be in {text}, got {value!r}")


def choice(name: str, value: object, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ConfigError(name, f"{value!r} is unknown; valid choices: {list(valid)}")


def widths(name: str, value: object) -> tuple[int, ...]:
    """Hidden-layer widths: a non-empty sequence of positive integers, as a tuple."""
    if not isinstance(value, tuple | list) or not value:
        raise ConfigError(name, f"must be a list of layer widths, got {value!r}")
    if any(not is_int(w) or w < 1 for w in value):
        raise ConfigError(name, f"must hold positive widths, got {list(value)}")
    return tuple(value)


def from_dict(cls: Callable[..., C], values: dict[str, Any]) -> C:
    """``cls(**values)``, refusing unknown keys with the list of valid ones."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(known)}")
    return cls(**values)


def to_dict(record: Any) -> dict[str, Any]:
    """A config as JSON-ready plain data (tuples become lists)."""
    out = dataclasses.asdict(record)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
