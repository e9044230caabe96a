"""The flags of ``cnf train``, made from the config's fields, with their help texts."""

from __future__ import annotations

import argparse
import re
import types
import typing
from typing import Any

from cnf.options import Leaf, leaves
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
    """``(name, type, default)`` of every option ``cnf train`` takes: the recipe's, the model's
    and those of the configs they hold (:func:`cnf.options.leaves`)."""
    return [(leaf.name, _field_type(leaf.kind), leaf.default) for leaf in _option_leaves()]


def _option_leaves() -> list[Leaf]:
    return [leaf for leaf in leaves(TrainConfig).values() if leaf.name != "extra"]


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    for leaf in _option_leaves():
        name, default, kind = leaf.name, leaf.default, _field_type(leaf.kind)
        flag = "--" + name.replace("_", "-")
        shown = "none" if default is None else flag_text(default)
        help_text = f"{leaf.help} (default: {shown})".replace("%", "%%")  # argparse's format
        if kind is bool:
            # --no-FLAG too: a preset may have turned an option on (--no-unet-scale-shift)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)  # fmt: skip
        elif name == "hidden":
            parser.add_argument(flag, type=_hidden, default=None, metavar="W,W,...", help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(),
                                help=help_text)  # fmt: skip
