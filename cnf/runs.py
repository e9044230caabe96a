"""A trained run, reopened: :func:`load_run` is the one place that rebuilds a model from a
checkpoint and reopens its data, for ``cnf eval``, ``sample``, ``animate``, the figures, the
examples and the benchmarks. It needs neither the trainer nor the training recipe: a checkpoint
carries the model's own arguments (:mod:`cnf.checkpoint`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnf.checkpoint import CheckpointError, load_checkpoint
from cnf.data import Dataset, DataSpec
from cnf.data.columns import ColumnPlan, drop_nan_rows, select_columns, to_float
from cnf.data.files import read_table
from cnf.flow import Flow
from cnf.model_config import ModelConfig, build_model, model_shapes
from cnf.runtime import resolve_device


@dataclass
class Run:
    """A trained model (in eval mode) with what it was trained on.

    Attributes:
        path: the checkpoint file.
        model: the flow, on the device asked for.
        model_args: its :class:`~cnf.model_config.ModelConfig`.
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

    def rows(self, path: str | Path) -> np.ndarray:
        """The rows of a ``.csv``/``.npy``/``.npz`` file as the model takes them: the columns it
        was trained on, by name where the file has a header naming them all (else by position,
        the same number of them), the columns it dropped as constant or repeated left out.
        Rows with NaN or inf are refused by number."""
        if self.meta.get("kind") == "image":
            raise ValueError(f"{self.path} models images: scoring rows of a file is for vector "
                             "data (toys and tables)")  # fmt: skip
        table = _read(path)
        names = self.meta.get("all_columns") or self.meta.get("columns")
        width = len(names) if names else math.prod(self.model.event_shape)
        if names and set(names) <= set(table.columns):
            table = select_columns(table, list(names), str(path))
        elif len(table.columns) != width:
            expected = f"columns {', '.join(names)}" if names else f"{width} columns"
            raise ValueError(
                f"{path} has {len(table.columns)} columns but {self.path} models {expected}: "
                "give a file with the same columns (a header naming them, or in the same order)"
            )
        x = drop_nan_rows(to_float(table, str(path)).values, drop=False, source=str(path))
        plan = self.meta.get("plan")
        return ColumnPlan.from_meta(plan).apply(x) if plan else x

    def pairs(self, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
        """The rows ``(x, c)`` of a file for a model of :math:`p(x \\mid c)`: its modelled
        columns and its condition's (a label, or the features), by name where a header names
        them all, else by position (the modelled columns first). Labels must be classes of
        the model; rows with NaN or inf are refused by number."""
        spec, table = self.meta["context"], _read(path)
        width = math.prod(self.model.event_shape)
        modelled = list(self.meta.get("columns") or [f"x{j}" for j in range(width)])
        condition = list(condition_names(spec))
        if set(modelled + condition) <= set(table.columns):
            table = select_columns(table, modelled + condition, str(path))
        elif len(table.columns) != len(modelled) + len(condition):
            raise ValueError(
                f"{path} has {len(table.columns)} columns but {self.path} models "
                f"{', '.join(modelled)} given {', '.join(condition)}: give a file with those "
                "columns (a header naming them, or the modelled ones first, then the condition)"
            )
        rows = drop_nan_rows(to_float(table, str(path)).values, drop=False, source=str(path))
        x, c = rows[:, : len(modelled)], rows[:, len(modelled) :]
        if spec["kind"] == "categorical":
            bad = np.flatnonzero((c[:, 0] != np.round(c[:, 0])) | (c[:, 0] < 0)
                                 | (c[:, 0] >= spec["classes"]))  # fmt: skip
            if len(bad):
                raise ValueError(f"{path}: row {bad[0] + 1} has label {c[bad[0], 0]:g}, not a "
                                 f"class 0..{spec['classes'] - 1} of {self.path}")  # fmt: skip
            c = c[:, 0].astype(np.int64)
        return x, c


def _read(path: str | Path) -> Any:
    """The table of a ``.csv``/``.npy``/``.npz`` file (``file.npz:key`` picks an array)."""
    text, key = str(path), None
    if ".npz:" in text:
        text, key = text.rsplit(":", 1)
    return read_table(Path(text).expanduser(), key)


def condition_names(spec: dict[str, Any]) -> tuple[str, ...]:
    """The names of a conditional model's condition columns (its data's ``context`` meta):
    ``label``, a table's condition columns, or ``c0, c1, ...``."""
    if spec["kind"] == "categorical":
        return ("label",)
    return tuple(spec.get("columns") or [f"c{j}" for j in range(spec["features"])])


def checkpoint_of(path: str | Path) -> Path:
    """The checkpoint a path names: a file as it is; a run directory's ``best.pt``, or its
    ``last.pt`` when the run stopped before its first evaluation (and so has no ``best.pt``)."""
    path = Path(path)
    if not path.is_dir():
        return path
    best, last = path / "best.pt", path / "last.pt"
    return last if not best.exists() and last.is_file() else best


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """Rebuild the model of a checkpoint, or of a run directory's (:func:`checkpoint_of`), in
    eval mode."""
    path = checkpoint_of(path)
    ckpt = load_checkpoint(path)
    try:
        model_args = ModelConfig.from_dict(ckpt["model_args"])
        expected = model_shapes(model_args, ckpt["data"])
        _fill_added(expected, ckpt["model"])
        _check_shapes(expected, ckpt["model"])  # before building
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


# tensors a model gained after checkpoints were written without them, by their last name, with
# what such a checkpoint means: a table normalizer's log columns (none before there were any),
# of the rows and, in a conditional model, of the features
ADDED_TENSORS = {"log_mask": torch.bool}


def _fill_added(expected: dict[str, torch.Size], weights: Any) -> None:
    """Give an older checkpoint's weights the tensors of :data:`ADDED_TENSORS` it lacks (all
    zero: what it was trained with)."""
    if not isinstance(weights, dict):
        return
    for key in set(expected) - set(weights):
        name = key.rsplit(".", 1)[-1]
        if name in ADDED_TENSORS:
            weights[key] = torch.zeros(expected[key], dtype=ADDED_TENSORS[name])


def _check_shapes(expected: dict[str, torch.Size], weights: Any) -> None:
    """The model the arguments describe must have the checkpoint's tensors, found before it is
    built (arguments that say ``hidden [20000, 20000]`` beside small weights would allocate
    gigabytes for an error)."""
    if not isinstance(weights, dict):
        raise TypeError("its model weights are not a state dict")
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise KeyError(f"Missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
    for key, shape in expected.items():
        got = getattr(weights[key], "shape", None)
        if got != shape:
            raise ValueError(
                f"size mismatch for {key}: the model's arguments make {tuple(shape)}, the "
                f"weights are {tuple(got) if got is not None else type(weights[key]).__name__}"
            )


@dataclass(frozen=True)
class RunLog:
    """A run's ``log.jsonl``: its rows (``lines``: their text, newline included) and the text
    of an incomplete last line that was left out (``""``: none), what a kill or a full disk
    leaves in the middle of a write.

    A row covers ``iters`` consecutive iterations up to its ``iter`` (``cnf train
    --log-every``; a log written before that option has a row per iteration and no ``iters``):
    their ``time`` and ``cpu`` summed, their losses, NFE and gradient norms averaged, the
    settings (``lr``, ``step_size``) and the evaluation (``val_nll``, ...) of its last
    iteration (:class:`cnf.training.logrows.LogRows`)."""

    rows: list[dict[str, Any]]
    lines: list[str]
    incomplete: str = ""

    @property
    def iterations(self) -> int:
        """The iterations the rows cover."""
        return sum(row.get("iters", 1) for row in self.rows)

    def total(self, key: str) -> float:
        """The sum of ``key`` over the rows: for ``time`` and ``cpu``, the training's seconds."""
        return math.fsum(row[key] for row in self.rows if key in row)

    def mean(self, key: str) -> float:
        """The mean over iterations of an averaged ``key`` (``loss``, ``nfe``, ...: each row
        weighted by the iterations it covers), over the rows that have it; NaN if none has.
        Seconds a row sums: ``total("time") / iterations``."""
        pairs = [(row[key], row.get("iters", 1)) for row in self.rows if key in row]
        weight = sum(n for _, n in pairs)
        return math.fsum(v * n for v, n in pairs) / weight if weight else math.nan

    def checks(self) -> list[dict[str, Any]]:
        """The step-size checks of the run, in order: each its record (``event``, ``gap``, ...)
        with its ``iter`` and the ``step_size`` and ``atol`` it left."""
        return [check for row in self.rows for check in adaptation_checks(row)]


def adaptation_checks(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The step-size checks of a log row (its ``adapt``: a list, or in a log of a row per
    iteration written before ``--log-every``, one record), each with its ``iter`` and the
    ``step_size`` and ``atol`` it left."""
    checks = row.get("adapt", [])
    if isinstance(checks, dict):  # the row of its one iteration
        solver = {k: row[k] for k in ("step_size", "atol") if k in row}
        checks = [{"iter": row["iter"], **checks, **solver}]
    return checks


def read_log(path: str | Path) -> RunLog:
    """Read a run's log; a line that is not a row (other than an incomplete last one) is an
    error that names the file and the line."""
    path = Path(path)
    lines = path.read_bytes().decode(errors="replace").splitlines(keepends=True)
    rows, kept, incomplete = [], [], ""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = _log_row(line)
        if row is None and number == len(lines) and not line.endswith("\n"):
            incomplete = line
        elif row is None:
            raise ValueError(
                f"{path}, line {number}, is not a log row ({line.strip()[:60]!r}): delete that "
                "line (the rows after it are intact)"
            )
        else:
            rows.append(row)
            kept.append(line.rstrip("\n") + "\n")
    return RunLog(rows, kept, incomplete)


def _log_row(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("iter"), int) else None
