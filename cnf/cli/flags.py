"""The flags of ``cnf train``, made from the config's fields, with their help texts."""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from typing import Any

from cnf.model_config import ModelConfig
from cnf.options import help_of
from cnf.training import TrainConfig


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --data must not be taken for --data-dir
        super().__init__(*args, **kwargs)
        # "-1e-3" is a (negative) number, not a flag: argparse's own pattern misses exponents,
        # so "--lr -1e-3" failed as "expected one argument" instead of reaching the range check
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$")

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _field_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    return hint


def _hidden(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 64,64,64, got {text!r}") from None
    return widths


def flag_text(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def config_fields() -> list[tuple[str, Any, Any]]:
    """``(name, type, default)`` of every option ``cnf train`` takes: the recipe's and the
    model's fields."""
    return [(f.name, kind, f.default) for f, kind in _option_fields()]


def _option_fields() -> list[tuple[dataclasses.Field, Any]]:
    out = []
    for cls in (TrainConfig, ModelConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in ("extra", "model"):
                out.append((f, _field_type(hints[f.name])))
    return out


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    for f, kind in _option_fields():
        name, default = f.name, f.default
        flag = "--" + name.replace("_", "-")
        shown = "none" if default is None else flag_text(default)
        help_text = f"{help_of(f)} (default: {shown})".replace("%", "%%")  # argparse's format
        if kind is bool:
            # --no-FLAG too: a preset may have turned an option on (--no-unet-scale-shift)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)  # fmt: skip
        elif name == "hidden":
            parser.add_argument(flag, type=_hidden, default=None, metavar="W,W,...", help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(),
                                help=help_text)  # fmt: skip
