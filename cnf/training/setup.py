"""Setting a run up: the data, the model and its training state, every input checked
(sizes against the machine, a resumed checkpoint against its data) before anything is written."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cnf.adaptation import start_step
from cnf.checkpoint import CheckpointError
from cnf.data import Dataset, held_warnings
from cnf.flow import Flow
from cnf.model_config import DTYPES, TableModel, build_model, model_shapes
from cnf.options import ConfigError
from cnf.report import GROWTH
from cnf.runtime import check_memory, configure_cuda, configure_threads, resolve_device, to_tensors
from cnf.training.config import TrainConfig
from cnf.training.distributed import SINGLE, Distributed
from cnf.training.objectives import Objective
from cnf.training.state import TrainState


@dataclass
class Setup:
    """What a run trains: the device and dtype, the dataset, the model, its training state and
    the objective, all checked."""

    cfg: TrainConfig
    device: torch.device
    dtype: torch.dtype
    data: Dataset
    model: Flow
    state: TrainState
    objective: Objective
    dataset: dict[str, Any] = field(init=False)  # how to reopen the data (DataSpec)
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        spec = self.cfg.dataset_spec()
        # a file's absolute path, so that a checkpoint finds it from any directory
        self.dataset = {**spec.to_dict(), "name": self.data.meta()["name"]}
        self.fingerprint = self.data.fingerprint()

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint of where training stands (the schema: :mod:`cnf.checkpoint`)."""
        return {
            "model_args": self.cfg.model.to_dict(),
            "data": self.data.meta(),
            "dataset": self.dataset,
            "data_fingerprint": self.fingerprint,
            "config": {k: v for k, v in self.cfg.to_dict().items() if k != "model"},
            **self.state.to_checkpoint(),
        }


def setup(
    cfg: TrainConfig,
    *,
    data: Dataset | None = None,
    checkpoint: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    dist: Distributed = SINGLE,
) -> Setup:
    """Open the data (unless given), build the model and its training state, and either start
    it (the training step from Hairer's heuristic where none is set) or bring it to where
    ``checkpoint`` stands, refusing data that changed since. Nothing is written anywhere.
    With several processes (``dist``), each uses its own GPU (``LOCAL_RANK``) on CUDA."""
    device, dtype = resolve_device(cfg.device), DTYPES[cfg.model.dtype]
    if dist.active and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    torch.manual_seed(cfg.seed)
    if data is None:
        with held_warnings():  # a refused run prints its error alone
            data = cfg.dataset_spec().open(trust_pickle=trust_pickle)
            if checkpoint is not None:
                _check_same_data(checkpoint, data)
    data.check_range(cfg.model.dtype)  # a table's values must fit the model's dtype
    data = data.to(device)  # image datasets keep their training images on the device
    dim = math.prod(data.event_shape)
    configure_threads(cfg.threads, device, dim)
    configure_cuda(device, cfg.tf32)
    _check_model_size(cfg, data.meta())
    model = build_model(cfg.model, data.meta()).to(device)
    if model.preprocessed:  # statistics of the training split only
        rows = data.train_data()  # a conditional table's are pairs (x, c)
        if hasattr(rows, "c"):
            model.fit_preprocessing(rows.x, context=rows.c)
        else:
            model.fit_preprocessing(rows)
        _check_support(model, data, (cfg.model.table or TableModel()).log_columns)
    settings = dict(
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        iters=cfg.total_iters,
        schedule=cfg.schedule,
        adapter=cfg.adapter(dim),
        restart=cfg.restart(),
        ema=cfg.ema,
    )
    if checkpoint is None:
        state = TrainState.create(model, **settings)
        _start_step(model, data, cfg, device, dtype)
    else:
        try:
            state = TrainState.from_checkpoint(checkpoint, model, **settings)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            detail = (str(err).strip().splitlines() or [repr(err)])[0][:200]
            raise CheckpointError(f"the checkpoint does not fit its own config ({detail})") from err
    objective = cfg.make_objective()
    objective.check(model)
    return Setup(cfg, device, dtype, data, model, state, objective)


