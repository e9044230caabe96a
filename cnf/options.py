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
import functools
import math
import typing
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
    """``cls(**values)``, refusing unknown keys with the list of valid ones; the dicts of nested
    configs become their configs (a choice of classes by its ``kind`` key)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(fields)}")
    values = dict(values)
    for name, value in values.items():
        kinds = fields[name].metadata.get("nested")
        if kinds is not None and isinstance(value, dict):
            values[name] = _nested_from_dict(name, kinds, value)
    return cls(**values)


def _nested_from_dict(name: str, kinds: dict[str, type], value: dict[str, Any]) -> Any:
    if "" in kinds:
        return from_dict(kinds[""], value)
    rest = {k: v for k, v in value.items() if k != "kind"}
    if value.get("kind") not in kinds:
        raise ValueError(f"{name} has kind {value.get('kind')!r}; valid kinds: {list(kinds)}")
    return from_dict(kinds[value["kind"]], rest)


def to_dict(record: Any) -> dict[str, Any]:
    """A config as JSON-ready plain data (tuples become lists, nested configs dicts, a choice of
    classes with its ``kind``)."""
    out = {f.name: _to_plain(getattr(record, f.name)) for f in dataclasses.fields(record)}
    kind = getattr(type(record), "kind", None)
    return {"kind": kind, **out} if isinstance(kind, str) else out


# --- configs inside configs ------------------------------------------------------------------
#
# A config may hold other configs (the model's solvers, the objective's weights). On the command
# line, in presets and in ``TrainConfig.replace`` their options keep one flat name each
# (``eval_atol`` is ``model.eval_solver.atol``): the nested field's metadata maps its config's
# fields to those names, and :func:`leaves` reads the whole tree from the definitions.

Flags = dict[str, "str | tuple[str, str]"]


def nested(
    cls: type,
    help: str,
    flags: Flags | None,
    *,
    optional: str = "",
    default: Any = dataclasses.MISSING,
) -> Any:
    """A config field that holds a config of class ``cls``.

    Arguments:
        cls: the nested config's class (a dataclass whose option fields carry help texts).
        help: what it is, put before its options' help texts (``"training solver"``).
        flags: the nested config's fields that are options, each with its flat name, or with a
            ``(name, help)`` pair whose help is used as it is; ``None``: all of them, under
            their own names.
        optional: for a field that may be ``None`` (its default): why its options then have no
            effect, and the fix (a sentence that follows the option's name).
        default: a default, or a function that makes one (default: ``cls()``).
    """
    return _field(default, cls, {"help": help, "nested": {"": cls}, "flags": flags,
                                 "optional": optional})  # fmt: skip


def variants(kinds: dict[str, type], help: str, flags: Flags, *, default: Any) -> Any:
    """A config field that holds one config of a choice of classes, ``kinds`` by name (each with
    a class attribute ``kind``, its name); ``flags["kind"]`` is the flat name that chooses."""
    return _field(default, None, {"help": help, "nested": kinds, "flags": flags, "optional": ""})


def _field(default: Any, cls: type | None, meta: dict[str, Any]) -> Any:
    if default is dataclasses.MISSING:
        default = None if meta["optional"] else cls
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One option of a config tree: its flat name, where it lives (attribute names from the
    root), its type, its default and its help. ``variant`` is the class the option belongs to
    where a field chooses among classes."""

    name: str
    path: tuple[str, ...]
    kind: Any
    default: Any
    help: str
    variant: type | None = None


@functools.cache
def leaves(cls: type) -> dict[str, Leaf]:
    """Every option of the config class ``cls`` and of the configs nested in it, by flat name
    (read from the class: no config is built)."""
    out: dict[str, Leaf] = {}
    _collect(cls, None, (), None, "", None, out)
    return out


def _default(f: dataclasses.Field, owner: Any) -> Any:
    """A field's default: the value in ``owner`` (the enclosing config's default), else its own."""
    if owner is not None:
        return getattr(owner, f.name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _collect(
    cls: type, default: Any, path: tuple[str, ...], flags: Flags | None, what: str,
    variant: type | None, out: dict[str, Leaf],
) -> None:  # fmt: skip
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, here = f.metadata, (*path, f.name)
        if "nested" in meta:
            _collect_nested(meta, _default(f, default), here, out)
        elif "help" in meta and (flags is None or f.name in flags):
            name, text = _named(f.name, meta["help"], flags, what)
            out[name] = Leaf(name, here, hints[f.name], _default(f, default), text, variant)


def _collect_nested(meta: Any, value: Any, path: tuple[str, ...], out: dict[str, Leaf]) -> None:
    kinds, flags = meta["nested"], meta["flags"]
    if "" not in kinds:  # a choice of classes: one option names it
        name, text = _named("kind", "", flags, "")
        out[name] = Leaf(name, (*path, "kind"), str, value.kind, text)
    for cls in kinds.values():
        default = value if type(value) is cls else None
        chosen = None if "" in kinds else cls
        _collect(cls, default, path, flags, meta["help"] if flags else "", chosen, out)


def _named(field: str, help: str, flags: Flags | None, what: str) -> tuple[str, str]:
    spec = field if flags is None else flags[field]
    if isinstance(spec, tuple):
        return spec
    return spec, (f"{what}: {help}" if what else help)


def flatten(record: Any) -> dict[str, Any]:
    """The options of a config tree by flat name, less those of absent parts (an optional config
    that is ``None``, a class not chosen)."""
    out = {}
    for leaf in leaves(type(record)).values():
        owner = record
        for step in leaf.path[:-1]:
            owner = getattr(owner, step)
            if owner is None:
                break
        if owner is not None and (leaf.variant is None or type(owner) is leaf.variant):
            out[leaf.name] = getattr(owner, leaf.path[-1])
    return out


def apply(record: C, changes: dict[str, Any]) -> C:
    """A copy of the config tree ``record`` with options changed by flat name, each validated
    where it is defined (an error names the flat option). An option of an absent part is refused
    with its nested field's ``optional`` sentence, an option of a class not chosen with the
    option that chooses."""
    table = leaves(type(record))
    plain = {f.name for f in dataclasses.fields(record) if "nested" not in f.metadata}
    unknown = sorted(set(changes) - set(table) - plain)  # plain: a field for Python alone
    if unknown:
        raise ValueError(f"unknown options {unknown}; valid options: {sorted(table)}")
    paths = {k: table[k].path if k in table else (k,) for k in changes}
    return _apply(record, (), {paths[k]: (k, v) for k, v in changes.items()}, table)


def _apply(record: Any, at: tuple[str, ...], changes: dict, table: dict[str, Leaf]) -> Any:
    own, subs, depth = {}, {}, len(at)
    for f in dataclasses.fields(record):
        inner = {p: c for p, c in changes.items() if p[: depth + 1] == (*at, f.name)}
        if not inner:
            continue
        if "nested" not in f.metadata:
            own[f.name] = inner[(*at, f.name)][1]
            continue
        current = getattr(record, f.name)
        if current is None:
            raise ConfigError(next(iter(inner.values()))[0], f.metadata["optional"])
        subs[f.name] = _apply_nested(current, (*at, f.name), inner, f.metadata, table)
    names = {p[-1]: c[0] for p, c in changes.items() if len(p) == depth + 1}
    try:
        return dataclasses.replace(record, **own, **subs)
    except ConfigError as err:
        raise ConfigError(names.get(err.field, err.field), err.problem) from None


def _apply_nested(current: Any, at: tuple[str, ...], changes: dict, meta: Any, table: Any) -> Any:
    kinds = meta["nested"]
    if "" not in kinds:  # a choice of classes: its "kind" option picks one first
        chosen = changes.pop((*at, "kind"), None)
        if chosen is not None and chosen[1] != current.kind:
            choice(chosen[0], chosen[1], tuple(kinds))
            current = kinds[chosen[1]]()
        selector = table_name(table, (*at, "kind"))
        for name, _ in changes.values():
            owner = table[name].variant
            if owner is not None and owner is not type(current):
                raise ConfigError(name, f"is for {selector} {owner.kind}, and {selector} is "
                                  f"{current.kind}: drop it, or choose {selector} "
                                  f"{owner.kind}")  # fmt: skip
    return _apply(current, at, changes, table)


def table_name(table: dict[str, Leaf], path: tuple[str, ...]) -> str:
    return next(leaf.name for leaf in table.values() if leaf.path == path)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value
