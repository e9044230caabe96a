"""Checkpoints: one plain dict of data, written atomically, loaded with ``weights_only=True``.

A checkpoint holds the run's config, the dataset's description, the model's and optimizer's state
and the iteration. It never holds code: loading cannot execute anything, and a file that is not a
cnf checkpoint (or is truncated) gets a :class:`CheckpointError` that says so.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "cnf-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit what it is used for."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same directory, flushed
    to disk, then renamed over the target, so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    data = {"format": FORMAT, "version": VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint (tensors on the CPU) and check that it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: expected a file written by `cnf train`")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(
            f"{path} is corrupt or not a cnf checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}); use another checkpoint or retrain"
        ) from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cnf checkpoint (no '{FORMAT}' marker)")
    if data.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is a version {data.get('version')} checkpoint; this cnf reads version "
            f"{VERSION}: use the cnf release that wrote it"
        )
    return data
