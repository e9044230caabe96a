"""The training loop: one :func:`step`, one :func:`fit`, for ``cnf train``, ``cnf.CNFDensity`` and
every benchmark.

An iteration: draw the batch for ``(seed, iteration)``; every ``adapt_every`` iterations (and
early in a solving phase that follows flow matching) let the step adapter check the training
solver on it (objectives that solve); the objective's loss, backward, gradient clipping, a check
that loss and gradient are finite, the optimizer and schedule steps; every ``eval_every``
iterations the validation NLL with the evaluation solver.
What the caller does with each iteration's log row and each evaluation (write a log and
checkpoints, keep the best weights in memory) it says in :class:`Hooks`.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cnf.adaptation import start_step
from cnf.data import Dataset
from cnf.runtime import to_tensors
from cnf.seeds import ADAPT, PROBES, generator, stream_seed
from cnf.solvers import SolverError
from cnf.training.config import TrainConfig
from cnf.training.distributed import SINGLE, Distributed
from cnf.training.objectives import Objective
from cnf.training.state import TrainState
from cnf.training.validation import validate


class Diverged(SolverError):
    """Training failed at ``iteration``: a solve diverged, or the loss or gradient was not
    finite. ``what`` says what happened; the caller adds the ``advice`` that fits its
    situation (:func:`cnf.training.run.train` knows about checkpoints, for one)."""

    def __init__(self, iteration: int, what: str, advice: str = "") -> None:
        super().__init__(f"training diverged at iteration {iteration}: {what}", advice)
        self.iteration, self.what = iteration, what


class Hooks:
    """What the caller of :func:`fit` does along the way; the defaults do nothing."""

    def row(self, state: TrainState, row: dict[str, Any]) -> None:
        """After every iteration, with its log row (written before any checkpoint of it)."""

    def evaluated(self, state: TrainState, improved: bool) -> None:
        """After a validation evaluation; ``improved``: it is the best so far."""

    def interrupted(self, state: TrainState, evaluated: bool, signum: int) -> None:
        """Signal ``signum`` asked to stop, after this iteration (``evaluated``: it was an
        evaluation)."""


class KeepBest(Hooks):
    """Keeps, in memory, the weights of the best validation NLL (``weights``), every validation
    score (``scores``, the negated NLLs) and the training CPU seconds (``cpu``, the iterations'
    own): what an estimator or a benchmark that trains through :func:`fit` keeps."""

    def __init__(self) -> None:
        self.weights: dict[str, Tensor] | None = None
        self.scores: list[float] = []
        self.cpu = 0.0

    def row(self, state: TrainState, row: dict[str, Any]) -> None:
        self.cpu += row["cpu"]
        if "val_nll" in row:
            self.scores.append(-row["val_nll"])

    def evaluated(self, state: TrainState, improved: bool) -> None:
        if improved:
            self.weights = {k: v.detach().clone() for k, v in state.weights().items()}

    def restore(self, state: TrainState) -> None:
        """Give the model the best weights (with no validation: the last, averaged if an
        average was kept)."""
        state.model.load_state_dict(self.weights if self.weights is not None else state.weights())


@dataclass(frozen=True)
class FitResult:
    """How :func:`fit` ended: ``stopped`` is ``"done"``, ``"patience"`` (early stopping),
    ``"signal"`` (then ``signal`` is its number) or ``"budget"`` (out of training time)."""

    iteration: int
    stopped: str
    signal: int | None = None


class Engine(nn.Module):
    """The objective's loss as a module's forward, so that DistributedDataParallel can wrap it
    (it averages the gradients over processes during the backward pass)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, objective: Objective, x: Tensor, generator, shard=None, context=None):
        return objective.loss(self.model, x, generator, shard, context)


