"""A trained run, reopened: :func:`load_run` is the one place that rebuilds a model from a
checkpoint and reopens its data, for ``cnf eval``, ``sample``, ``animate``, the figures, the
examples and the benchmarks. It needs neither the trainer nor the training recipe: a checkpoint
carries the model's own arguments (:mod:`cnf.checkpoint`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnf.checkpoint import CheckpointError, load_checkpoint
from cnf.data import Dataset, DataSpec
from cnf.flow import Flow
from cnf.models import ModelConfig, build_model
from cnf.runtime import resolve_device


@dataclass
class Run:
    """A trained model (in eval mode) with what it was trained on.

    Attributes:
        path: the checkpoint file.
        model: the flow, on the device asked for.
        model_args: its :class:`~cnf.models.ModelConfig`.
        meta: the dataset's description (kind, shape, columns, ...).
        spec: how to open that dataset again (:meth:`dataset`).
        config: the training recipe, as saved (plain data: for defaults such as ``test_size``).
        iteration: the iteration the checkpoint was saved at.
        fingerprint: the training data's content hash (``None`` in version 1 checkpoints).
    """

    path: Path
    model: Flow
    model_args: ModelConfig
    meta: dict[str, Any]
    spec: DataSpec
    config: dict[str, Any] = field(default_factory=dict)
    iteration: int = 0
    fingerprint: str | None = None

    def dataset(self, *, trust_pickle: bool = False, data_dir: str | None = None) -> Dataset:
        """The data the model was trained on, opened as it was (a table's file by its absolute
        path, from any directory); ``data_dir`` where a dataset's files have moved. Reading a
        format that unpickles needs ``trust_pickle`` from the caller: the checkpoint grants no
        trust."""
        return self.spec.open(trust_pickle=trust_pickle, data_dir=data_dir)


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """Rebuild the model of a checkpoint, or of a run directory's ``best.pt``, in eval mode."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    ckpt = load_checkpoint(path)
    try:
        model_args = ModelConfig.from_dict(ckpt["model_args"])
        model = build_model(model_args, ckpt["data"])
        model.load_state_dict(ckpt["model"])
        model.set_solver(model.solver.replace(**ckpt["solver"]))
        spec = DataSpec(**ckpt["dataset"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
        detail = next(
            (ln for ln in lines if ln.startswith(("size mismatch", "Missing", "Unexp"))), lines[0]
        )
        raise CheckpointError(
            f"{path} does not fit this cnf model ({detail[:300]}): it was written for other data "
            "or by another version"
        ) from err
    model = model.to(resolve_device(device)).eval()
    return Run(
        path,
        model,
        model_args,
        ckpt["data"],
        spec,
        ckpt.get("config", {}),
        ckpt["iteration"],
        ckpt.get("data_fingerprint"),
    )
