"""A training run: :func:`setup` (data, model and state, every input checked) and :func:`train`
(a run directory around :func:`~cnf.training.loop.fit`: the log, checkpoints, resume, the
report). Figures are drawn by the caller (:func:`cnf.viz.plot_run`), so this layer never imports
plotting.

``train(TrainConfig.for_data("8gaussians"), "runs/8g")`` fits a flow by maximum likelihood,
evaluates on held-out data every ``eval_every`` iterations, keeps ``best.pt`` and ``last.pt``,
logs every iteration to ``log.jsonl`` and ends with ``report.json`` (test NLL, KL where the truth
is known, the solver-validity verdict). A resumed run ends exactly where an uninterrupted one
would.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnf.adaptation import start_step
from cnf.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cnf.data import Dataset, held_warnings
from cnf.flow import Flow
from cnf.io import json_text, open_append, write_text
from cnf.models import DTYPES, build_model, model_shapes
from cnf.options import ConfigError
from cnf.report import GROWTH, report, used_solver
from cnf.runs import load_run, read_log
from cnf.runtime import check_memory, configure_cuda, configure_threads, resolve_device, to_tensor
from cnf.training import budget, rundir
from cnf.training.config import TrainConfig
from cnf.training.distributed import SINGLE, Distributed, from_environment
from cnf.training.loop import Diverged, FitResult, Hooks, fit
from cnf.training.objectives import Objective
from cnf.training.state import TrainState
from cnf.validity import REFERENCE

# options that a resumed run may change: they steer neither the model nor the data
RESUMABLE = frozenset(
    {
        "finetune_iters",
        "iters",
        "device",
        "threads",
        "lr",
        "max_nfe",
        "grad_clip",
        "patience",
        "eval_every",
        "test_size",
        "validity_size",
        "eval_method",
        "eval_atol",
        "eval_rtol",
        "eval_step_size",
    }
)


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
    if hasattr(data, "check_range"):  # a table's values must fit the model's dtype
        data.check_range(cfg.model.dtype)
    if hasattr(data, "to"):  # image datasets keep their training images on the device
        data = data.to(device)
    dim = math.prod(data.event_shape)
    configure_threads(cfg.threads, device, dim)
    configure_cuda(device, cfg.tf32)
    _check_model_size(cfg, data.meta())
    model = build_model(cfg.model, data.meta()).to(device)
    if hasattr(model, "fit_preprocessing"):  # statistics of the training split only
        model.fit_preprocessing(data.train_data())
    settings = dict(
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        iters=cfg.total_iters,
        schedule=cfg.schedule,
        adapter=cfg.adapter(dim),
        restart=cfg.restart(),
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
    if cfg.model.step_size is None and model.solver.fixed_step:
        x = to_tensor(data.train_batch(cfg.batch_size, 1), device, dtype)
        adapter = cfg.adapter(math.prod(data.event_shape))
        start_step(model, x, adapter, rtol=cfg.model.rtol, atol=cfg.model.atol)


def _check_model_size(cfg: TrainConfig, meta: dict[str, Any]) -> None:
    """The model, its gradients and AdamW's two moments must fit in memory (counted on the meta
    device, before anything is allocated)."""
    count = sum(math.prod(shape) for shape in model_shapes(cfg.model, meta).values())
    nbytes = count * DTYPES[cfg.model.dtype].itemsize * 4
    check_memory(nbytes, f"the model's {count:,} parameters (with their gradients and "
                 "optimizer state)", "choose a smaller model")  # fmt: skip


def _check_report_size(cfg: TrainConfig, data: Dataset) -> None:
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


# --- a run directory -------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a run produced: the directory, the iteration reached, the signal that stopped it
    (if one did), the report (``None`` when stopped early), and the dataset, for figures."""

    out: Path
    iteration: int
    interrupted: int | None
    report: dict[str, Any] | None
    data: Dataset | None = None


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    changes: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    tensorboard: bool = False,
) -> TrainResult:
    """Train a flow on ``cfg.data`` into the run directory ``out``.

    Everything (config, data, model, a resumed checkpoint) is checked before the run directory
    is touched, so a mistake never costs an existing run.

    Arguments:
        cfg: the run's configuration (ignored with ``resume``, which reads the saved one).
        out: the run directory; an existing non-empty one needs ``resume`` or ``force``.
        resume: continue from ``out/last.pt``.
        force: replace an existing run in ``out`` (only a cnf run, and only if it holds nothing
            else: see :mod:`cnf.training.rundir`).
        progress: show a progress bar (loss, NFE, it/s, ETA).
        changes: with ``resume``, new values for options in :data:`RESUMABLE` (more ``iters``,
            a lower ``lr``, ...).
        trust_pickle: allow reading data files that unpickle (the MAF GAS set); never taken from
            a config or a checkpoint.
        tensorboard: also log every row to TensorBoard event files in ``out/tensorboard``.
    """
    out = Path(out)
    if resume and force:
        raise ValueError(
            "--resume and --force contradict each other: --resume continues the run, --force "
            "replaces it; choose one"
        )
    writer = _summary_writer() if tensorboard else None  # a missing package fails first
    if resume and out.is_dir():
        rundir.check_own_files(out, "resume")
        if (out / "log.jsonl").is_file():
            read_log(out / "log.jsonl")  # a damaged log is refused before any work
    ckpt = _resume_checkpoint(out) if resume else None
    if ckpt is not None:
        cfg = _resumed_config(ckpt, changes or {})
    dist = from_environment(cfg.device)
    dist.check_batch(cfg.batch_size)
    if ckpt is None:
        rundir.check_new(out, force=force)
    dist.barrier()  # every process has looked at the directory before rank 0 changes it
    try:
        run = setup(cfg, checkpoint=ckpt, trust_pickle=trust_pickle, dist=dist)
    except CheckpointError as err:
        raise CheckpointError(f"{out / 'last.pt'}: {err}") from err
    _check_report_size(cfg, run.data)
    if ckpt is not None and _finished(run):
        return _finished_result(out, run, dist)
    if ckpt is None and cfg.budget:  # plan the iterations on a copy, then start afresh
        cfg, made = dist.broadcast(budget.plan(cfg, run))  # rank 0's plan, for every process
        if dist.main:
            print(made.describe(), file=sys.stderr)
        run = setup(cfg, data=run.data, dist=dist)
    if dist.main:  # only now, with everything checked, does the directory change
        _prepare_directory(out, cfg, ckpt)
    dist.barrier()
    result = _fit_into(out, run, dist, progress, writer)
    if result.stopped == "signal":
        return TrainResult(out, result.iteration, result.signal, None, run.data)
    return TrainResult(out, result.iteration, None, final_report(out, run, dist), run.data)