def _start_step(model: Flow, data: Dataset, cfg: TrainConfig, device, dtype) -> None:
    """A fixed-step solver without a step starts at Hairer's step, on the first batch."""
    given = cfg.model.solver
    if given.step_size is None and given.fixed_step:
        x, c = to_tensors(data.train_batch(cfg.batch_size, 1), device, dtype)
        adapter = cfg.adapter(math.prod(data.event_shape))
        start_step(model, x, adapter, rtol=given.rtol, atol=given.atol, context=c)


def _check_model_size(cfg: TrainConfig, meta: dict[str, Any]) -> None:
    """The model, its gradients and AdamW's two moments must fit in memory (counted on the meta
    device, before anything is allocated)."""
    count = sum(math.prod(shape) for shape in model_shapes(cfg.model, meta).values())
    nbytes = count * DTYPES[cfg.model.dtype].itemsize * 4
    check_memory(nbytes, f"the model's {count:,} parameters (with their gradients and "
                 "optimizer state)", "choose a smaller model")  # fmt: skip


def _check_support(model, data: Dataset, log_columns: str = "positive") -> None:
    """Refuse, before training, validation or test rows that a table's log columns (positive on
    every training row) leave outside the model's support: their density would be zero.
    ``log_columns``: the option as configured (``"auto"`` never takes such a log)."""
    normalizer = getattr(model, "normalizer", None)
    if normalizer is None or not normalizer.has_log or log_columns != "positive":
        return
    found = held_out_outside(data, normalizer.log_mask.cpu().numpy())
    if found is not None:
        split, col = found
        name = data.columns[col] if hasattr(data, "columns") else f"column {col}"
        raise ValueError(
            f"{name} is positive on every training row, so --log-columns positive takes its "
            f"log, but the {split} split has rows at or below zero there (density zero): "
            "use --log-columns none"
        )


def held_out_outside(data: Dataset, mask: np.ndarray) -> tuple[str, int] | None:
    """The first held-out split with a row at or below zero in a column of ``mask``, and that
    column; ``None`` if there is none (a conditional table's rows: their ``x``)."""
    for split, rows in (("validation", data.validation()), ("test", data.test())):
        x = np.asarray(getattr(rows, "x", rows), dtype=np.float64)
        if len(x) and (bad := mask & (x <= 0).any(0)).any():
            return split, int(np.flatnonzero(bad)[0])
    return None


def check_report_size(cfg: TrainConfig, data: Dataset) -> None:
    """The report's test samples must fit in memory: checked before training, not after it.
    (A toy draws as many as asked; a table's or image set's test split is what it is.)"""
    if data.kind != "toy":
        return
    row = math.prod(data.event_shape) * 16  # float64 samples, and the model's copy
    for name in ("test_size", "validity_size"):
        n = getattr(cfg, name) * (GROWTH if name == "validity_size" else 1)
        try:
            check_memory(n * row, f"{n:,} test samples", "give a smaller value")
        except ValueError as err:
            raise ConfigError(name, f"{getattr(cfg, name)} is too many: {err}") from None


def _check_same_data(ckpt: dict[str, Any], data: Dataset) -> None:
    meta = data.meta()
    if any(meta.get(k) != v for k, v in ckpt["data"].items()):
        raise CheckpointError(
            f"the checkpoint was trained on {ckpt['data']} but the dataset now gives {meta}: "
            "resume with the same data, or start a new run"
        )
    saved = ckpt.get("data_fingerprint")
    if saved is not None and saved != data.fingerprint():
        raise CheckpointError(
            f"the training data changed since the checkpoint was written (content fingerprint "
            f"{saved[:12]}, now {data.fingerprint()[:12]}): resume with the data the run was "
            "trained on, or start a new run"
        )