def step(
    state: TrainState,
    objective: Objective,
    x: Tensor,
    cfg: TrainConfig,
    dist: Distributed = SINGLE,
    engine: nn.Module | None = None,
    context: Tensor | None = None,
) -> dict:
    """One training iteration on the (global) batch ``x``; returns its log row. With several
    processes (``dist``), this one trains on its share of ``x`` through ``engine`` (the model's
    :class:`Engine` in DistributedDataParallel). ``context``: the rows' conditions, for a
    conditional model."""
    model, it = state.model, state.iteration + 1
    engine = engine or Engine(model)
    shard = dist.shard(len(x)) if dist.active else None
    active = objective.at(it)
    row: dict[str, Any] = {"iter": it}
    if active is not objective:  # a phase of several: say which
        row["objective"] = active.name
        if objective.at(it - 1) is not active:
            state.stale = 0  # patience counts within a phase; the best so far stays
    t0, c0 = time.perf_counter(), time.process_time()
    error = None
    try:
        if objective.at(it - 1) is not active:
            _start_phase(state, row)
        if active.adapts and objective.begins(it) == it and _starts_largest(objective, it, cfg):
            row["adapt"] = _enter_solving_phase(state, active, x, cfg, it, dist, context)
        if state.adapter is not None and active.adapts and _checks(objective, it, cfg):
            # Ott et al.: does a finer solver agree on this batch? If not, refine the step.
            rows, seed = _adapt_rows(x, context, cfg), stream_seed(cfg.seed, ADAPT, it)
            metric = _metric(active, model, rows[0], seed, dist, rows[1])
            solver, row["adapt"] = state.adapter.adapt(model.solver, metric)
            model.set_solver(solver)
        loss, logs = engine(active, x, generator(x.device, cfg.seed, PROBES, it), shard, context)
    except SolverError as err:
        error = getattr(err, "problem", str(err))
    error = dist.first_error(error)  # every process stops, with the first failure's message
    if error is not None:
        raise Diverged(it, error)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # under DistributedDataParallel: the gradients averaged over processes
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    # one read from the device for the step's numbers (a sync on a GPU)
    logged = [torch.as_tensor(v).detach().to(loss) for v in logs.values()]
    loss_value, norm, *log_values = torch.stack(
        [loss.detach(), grad_norm.to(loss), *logged]
    ).tolist()
    if not (math.isfinite(loss_value) and math.isfinite(norm)):
        raise Diverged(it, f"loss {loss_value:.4g}, gradient norm {norm:.4g}")
    if cfg.grad_clip and norm > cfg.grad_clip:  # clip_grad_norm_'s scaling, where it scales
        torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm, foreach=True)
    state.optimizer.step()
    state.scheduler.step()
    state.iteration = it
    state.update_average()
    solver = model.solver
    values = dist.mean([loss_value, *log_values])  # the batch's means
    row.update(
        loss=values[0],
        **dict(zip(logs, values[1:], strict=True)),
        **active.counts(model),  # this process's
        grad_norm=norm,
        lr=state.scheduler.get_last_lr()[0],
        step_size=solver.step_size,
        atol=solver.atol,
        rtol=solver.rtol,
        time=time.perf_counter() - t0,
        cpu=time.process_time() - c0,
    )
    return row


def _start_phase(state: TrainState, row: dict) -> None:
    """A phase after the first starts from the last one's best weights (or, with no validation,
    from its average of the weights, if it kept one), and averages its own from there."""
    if state.phase_best is not None:
        state.model.load_state_dict(state.phase_best)
        state.phase_best, row["from_best"] = None, True
    elif state.average is not None:
        state.model.load_state_dict(state.weights())
    state.restart_average()


def _checks(objective: Objective, it: int, cfg: TrainConfig) -> bool:
    """Whether the adapter checks the solver at iteration ``it`` of a phase that solves: every
    ``adapt_every`` iterations, and also 1, 2, 4, ... iterations into the phase. The phase
    starts at the largest step valid for the field it starts from (an untrained one's, or the
    one flow matching made), where a few iterations of maximum likelihood learn to exploit the
    discretization (measured on digits: 36 iterations at one rk4 step trained 1.63 bits/dim
    under that solver, 6.9 under dopri5), so the first checks come early, doubling apart."""
    if it % cfg.adaptation.every == 0:
        return True
    first = objective.begins(it)
    since = it - first
    early = 0 < since < cfg.adaptation.every and since & (since - 1) == 0
    return early and _starts_largest(objective, first, cfg)


def _starts_largest(objective: Objective, first: int, cfg: TrainConfig) -> bool:
    """Whether the phase that begins at iteration ``first`` starts at the largest valid step:
    maximum likelihood after flow matching, or from scratch with a fixed-step solver whose step
    was not given (``--step-size`` is where a run asks to start)."""
    if first > 1:
        return not objective.at(first - 1).adapts
    return cfg.model.solver.fixed_step and cfg.model.solver.step_size is None