def _fit_into(out: Path, run: Setup, dist: Distributed, progress: bool, writer: Any):
    """Train ``run`` with its log and checkpoints in ``out`` (written by rank 0 alone)."""
    tensorboard = None if writer is None or not dist.main else writer(str(out / "tensorboard"))
    recorder = _Recorder(out, run, tensorboard, write=dist.main)
    try:
        with open_append(out / "log.jsonl") if dist.main else contextlib.nullcontext() as log:
            recorder.log = log
            return fit(run.state, run.data, run.objective, run.cfg, hooks=recorder,
                       progress=progress, dist=dist)  # fmt: skip
    except Diverged as err:
        raise _with_advice(err, out, recorder.saved, run.cfg) from err
    finally:
        recorder.close()


class _Recorder(Hooks):
    """The run directory's side of the loop: a log row per iteration, then the checkpoints
    (and, with ``--tensorboard``, the row's numbers as TensorBoard scalars)."""

    def __init__(self, out: Path, run: Setup, tensorboard: Any = None, write: bool = True):
        self.out, self.run, self.tensorboard, self.write = out, run, tensorboard, write
        self.saved: int | None = run.state.iteration if run.state.iteration else None
        self.log: Any = None

    def row(self, state: TrainState, row: dict[str, Any]) -> None:
        if not self.write:  # a process other than rank 0 writes nothing
            return
        # the log row goes first: a kill before the checkpoint leaves an extra row, which the
        # resume drops, never a missing one
        self.log.write(json_text(row) + "\n")
        self.log.flush()
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "iter" and isinstance(value, int | float):
                    self.tensorboard.add_scalar(key, value, row["iter"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def evaluated(self, state: TrainState, improved: bool) -> None:
        if improved:
            self.checkpoint("best.pt")
        self.checkpoint("last.pt")

    def interrupted(self, state: TrainState, evaluated: bool, signum: int) -> None:
        if not evaluated:
            self.checkpoint("last.pt")
        if self.write:
            print(f"{signal.Signals(signum).name}: saved iteration {state.iteration}; continue "
                  f"with cnf train --resume {self.out}", file=sys.stderr)  # fmt: skip

    def checkpoint(self, name: str) -> None:
        if self.write:
            save_checkpoint(self.out / name, self.run.checkpoint())
        if name == "last.pt":
            self.saved = self.run.state.iteration


def _summary_writer() -> Any:
    """TensorBoard's writer class, or a one-line error saying how to get it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(
            "--tensorboard needs the tensorboard package, which cnf does not install by "
            'default: pip install tensorboard (or pip install "cnf[tensorboard]")'
        ) from None
    return SummaryWriter


def _prepare_directory(out: Path, cfg: TrainConfig, ckpt: dict[str, Any] | None) -> None:
    if ckpt is None:
        rundir.create(out)
    else:
        _truncate_log(out / "log.jsonl", ckpt["iteration"])
    write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")


def _resume_checkpoint(out: Path) -> dict[str, Any]:
    if not (out / "last.pt").is_file():
        hint = (
            " (the run stopped before its first checkpoint: start it again with --force)"
            if (out / "config.json").is_file()
            else ""
        )
        raise CheckpointError(f"cannot resume: {out / 'last.pt'} does not exist{hint}")
    return load_checkpoint(out / "last.pt")


def _resumed_config(ckpt: dict[str, Any], changes: dict[str, Any]) -> TrainConfig:
    clash = sorted(set(changes) - RESUMABLE)
    if ckpt["config"].get("objective", "mle") == "mle" and changes.get("finetune_iters"):
        raise ConfigError(
            "finetune_iters", "is the maximum-likelihood phase that follows flow matching, but "
            "this run trains by maximum likelihood throughout (its objective cannot change on a "
            "resume): give --iters to train it longer"
        )  # fmt: skip
    if ckpt["config"].get("finetune_iters") and "iters" in changes:
        raise ConfigError(
            "iters", "is the flow-matching phase of this run, which cannot change when resuming: "
            "give --finetune-iters to change the maximum-likelihood phase after it"
        )  # fmt: skip
    if clash:
        flags = ", ".join("--" + c.replace("_", "-") for c in clash)
        allowed = ", ".join("--" + c.replace("_", "-") for c in sorted(RESUMABLE))
        raise ValueError(
            f"{flags} cannot change when resuming (the saved config is used; these options may: "
            f"{allowed}): start a new run to change them"
        )
    cfg = TrainConfig.from_dict({**ckpt["config"], "model": ckpt["model_args"]}).replace(**changes)
    if cfg.total_iters < ckpt["iteration"]:
        raise ConfigError(
            "iters",
            f"gives {cfg.total_iters} iterations in all, below the {ckpt['iteration']} this "
            "run has already trained: give a larger number to train further",
        )
    return cfg


def _finished(run: Setup) -> bool:
    cfg, state = run.cfg, run.state
    return state.iteration >= cfg.total_iters or bool(cfg.patience and state.stale >= cfg.patience)


def _finished_result(out: Path, run: Setup, dist: Distributed = SINGLE) -> TrainResult:
    """A resume of a run with nothing left to train: its report, made if it is missing."""
    path = out / "report.json"
    if path.is_file():
        if dist.main:
            print(f"the run in {out} has finished (iteration {run.state.iteration}); its "
                  f"report is {path}", file=sys.stderr)  # fmt: skip
        return TrainResult(out, run.state.iteration, None, json.loads(path.read_text()), run.data)
    return TrainResult(out, run.state.iteration, None, final_report(out, run, dist), run.data)


def final_report(out: Path, run: Setup, dist: Distributed = SINGLE) -> dict[str, Any]:
    """Evaluate the best checkpoint on the test data, with the solver-validity verdict, as
    ``cnf eval --validity`` does (each process its share); write ``report.json``."""
    dist.barrier()  # rank 0 has written best.pt
    best = load_run(out / "best.pt", run.device)

    def say(text: str) -> None:
        if dist.main:
            print(f"best.pt (iteration {best.iteration}): {text}", file=sys.stderr)

    shares = dict(share=dist.share, gather=dist.gather) if dist.active else {}
    reference = REFERENCE.replace(atol=run.cfg.validity_tol, rtol=run.cfg.validity_tol)
    checked = used_solver(best.model, best.config)
    result = report(best.model, run.data, n=run.cfg.test_size, validity_n=run.cfg.validity_size,
                    say=say, reference=reference, checked=checked, seed=run.cfg.seed,
                    **shares)  # fmt: skip
    if dist.main:
        write_text(out / "report.json", json_text(result.to_dict(), indent=2) + "\n")
        write_text(out / "summary.txt", result.summary(run.cfg.data) + "\n")
    dist.barrier()  # every process returns once the report is on disk
    return result.to_dict()


def _with_advice(err: Diverged, out: Path, saved: int | None, cfg: TrainConfig) -> Diverged:
    """The divergence with advice that fits: resume from the last checkpoint with a lower
    learning rate, or, with no checkpoint yet (or no step taken), what to change first."""
    lower = f"{cfg.lr / 10:.3g}"
    if err.iteration == 1:  # no optimizer step yet: the learning rate cannot be the cause
        advice = (
            "it failed before the first training step, so the initial model and the setup are "
            "the cause, not the learning rate: check --T, the solver (--method, --step-size, "
            "--max-nfe) and the scale of the data, then start again with --force"
        )
    elif saved is None:
        advice = (
            f"no checkpoint was saved yet (the first comes at iteration "
            f"{min(cfg.eval_every, cfg.total_iters)}): start again with --force and a lower --lr "
            f"(e.g. {lower}), a finer solver or --kinetic/--jacobian regularization"
        )
    else:
        advice = (
            f"the last good checkpoint is {out / 'last.pt'} (iteration {saved}): continue from "
            f"it with a lower learning rate (cnf train --resume {out} --lr {lower}; --max-nfe "
            "can change too), or start a new run with a finer solver or --kinetic/--jacobian "
            "regularization"
        )
    return Diverged(err.iteration, err.what, advice)


def _truncate_log(path: Path, iteration: int) -> None:
    """Drop log rows past the checkpoint (a hard kill can leave some) before a resume, and an
    incomplete last line (the remains of an interrupted write), saying so."""
    if not path.is_file():
        return
    log = read_log(path)
    if log.incomplete:
        print(f"{path}: dropped an incomplete last line ({len(log.incomplete)} characters, the "
              "remains of an interrupted write)", file=sys.stderr)  # fmt: skip
    kept = [line for row, line in zip(log.rows, log.lines, strict=True) if row["iter"] <= iteration]
    write_text(path, "".join(kept))


__all__ = ["RESUMABLE", "FitResult", "Setup", "TrainResult", "final_report", "setup", "train"]
