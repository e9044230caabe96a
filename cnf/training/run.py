"""A training run: :func:`train`, a run directory around :func:`~cnf.training.loop.fit` (the
log, the checkpoints, the report), on what :func:`~cnf.training.setup.setup` made, continued by
a resume (:mod:`cnf.training.resume`). Figures are drawn by the caller
(:func:`cnf.viz.plot_run`), so this layer never imports plotting.

``train(TrainConfig.for_data("8gaussians"), "runs/8g")`` fits a flow by maximum likelihood,
evaluates on held-out data every ``eval_every`` iterations, keeps ``best.pt`` and ``last.pt``,
logs to ``log.jsonl`` a row per ``log_every`` iterations (about 1,000 rows a run by default:
:mod:`cnf.training.logrows`) and ends with ``report.json`` (test NLL, KL where the truth is
known, the solver-validity verdict). A resumed run ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnf.checkpoint import CheckpointError, save_checkpoint
from cnf.data import Dataset
from cnf.io import json_text, open_append, write_text
from cnf.report import report, used_solver
from cnf.runs import RunLog, load_run, read_log
from cnf.training import budget, rundir
from cnf.training.choice import choose_log_columns
from cnf.training.config import TrainConfig
from cnf.training.distributed import SINGLE, Distributed, from_environment
from cnf.training.logrows import LogRows, log_interval
from cnf.training.loop import Diverged, Hooks, fit
from cnf.training.resume import last_checkpoint, resumed_config, truncate_log
from cnf.training.setup import Setup, check_report_size, setup
from cnf.training.state import TrainState
from cnf.validity import REFERENCE


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
    log = None
    if resume and out.is_dir():
        rundir.check_own_files(out, "resume")
        if (out / "log.jsonl").is_file():
            log = read_log(out / "log.jsonl")  # a damaged log is refused before any work
    ckpt = last_checkpoint(out) if resume else None
    if ckpt is not None:
        cfg = resumed_config(ckpt, changes or {})
    dist = from_environment(cfg.device)
    dist.check_batch(cfg.batch_size)
    if ckpt is None:
        rundir.check_new(out, force=force)
    dist.barrier()  # every process has looked at the directory before rank 0 changes it
    try:
        run = setup(cfg, checkpoint=ckpt, trust_pickle=trust_pickle, dist=dist)
    except CheckpointError as err:
        raise CheckpointError(f"{out / 'last.pt'}: {err}") from err
    check_report_size(cfg, run.data)
    if ckpt is None:  # --log-columns auto: chosen here, saved as chosen (none or positive)
        say = (lambda text: print(text, file=sys.stderr)) if dist.main else None  # as fit's
        chosen = choose_log_columns(cfg, run.data, dist, say)
        if chosen is not cfg:
            cfg, run = chosen, setup(chosen, data=run.data, dist=dist)
    if ckpt is not None and _finished(run):
        return _finished_result(out, run, dist)
    deadline, kept_rows = None, ()
    if ckpt is None and cfg.budget:  # plan the iterations, then train them
        if dist.main and progress:
            print(f"timing the recipe for a budget of {cfg.budget:g} CPU s on this machine",
                  file=sys.stderr)  # fmt: skip
        # one process goes on from the timed iterations; several start afresh, as one
        made = budget.plan(cfg, run, whole=True, spent=time.process_time(), keep=not dist.active)
        cfg, made = dist.broadcast(made)  # rank 0's plan, for every process
        if dist.main:
            print(made.describe(), file=sys.stderr)
        timed = run.checkpoint() if made.kept else None
        run = setup(cfg, data=run.data, dist=dist, checkpoint=timed)
        kept_rows = _as_logged(made.rows, run.objective)
        # one process: its validations price the report again (several: each sees its share)
        deadline = made.deadline if dist.active else budget.Deadline(made, run.data)
    if dist.main:  # only now, with everything checked, does the directory change
        _prepare_directory(out, cfg, ckpt, log)
    dist.barrier()
    result = _fit_into(out, run, dist, progress, writer, deadline, kept_rows)
    if result.stopped == "signal":
        return TrainResult(out, result.iteration, result.signal, None, run.data)
    return TrainResult(out, result.iteration, None, final_report(out, run, dist, progress),
                       run.data)  # fmt: skip


def _as_logged(rows: tuple, objective) -> tuple:
    """The timing's rows as the loop logs its own: with the phase's name where there are
    several (the timing trains the first alone)."""
    if objective.at(1) is objective:
        return rows
    return tuple({"iter": r["iter"], "objective": objective.at(r["iter"]).name, **r} for r in rows)


def _fit_into(out: Path, run: Setup, dist: Distributed, progress: bool, writer: Any,
              deadline: float | budget.Deadline | None = None,
              kept_rows: tuple = ()):  # fmt: skip
    """Train ``run`` with its log and checkpoints in ``out`` (written by rank 0 alone), for at
    most ``deadline`` seconds of training (a budget's; a :class:`~cnf.training.budget.Deadline`
    is told the seconds of the last phase's validation NLLs); ``kept_rows``: the log rows of the
    iterations a budget's timing trained (the run starts after them, none of them saved)."""
    tensorboard = None if writer is None or not dist.main else writer(str(out / "tensorboard"))
    moving = deadline if isinstance(deadline, budget.Deadline) else None
    recorder = _Recorder(out, run, tensorboard, write=dist.main, deadline=moving)
    if kept_rows:
        recorder.saved = None  # no checkpoint of them yet
    try:
        with open_append(out / "log.jsonl") if dist.main else contextlib.nullcontext() as log:
            recorder.log = log
            for row in kept_rows:
                recorder.row(run.state, row)
            try:
                return fit(run.state, run.data, run.objective, run.cfg, hooks=recorder,
                           progress=progress, dist=dist, seconds=deadline)  # fmt: skip
            finally:  # what is pending: after a divergence, the iterations up to it
                recorder.flush()
    except Diverged as err:
        raise _with_advice(err, out, recorder.saved, run.cfg) from err
    finally:
        recorder.close()


class _Recorder(Hooks):
    """The run directory's side of the loop: the log, a row per ``log_every`` iterations
    (:class:`~cnf.training.logrows.LogRows`), then the checkpoints (and, with
    ``--tensorboard``, each row's numbers as TensorBoard scalars)."""

    def __init__(self, out: Path, run: Setup, tensorboard: Any = None, write: bool = True,
                 deadline: budget.Deadline | None = None):  # fmt: skip
        self.out, self.run, self.tensorboard, self.write = out, run, tensorboard, write
        self.deadline = deadline  # a budget's, told the last phase's validations
        self.saved: int | None = run.state.iteration if run.state.iteration else None
        self.log: Any = None
        self.rows = LogRows(log_interval(run.cfg.log_every, run.cfg.total_iters), self._ends)

    def _ends(self, it: int) -> bool:
        """Whether the run or a phase ends at iteration ``it`` (so does a log row)."""
        return it == self.run.cfg.total_iters or self.run.objective.ends(it) == it

    def _last_phase(self, it: int) -> bool:
        """Whether iteration ``it`` trains the last phase: the model the report will solve
        (flow matching's field, before maximum likelihood regularizes it, solves at a
        different cost)."""
        objective = self.run.objective
        return objective.at(it) is objective.at(self.run.cfg.total_iters)

    def row(self, state: TrainState, row: dict[str, Any]) -> None:
        if self.deadline is not None and "val_cpu" in row and self._last_phase(row["iter"]):
            self.deadline.validated(row["val_cpu"])
        if self.write:  # a process other than rank 0 writes nothing
            self._write(self.rows.add(row))

    def flush(self) -> None:
        """Write the row of the iterations held (the log rows go first: a kill before the
        checkpoint leaves an extra row, which the resume drops, never a missing one)."""
        if self.write:
            self._write(self.rows.flush())

    def _write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.log.write(json_text(row) + "\n")
            self.log.flush()
            if self.tensorboard is not None:
                for key, value in row.items():
                    if key not in ("iter", "iters") and isinstance(value, int | float):
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
        self.flush()  # the log on disk covers the checkpoint's iterations, no more
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


def _prepare_directory(
    out: Path, cfg: TrainConfig, ckpt: dict[str, Any] | None, log: RunLog | None
) -> None:
    if ckpt is None:
        rundir.create(out)
    elif log is not None:
        truncate_log(out / "log.jsonl", log, ckpt["iteration"])
    write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")


def _finished(run: Setup) -> bool:
    cfg, state = run.cfg, run.state
    stopped = bool(cfg.patience and state.stale >= cfg.patience)  # early, in the last phase
    last_phase = run.objective.ends(state.iteration + 1) is None
    return state.iteration >= cfg.total_iters or (stopped and last_phase)


def _finished_result(out: Path, run: Setup, dist: Distributed = SINGLE) -> TrainResult:
    """A resume of a run with nothing left to train: its report, made if it is missing."""
    path = out / "report.json"
    if path.is_file():
        if dist.main:
            print(f"the run in {out} has finished (iteration {run.state.iteration}); its "
                  f"report is {path}", file=sys.stderr)  # fmt: skip
        return TrainResult(out, run.state.iteration, None, json.loads(path.read_text()), run.data)
    return TrainResult(out, run.state.iteration, None, final_report(out, run, dist),
                       run.data)  # fmt: skip


def final_report(out: Path, run: Setup, dist: Distributed = SINGLE,
                 progress: bool = False) -> dict[str, Any]:  # fmt: skip
    """Evaluate the best checkpoint on the test data, with the solver-validity verdict, as
    ``cnf eval --validity`` does (each process its share, progress bars on rank 0's stderr);
    write ``report.json``."""
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
                    progress=progress and dist.main, se=run.cfg.report_se or None,
                    **shares)  # fmt: skip
    if dist.main:
        numbers = {"iteration": best.iteration, **result.to_dict()}
        write_text(out / "report.json", json_text(numbers, indent=2) + "\n")
        write_text(out / "summary.txt", result.summary(run.cfg.data) + "\n")
    dist.barrier()  # every process returns once the report is on disk
    return {"iteration": best.iteration, **result.to_dict()}


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
            f"{min(cfg.evaluation_interval, cfg.total_iters)}): start again with --force and a "
            f"lower --lr (e.g. {lower}), a finer solver or --kinetic/--jacobian regularization"
        )
    else:
        advice = (
            f"the last good checkpoint is {out / 'last.pt'} (iteration {saved}): continue from "
            f"it with a lower learning rate (cnf train --resume {out} --lr {lower}; --max-nfe "
            "can change too), or start a new run with a finer solver or --kinetic/--jacobian "
            "regularization"
        )
    return Diverged(err.iteration, err.what, advice)


__all__ = ["TrainResult", "final_report", "train"]
