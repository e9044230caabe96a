"""Datasets by name: one registry for the trainer, the CLI and Python users.

A dataset gives the trainer deterministic batches (a function of the seed and the iteration, so
an interrupted run resumes exactly), a fixed validation set and a test set. ``get_dataset`` turns a
name into one; an unknown name lists the valid ones. A path (a ``.csv``/``.npy``/``.npz`` file, or
a MAF benchmark directory) is read as tabular data by :mod:`cnf.data.tabular`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np

from cnf.data.toy import TOY, ToyDensity


class Dataset(Protocol):
    """What the trainer needs of a dataset. A dataset may also have ``to(device)``, returning
    itself with its training data moved there once (the image sets do); the trainer calls it."""

    name: str
    kind: str  # "toy", "tabular" or "image": picks the model builder
    event_shape: tuple[int, ...]

    def train_batch(self, batch_size: int, iteration: int) -> Any: ...
    def validation(self) -> Any: ...
    def test(self, n: int | None = None) -> Any: ...
    def meta(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class DatasetInfo:
    """One row of ``cnf datasets``."""

    name: str
    kind: str
    dim: int
    truth: bool
    note: str = ""
    options: tuple[str, ...] | None = None  # the factory's keyword options (None: not checked)


class ToyData:
    """A 2-D toy density as a dataset: fresh samples every iteration, seeded per iteration.

    Arguments:
        density: the :class:`~cnf.data.toy.ToyDensity`.
        seed: the run's seed; batches, validation and test sets come from disjoint streams of it.
        n_val: validation set size.
    """

    kind = "toy"
    event_shape = (2,)

    def __init__(self, density: ToyDensity, seed: int = 0, n_val: int = 2000) -> None:
        self.density, self.seed, self.n_val = density, seed, n_val
        self.name = density.name

    def train_batch(self, batch_size: int, iteration: int) -> np.ndarray:
        return self.density.sample(batch_size, np.random.default_rng([self.seed, 0, iteration]))

    @cached_property
    def _validation(self) -> np.ndarray:
        return self.density.sample(self.n_val, np.random.default_rng([self.seed, 1]))

    def validation(self) -> np.ndarray:
        return self._validation

    def test(self, n: int | None = None) -> np.ndarray:
        """``n`` fresh samples (default 20,000) from a stream the training never sees."""
        return self.density.sample(n or 20_000, np.random.default_rng([self.seed, 2]))

    @property
    def entropy(self) -> float | None:
        return self.density.entropy

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return self.density.log_prob(x)

    def meta(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "event_shape": list(self.event_shape)}


# name -> (factory(seed, **options) -> Dataset, info)
REGISTRY: dict[str, tuple[Callable[..., Dataset], DatasetInfo]] = {
    name: (
        lambda seed=0, _d=density, **kw: ToyData(_d, seed, **kw),
        DatasetInfo(name, "toy", 2, density.has_truth, "FFJORD toy density", ("n_val",)),
    )
    for name, density in TOY.items()
}


def register(info: DatasetInfo, factory: Callable[..., Dataset]) -> None:
    """Add a dataset to the registry (used by the tabular and image modules)."""
    REGISTRY[info.name] = (factory, info)


def list_datasets() -> list[DatasetInfo]:
    """Every registered dataset with its kind, dimension and whether its truth is known."""
    return [info for _, info in REGISTRY.values()]


def dataset_kind(name: str) -> str:
    """The kind ("toy", "tabular", "image") of a dataset name or path; unknown names list the
    valid ones."""
    if name not in REGISTRY and tabular.looks_like_path(name):
        return "tabular"
    if name not in REGISTRY:
        raise ValueError(_unknown(name))
    return REGISTRY[name][1].kind


def _unknown(name: str) -> str:
    return (
        f"unknown dataset {name!r}; valid names: {', '.join(sorted(REGISTRY))}, or a path to a "
        ".csv/.npy/.npz file or a MAF dataset directory"
    )


def get_dataset(name: str, *, seed: int = 0, **options: Any) -> Dataset:
    """The dataset called ``name``, seeded; unknown names list the valid ones. A path to a
    ``.csv``/``.npy``/``.npz`` file or a MAF directory loads tabular data (see
    :mod:`cnf.data.tabular`)."""
    if name not in REGISTRY and tabular.looks_like_path(name):
        return tabular.from_file(name, seed=seed, **options)
    if name not in REGISTRY:
        raise ValueError(_unknown(name))
    factory, info = REGISTRY[name]
    unknown = sorted(set(options) - set(info.options or options))
    if unknown:
        raise ValueError(
            f"dataset {name!r} ({info.kind} data) takes no option {', '.join(map(repr, unknown))}; "
            f"its options: "
            f"{list(info.options or ())}"
        )
    return factory(seed=seed, **options)


from cnf.data import images, tabular  # noqa: E402, F401  register the image and tabular sets
