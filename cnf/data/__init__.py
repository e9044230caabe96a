"""Datasets by name: one registry for the trainer, the CLI and Python users.

``get_dataset`` turns a name into a dataset (:class:`~cnf.data.base.Dataset`); an unknown name
lists the valid ones. A path (a ``.csv``/``.npy``/``.npz`` file, or a MAF benchmark directory) is
read as tabular data by :mod:`cnf.data.tabular`. A :class:`DataSpec` is what a checkpoint records
to open the same data again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnf.data import conditional_toys, images, maf, tabular, toy  # noqa: F401  each registers
from cnf.data.base import REGISTRY, Dataset, DatasetInfo, content_hash, held_warnings, register
from cnf.data.files import looks_like_path, read_table
from cnf.data.tabular import TabularData, from_table

__all__ = ["REGISTRY", "DataSpec", "Dataset", "DatasetInfo", "content_hash", "dataset_kind",
           "from_file", "get_dataset", "held_warnings", "is_conditional", "list_datasets",
           "register"]  # fmt: skip


def is_conditional(name: str, options: dict[str, Any] | None = None) -> bool:
    """Whether the dataset ``name`` (with its ``options``) gives pairs ``(x, c)``, for models
    of ``p(x | c)``: a conditional task, a table with ``target`` columns, or images with a
    ``condition`` (their labels)."""
    options = options or {}
    return name in conditional_toys.TASKS or bool(options.get("target") or options.get("condition"))


def list_datasets() -> list[DatasetInfo]:
    """Every registered dataset with its kind, dimension and whether its truth is known: the
    toys first, then images and tables."""
    order = {"toy": 0, "image": 1, "tabular": 2}
    return sorted((info for _, info in REGISTRY.values()), key=lambda i: order.get(i.kind, 3))


def dataset_kind(name: str) -> str:
    """The kind ("toy", "tabular", "image") of a dataset name or path; unknown names list the
    valid ones."""
    if name not in REGISTRY and looks_like_path(name):
        return "tabular"
    if name not in REGISTRY:
        raise ValueError(_unknown(name))
    return REGISTRY[name][1].kind


def _unknown(name: str) -> str:
    return (
        f"unknown dataset {name!r}; valid names: {', '.join(sorted(REGISTRY))}, or a path to a "
        ".csv/.npy/.npz file or a MAF dataset directory"
    )


# the dataset options that `cnf train` has flags for (the others come from a config's extra)
FLAGGED = frozenset({*tabular.TABLE_OPTIONS, "data_dir", "condition"})


def _option(name: str) -> str:
    if name not in FLAGGED:
        return name
    return f"{name} (--{name.replace('_', '-')})"


def get_dataset(name: str, *, seed: int = 0, trust_pickle: bool = False, **options: Any) -> Dataset:
    """The dataset called ``name``, seeded; unknown names list the valid ones. A path to a
    ``.csv``/``.npy``/``.npz`` file or a MAF directory loads tabular data (see
    :mod:`cnf.data.tabular`); ``trust_pickle`` allows the one format that unpickles (MAF's GAS),
    and must come from the user, never from a config or checkpoint."""
    if name not in REGISTRY and looks_like_path(name):
        return from_file(name, seed=seed, trust_pickle=trust_pickle, **options)
    if name not in REGISTRY:
        raise ValueError(_unknown(name))
    factory, info = REGISTRY[name]
    unknown = sorted(set(options) - set(info.options or options))
    if unknown:
        raise ValueError(
            f"dataset {name!r} ({info.kind} data) takes no option "
            f"{', '.join(_option(o) for o in unknown)}; its options: "
            f"{', '.join(_option(o) for o in info.options or ()) or 'none'}"
        )
    return factory(seed=seed, **options)


def from_file(
    name: str, *, seed: int = 0, trust_pickle: bool = False, **options: Any
) -> TabularData:
    """A user's ``.csv``/``.npy``/``.npz`` file (``file.npz:key`` picks an array), or a MAF
    dataset directory (``trust_pickle``: see :func:`~cnf.data.maf.maf`)."""
    text, key = name, None
    if ".npz:" in name:
        text, key = name.rsplit(":", 1)
    path = Path(text).expanduser().resolve()
    if path.is_dir():
        return maf.maf(path, seed=seed, trust_pickle=trust_pickle, **options)
    table = read_table(path, key)
    full = f"{path}:{key}" if key else str(path)
    return from_table(table, full, seed=seed, info={"source": "file"}, **options)


@dataclass(frozen=True)
class DataSpec:
    """How to open a dataset again: its name (a file's absolute path), the seed and the options
    it was opened with. Plain data: a checkpoint stores :meth:`to_dict`. It never holds trust:
    reading a format that unpickles needs ``trust_pickle`` from the caller of :meth:`open`."""

    name: str
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "trust_pickle" in self.options:
            raise ValueError(
                "a dataset's options cannot hold trust_pickle: trust is given by the caller "
                "(--trust-pickle), never by a config or checkpoint"
            )

    def open(self, *, trust_pickle: bool = False, **overrides: Any) -> Dataset:
        """The dataset; ``overrides`` replace options (e.g. ``data_dir`` where files moved)."""
        options = {**self.options, **{k: v for k, v in overrides.items() if v is not None}}
        return get_dataset(self.name, seed=self.seed, trust_pickle=trust_pickle, **options)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "options": dict(self.options)}
