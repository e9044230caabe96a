"""Checkpoints: one plain dict of data, written atomically, loaded with ``weights_only=True``.

A checkpoint holds the run's config, the dataset's description, the model's and optimizer's state
and the iteration. It never holds code: loading cannot execute anything, and a file that is not a
cnf checkpoint (or is truncated) gets a :class:`CheckpointError` that says so.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch

from cnf.io import write_bytes

FORMAT = "cnf-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit what it is used for."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (:func:`cnf.io.write_bytes`): serialized in
    memory, then a temporary file in the same directory, flushed to disk and renamed over the
    target, so a crash or a full disk never leaves a half-written checkpoint."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buffer)
    write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint (tensors on the CPU) and check that it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: expected a file written by `cnf train`")
    try:
        with warnings.catch_warnings():  # torch warns about the formats it refuses: we say it
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses code; any failure means "not ours"
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path} is corrupt or not a cnf checkpoint ({type(err).__name__}"
            f"{': ' + detail if detail else ''}); use another checkpoint or retrain"
        ) from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cnf checkpoint (no '{FORMAT}' marker)")
    if data.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is a version {data.get('version')} checkpoint; this cnf reads version "
            f"{VERSION}: use the cnf release that wrote it"
        )
    return data
