"""Datasets by name: one registry for the trainer, the CLI and Python users.

A dataset gives the trainer deterministic batches (a function of the seed and the iteration, so
an interrupted run resumes exactly), a fixed validation set and a test set. ``get_dataset`` turns a
name into one; an unknown name lists the valid ones. A path (a ``.csv``/``.npy``/``.npz`` file, or
a MAF benchmark directory) is read as tabular data by :mod:`cnf.data.tabular`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    def fingerprint(self) -> str: ...


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

    def fingerprint(self) -> str:
        """A hash of the validation samples: changes if the density's sampler does."""
        return content_hash(self.name, self._validation)


def content_hash(*parts: Any) -> str:
    """SHA-256 of arrays (their dtype, shape and bytes) and strings: a dataset's fingerprint,
    stored in checkpoints so that a resume refuses data that changed."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            part = np.ascontiguousarray(part)
            digest.update(f"{part.dtype.str}{part.shape}".encode())
            digest.update(part.tobytes())
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()


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


def _option(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


@contextmanager
def held_warnings() -> Iterator[None]:
    """Hold the package's logged warnings (dropped columns, integer columns, ...) while inputs
    are checked: they are shown once the block succeeds, and dropped if it fails, so that a
    refused command prints its one error line and nothing else."""
    logger = logging.getLogger("cnf")
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    logger.addFilter(hold)
    try:
        yield
    finally:
        logger.removeFilter(hold)
    for record in held:  # reached only when the block succeeded
        logger.handle(record)


def get_dataset(name: str, *, seed: int = 0, trust_pickle: bool = False, **options: Any) -> Dataset:
    """The dataset called ``name``, seeded; unknown names list the valid ones. A path to a
    ``.csv``/``.npy``/``.npz`` file or a MAF directory loads tabular data (see
    :mod:`cnf.data.tabular`); ``trust_pickle`` allows the one format that unpickles (MAF's GAS),
    and must come from the user, never from a config or checkpoint."""
    if name not in REGISTRY and tabular.looks_like_path(name):
        return tabular.from_file(name, seed=seed, trust_pickle=trust_pickle, **options)
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


from cnf.data import images, tabular  # noqa: E402, F401  register the image and tabular sets