def _adapt_rows(x: Tensor, context: Tensor | None, cfg: TrainConfig) -> tuple[Tensor, Any]:
    """The rows of the batch that the adapter's checks score, the first ``adapt_size``, and
    their conditions."""
    size = cfg.adaptation.size or len(x)
    return x[:size], None if context is None else context[:size]


def _metric(active: Objective, model, x: Tensor, seed: int, dist: Distributed, context=None):
    """The adapter's metric; with several processes each scores its share of the rows (shares
    differ by at most one row, and a process may have none when there are fewer rows than
    processes) and every process gets the mean over all of them, the number one process would
    compute, or every process a SolverError when any one's solve failed."""
    if not dist.active:
        return active.metric(model, x, seed, context=context)
    share = dist.share(len(x))
    local = None
    if share.stop > share.start:
        local = active.metric(model, x, seed, shard=(share.start, share.stop), context=context)
    weight = (share.stop - share.start) * dist.world / len(x)  # dist.mean divides by world

    def agreed(solver) -> float:
        value = 0.0
        if local is not None:
            try:
                value = local(solver) * weight
            except SolverError:
                value = math.nan
        value = dist.mean([value])[0]
        if not math.isfinite(value):
            raise SolverError(f"{solver.describe()} failed on one of the processes")
        return value

    return agreed


def _enter_solving_phase(
    state: TrainState,
    active: Objective,
    x: Tensor,
    cfg: TrainConfig,
    it: int,
    dist: Distributed = SINGLE,
    context: Tensor | None = None,
) -> dict[str, Any]:
    """A phase that solves begins (maximum likelihood, from scratch or after flow matching):
    start at the largest step at which the field is valid on this batch (Hairer's step without
    the adapter). From scratch, Hairer's step at the training tolerance is far smaller than the
    field needs (rk4 at h = 0.05, 80 evaluations a solve, on rotating-gaussian, where one step
    of 1.0 agrees with the finer solver), and the adapter refines the step as training needs."""
    model = state.model
    if state.adapter is not None:
        rows = _adapt_rows(x, context, cfg)
        metric = _metric(active, model, rows[0], stream_seed(cfg.seed, ADAPT, it), dist, rows[1])
        model.set_solver(state.adapter.largest_valid(model.solver, metric))
    elif cfg.model.solver.step_size is None:
        given = cfg.model.solver
        start_step(model, x, None, rtol=given.rtol, atol=given.atol, context=context)
    return {"event": "start", "step_size": model.solver.step_size, "atol": model.solver.atol}


