"""What a dataset is, and the registry that names them (no dataset is defined here).

A dataset gives the trainer deterministic batches (a function of the seed and the iteration, so
an interrupted run resumes exactly), a fixed validation set and a test set, a description
(``meta()``) and a content fingerprint that checkpoints store.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class Dataset(Protocol):
    """What the trainer, the report and the figures need of a dataset. Every dataset has all of
    it; what only some kinds use is declared here too, with what the others give:

    * ``entropy``: the true entropy in nats where it is known (the toys), else ``None``;
    * ``support``: the half-width of a square holding the data, for 2-D figures, else ``None``;
    * ``check_range(dtype)``: refuse values the model's dtype cannot hold (tables; a no-op for
      the others, whose values are bounded);
    * ``to(device)``: the dataset with its training data on ``device`` (the image sets move
      theirs once; the others return themselves).
    """

    name: str
    kind: str  # "toy", "tabular" or "image": picks the model builder
    event_shape: tuple[int, ...]
    entropy: float | None
    support: float | None

    def train_batch(self, batch_size: int, iteration: int) -> Any: ...
    def validation(self) -> Any: ...
    def test(self, n: int | None = None) -> Any: ...
    def meta(self) -> dict[str, Any]: ...
    def fingerprint(self) -> str: ...
    def check_range(self, dtype: str) -> None: ...
    def to(self, device: Any) -> Dataset: ...


@dataclass(frozen=True)
class DatasetInfo:
    """One row of ``cnf datasets``."""

    name: str
    kind: str
    dim: int
    truth: bool
    note: str = ""
    options: tuple[str, ...] | None = None  # the factory's keyword options (None: not checked)


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


# name -> (factory(seed, **options) -> Dataset, info); the toy, tabular and image modules
# register theirs when cnf.data imports them
REGISTRY: dict[str, tuple[Callable[..., Dataset], DatasetInfo]] = {}


def register(info: DatasetInfo, factory: Callable[..., Dataset]) -> None:
    """Add a dataset to the registry (used by the tabular and image modules)."""
    REGISTRY[info.name] = (factory, info)


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