def fit(
    state: TrainState,
    data: Dataset,
    objective: Objective,
    cfg: TrainConfig,
    *,
    hooks: Hooks | None = None,
    progress: bool = True,
    quiet: bool = False,
    seconds: float | Callable[[], float | None] | None = None,
    dist: Distributed = SINGLE,
) -> FitResult:
    """Train from ``state.iteration`` to ``cfg.total_iters`` (or until early stopping, a signal,
    or ``seconds`` of training time). SIGINT and SIGTERM stop after the current iteration.

    Arguments:
        state: the model, optimizer and where training stands (changed in place).
        data: the dataset (batches for ``(seed, iteration)``, a validation set).
        objective: the loss (:class:`~cnf.training.objectives.MaximumLikelihood`, ...).
        cfg: the recipe (iterations, batch size, clipping, evaluation, adaptation, patience).
        hooks: what to do with each log row and evaluation (:class:`Hooks`).
        progress: show a progress bar (loss, NFE, it/s, ETA); ``quiet``: no messages either.
        seconds: a training-time budget (the iterations' seconds, the loop's own work
            included, validations and their checkpoints not; CPU seconds on a CPU, where the
            machine may be shared, else wall seconds): the run then stops, validated and
            checkpointed, at the iteration that spends it (``cnf train --budget``'s deadline).
            A callable gives it afresh at each iteration (a deadline that a validation moves:
            :class:`~cnf.training.budget.Deadline`).
        dist: this process's place in a distributed job (:mod:`cnf.training.distributed`):
            each trains on its share of every batch and evaluates its share of the validation
            set; every decision (stop, early stop, divergence) is taken by all together.
    """
    dist.check_batch(cfg.batch_size)
    hooks = hooks or Hooks()
    p = next(state.model.parameters())
    x_val, c_val = to_tensors(data.validation(), p.device, p.dtype)
    say = (lambda text: None) if quiet or not dist.main else _say
    engine = dist.wrap(Engine(state.model))
    has_validation = len(x_val) > 0
    clock = time.process_time if p.device.type == "cpu" else time.perf_counter
    limit = seconds if callable(seconds) else lambda: seconds
    began, aside = clock(), 0.0  # aside: the seconds of validations and their checkpoints
    with (
        _stop_on_signals() as stop,
        tqdm(total=cfg.total_iters, initial=state.iteration, disable=not progress or not dist.main,
             dynamic_ncols=True, desc=f"train {cfg.data}", mininterval=0.5,
             file=sys.stderr) as bar,
    ):  # fmt: skip
        while state.iteration < cfg.total_iters:
            _end_phase_early(state, objective, cfg, say, bar)
            batch = data.train_batch(cfg.batch_size, state.iteration + 1)
            x, c = to_tensors(batch, p.device, p.dtype)
            row = step(state, objective, x, cfg, dist, engine, context=c)
            # one collective call for both (all stop after the same iteration): a signal, and
            # the training's seconds spent (the loop's own work, batches and log, included)
            budget = limit()
            out = budget is not None and clock() - began - aside >= budget
            signum, over = dist.maximum([stop.signal or 0, out])
            signum, over = int(signum), bool(over)
            evaluated = has_validation and (  # and the last weights of a run out of time
                state.iteration % cfg.evaluation_interval == 0
                or state.iteration == cfg.total_iters or over
            )  # fmt: skip
            solves = objective.at(state.iteration).adapts  # flow matching has no solver
            keep = objective.ends(state.iteration) is not None  # a later phase starts from it
            mark = clock()
            improved = evaluated and validate(state, (x_val, c_val), row, say, cfg, dist, solves,
                                              keep, progress=_shown(bar, len(x_val)))  # fmt: skip
            hooks.row(state, row)
            if evaluated:
                hooks.evaluated(state, improved)
                aside += clock() - mark
            best = "-" if math.isinf(state.best) else f"{state.best:.3f}"
            bar.set_postfix(loss=f"{row['loss']:.3f}", nfe=f"{row['nfe']}/{row['nfe_backward']}",
                            best=best, refresh=False)  # fmt: skip
            bar.update()
            last_phase = objective.at(state.iteration) is objective.at(cfg.total_iters)
            if cfg.patience and state.stale >= cfg.patience and last_phase:
                say(f"early stop at iteration {state.iteration}: no better validation NLL in "
                    f"{state.stale} evaluations (--patience)")  # fmt: skip
                return FitResult(state.iteration, "patience")
            if signum:
                hooks.interrupted(state, evaluated, signum)
                return FitResult(state.iteration, "signal", signum)
            if over:
                say(f"iteration {state.iteration}: the training's {budget:.0f} CPU s are spent")
                return FitResult(state.iteration, "budget")
    return FitResult(state.iteration, "done")


def _shown(bar, total: int):
    """Tells the training bar how far a validation NLL has come (it may take a while)."""
    done = [0]

    def update(rows: int) -> None:
        done[0] += rows
        bar.set_postfix_str(f"validation {done[0]:,}/{total:,} rows", refresh=True)

    return update


def _say(text: str) -> None:
    tqdm.write(text, file=sys.stderr)


def _end_phase_early(state: TrainState, objective: Objective, cfg: TrainConfig, say,
                     bar: Any) -> None:  # fmt: skip
    """A phase a later one follows ends when ``patience`` evaluations have not improved on its
    best: the next begins at once, from that phase's best weights (taken where its first
    iteration starts). Checked before each iteration, so a resume ends it where the run did."""
    last = objective.ends(state.iteration + 1)
    if last is None or not cfg.patience or state.stale < cfg.patience:
        return
    say(f"iteration {state.iteration}: no better validation NLL in {state.stale} evaluations "
        f"(--patience): {objective.at(state.iteration + 1).name} ends here, and "
        f"{objective.at(last + 1).name} starts from its best weights")  # fmt: skip
    bar.update(last - state.iteration)
    state.scheduler.last_epoch = last - 1
    state.scheduler.step()  # the learning rate of the next phase's first iteration
    state.iteration = last


class _StopRequest:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current iteration."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum
        signal.signal(signum, signal.default_int_handler)  # a second Ctrl-C stops at once


@contextmanager
def _stop_on_signals() -> Iterator[_StopRequest]:
    stop = _StopRequest()
    try:
        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: no handlers, no clean stop
        previous = {}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
