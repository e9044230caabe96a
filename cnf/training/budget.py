"""A budget of CPU seconds, planned into iterations: ``cnf train --budget SECONDS``.

The plan times a few iterations of each phase of the recipe (the same data and model, on this
machine) and a validation NLL: ``cnf train``'s first phase of flow matching on the run itself,
which goes on from those iterations (``keep``), the rest on a throwaway copy. For ``cnf train``
the budget is the whole command's (``whole``): what the process has spent so far, the timing
itself, and the report with its figures, estimated as :data:`REPORT_SOLVES` solves of a
validation row each (a table's, at most :data:`REPORT_SPLIT_SOLVES` solves of its test split
and :data:`FIGURES_S`), come off it first. The rest is training and its validation NLLs:
``iters`` (and, after flow matching, ``finetune_iters``) fill their shares of it,
``finetune_share`` for the maximum-likelihood phase. With ``eval_every`` 0 the validation NLLs
are as many as :data:`VALIDATION_SHARE` of the budget pays for (at most 20), set aside before
the iterations; with a fixed ``eval_every`` their number grows with the iterations, so each
iteration is priced with its share of a validation NLL. The plan is made
once, before training, and saved in ``config.json``: the run itself, and its resume, are then
as repeatable as any other (two budget runs on different machines plan different iteration
counts). Only the deadline moves: a :class:`Deadline` holds the training's share, which each
validation NLL of the last phase moves as it prices a toy's report again, and a phase that
costs more than planned stops there.

Maximum likelihood starts at the largest valid step, timed there, and refines the step as the
field sharpens, so its iterations cost more as training goes on: :data:`MLE_COST_AFTER_FM` is
the ratio of their mean cost to the first ones' after flow matching (measured by
``bench/bench_objectives.py``), :data:`MLE_COST_FROM_SCRATCH` from an untrained field.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cnf.evaluate import evaluate
from cnf.runtime import to_tensors
from cnf.seeds import VALIDATION
from cnf.training.config import EVALUATIONS, TrainConfig
from cnf.training.loop import _enter_solving_phase, _starts_largest, step
from cnf.training.objectives import Objective
from cnf.training.state import TrainState
from cnf.training.validation import validation_solver

# Both cost ratios are taken at the low end of what was measured: the deadline
# (Plan.deadline) ends a phase that costs more than planned, while a phase planned too short
# trains its iterations and leaves the rest of the budget unspent.
# Measured on 8gaussians and checkerboard: 1.4 and 2.1 after the ConcatSquash field's flow
# matching, 2.6 and 5.1 after the plain MLP's (bench/bench_speed.py, 120 s, 2 cores at load 4)
MLE_COST_AFTER_FM = 2.0
# 1,000 iterations of cnf train: 3.2 on 8gaussians, 3.8 on checkerboard; 2.8 over 5,658 on
# rotating-gaussian (mean CPU per iteration over the run / the first iterations' at the start).
# At 3.3, --objective mle --budget 60 on 8gaussians once trained all its planned iterations and
# ended at 0.80 of its budget (bench_speed's results at 1e0378b; at da4229b, 1.02)
MLE_COST_FROM_SCRATCH = 2.5
_PROBES = {"fm": 100, "mle": 4}  # iterations timed per phase, at most
PROBE_SHARE = 0.01  # the timing of a phase stops after this share of the budget (3 iterations)
VALIDATION_SHARE = 0.05  # of the budget, at most, for validation NLLs (eval_every 0)
# a trained field's solves cost more than the probe's barely trained one's (validation NFE on
# 8gaussians: ~30 at the start, ~60 at the end)
NFE_GROWTH = 2.0
# the report and its figures, in solves of one validation row: the validity check (the checked
# solver, a finer one and the float64 reference on 2,000 points), the choice of the evaluation
# solver and the test NLL (~10,000 rows for a standard error of 0.01 nats), and the figures (a
# 120 x 120 density grid and 5,000 samples on a toy): python bench/bench_speed.py prints the
# report's and the rest's CPU seconds against what the plan set aside
REPORT_SOLVES = {"toy": 35_000, "tabular": 10_000, "image": 2_000}
# a table's report solves its test split a few times over (the test NLL, the choice of its
# solver, the validity check's three solvers, the float64 reference the costliest), in solves
# of the whole split: wine's and diabetes's reports (18 and 44 test rows, --budget 30) took
# 7.5 and 11 times their last validation NLL's CPU seconds; and the figures draw, besides their
# solves, for about FIGURES_S (1.1 and 1.2 CPU s there). Without this, a table's report was
# planned at 12 CPU s and took 1.4: the run ended at half its budget
REPORT_SPLIT_SOLVES = 12
FIGURES_S = 1.2
TIMED_ROWS = 500  # rows of the solve that times a row
# a toy's report and figures in validation rows of the trained model, which Deadline prices
# them from as training goes (the plan, from a barely trained one, can be off by half: 4.0
# planned against 8.6 for --objective mle --budget 30): 47,600 to 50,000 on 8gaussians (report
# and figures over the last validation NLL's CPU seconds a row; maximum likelihood at 30 and
# 60 s, flow matching then maximum likelihood at 30 s)
REPORT_ROWS_TRAINED = {"toy": 49_000}


@dataclass(frozen=True)
class Plan:
    """What a budget became: the iterations of each phase and what one iteration costs."""

    seconds: float
    iters: int
    finetune_iters: int
    seconds_per_iter: float
    seconds_per_finetune_iter: float
    first: str = "fm"  # the first phase's objective: "fm" or "mle"
    eval_every: int = 0  # the validation interval planned (0: as configured)
    others: dict[str, float] | None = None  # the CPU seconds planned beside training
    kept: int = 0  # the timed iterations that the run goes on from (``plan(keep=True)``)
    rows: tuple = field(default=(), repr=False, compare=False)  # their log rows

    @property
    def deadline(self) -> float | None:
        """The training's CPU seconds at most: its share of a whole command's budget, the
        loop's own work included (``None``: a budget of training alone)."""
        if not self.others:
            return None
        return max(self.seconds - sum(self.others.values()), 0.0)

    def describe(self) -> str:
        timed = f", the first {self.kept} of them the timing's" if self.kept else ""
        text = (f"{self.iters:,} {_kind(self)} iterations ({1e3 * self.seconds_per_iter:.1f} ms "
                f"each{timed})")  # fmt: skip
        if self.finetune_iters:
            text += (f" then {self.finetune_iters:,} maximum-likelihood iterations "
                     f"({1e3 * self.seconds_per_finetune_iter:.0f} ms each)")  # fmt: skip
        if not self.others:
            return f"planned {self.seconds:g} s of training on this machine: {text}"
        other = ", ".join(f"{k} {v:.1f}" for k, v in self.others.items())
        trained = self.seconds - sum(self.others.values())
        if trained <= 0:
            return (f"a budget of {self.seconds:g} CPU s is less than the command needs beside "
                    f"training on this machine ({other}): planned the shortest run, {text}; "
                    "give a larger --budget")  # fmt: skip
        return (f"planned {self.seconds:g} CPU s on this machine: {trained:.0f} s of training, "
                f"{text}; the rest for {other}")  # fmt: skip


class Deadline:
    """A whole budget's training seconds (:attr:`Plan.deadline`), moved by each validation NLL
    of the last phase: the report is priced again from the model being trained (a toy's, as
    :data:`REPORT_ROWS_TRAINED` rows at that validation's CPU seconds a row), and what it costs
    more or less than planned comes off or goes to the training. Other data keep the plan's
    estimate (a table's is a few solves of its test split, as measured on trained models).

    Example:
        >>> from cnf.data import get_dataset
        >>> plan = Plan(30.0, 400, 0, 0.05, 0.0, others={"setup": 4.0, "report": 4.0})
        >>> deadline = Deadline(plan, get_dataset("8gaussians"))  # 22 s of training
        >>> len(get_dataset("8gaussians").validation())
        2000
        >>> deadline.validated(0.3)  # 49,000 rows at 0.15 ms: 7.35 s for the report
        >>> round(deadline(), 2)
        18.65
    """

    def __init__(self, plan: Plan, data) -> None:
        self.seconds = self._planned = plan.deadline
        self._report = (plan.others or {}).get("report", 0.0)
        val = data.validation()
        rows, trained = len(getattr(val, "x", val)), REPORT_ROWS_TRAINED.get(data.kind)
        self._per_cpu = trained / rows if trained and rows else None

    def __call__(self) -> float | None:
        return self.seconds

    def validated(self, cpu: float) -> None:
        """A validation NLL took ``cpu`` seconds: the report's price, and so the training's
        share, follow it."""
        if self._per_cpu is not None and self._planned is not None:
            report = self._per_cpu * cpu
            self.seconds = max(self._planned + self._report - report, 0.0)


def _kind(plan: Plan) -> str:
    return "flow-matching" if plan.first == "fm" else "maximum-likelihood"


def plan(cfg: TrainConfig, setup_run, *, whole: bool = False, spent: float = 0.0,
         keep: bool = False) -> tuple[TrainConfig, Plan]:  # fmt: skip
    """The recipe ``cfg`` with its iterations set for ``cfg.budget`` seconds; ``setup_run`` is a
    fresh :class:`~cnf.training.setup.Setup` of it, which the timing leaves untouched unless
    ``keep``. ``whole``: the budget is the whole command's, of which ``spent`` CPU seconds are
    gone already (``cnf train``); else it is the training's alone (the benchmarks' budgets).
    ``keep``: a first phase that starts as any iteration does (flow matching) is timed on the
    run itself, whose first iterations these then are (``Plan.kept``, with their log rows): the
    run goes on from them (``Setup.checkpoint``) rather than throwing them away."""
    began = time.process_time()
    first = cfg.mle if cfg.objective == "mle" else cfg.fm
    adapter = setup_run.state.adapter
    largest = first.adapts and _starts_largest(first, 1, cfg)
    keep = keep and not largest  # a largest-step start is timed past a step no run takes
    probe = _Probe(setup_run, own=keep)
    if largest:  # from the step the run starts at, with one iteration to get there
        _enter(probe, first, cfg, adapter)
    t_first = _time(probe, first, cfg, _PROBES[first.name])
    if largest and adapter is not None:  # whose steps then refine
        t_first *= MLE_COST_FROM_SCRATCH
    kept, rows = (probe.state.iteration, tuple(probe.rows)) if keep else (0, ())
    if keep:  # from here on, a copy: what it trains is thrown away
        probe = _Probe(setup_run)
        probe.state.iteration = kept
    share = cfg.budget_share
    t_mle = 0.0
    if share > 0:
        mle = cfg.mle
        _enter(probe, mle, cfg, adapter)  # the phase starts at the largest valid step
        t_mle = _time(probe, mle, cfg, _PROBES["mle"]) * MLE_COST_AFTER_FM
    t_val, t_row, t_split = _time_validation(probe, cfg)
    setup_s = spent + time.process_time() - began
    report_s = REPORT_SOLVES.get(setup_run.data.kind, 10_000) * t_row
    if t_split is not None:  # a table's report: its test split, solved a few times
        report_s = min(report_s, REPORT_SPLIT_SOLVES * t_split + FIGURES_S)
    rest = max(cfg.budget - setup_s - report_s, 0.0) if whole else cfg.budget
    # a validation every eval_every iterations costs each iteration its share; eval_every 0:
    # as many as their share of the budget pays for, set aside before training
    every = cfg.eval_every
    evaluations = EVALUATIONS
    if not every and t_val > 0:
        evaluations = max(1, min(EVALUATIONS, math.floor(VALIDATION_SHARE * cfg.budget / t_val)))
        rest = max(rest - evaluations * t_val, 0.0) if whole else rest
    per_val = t_val / every if every and whole else 0.0
    iters = kept + max(1, round((1 - share) * rest / (t_first + per_val)))
    finetune = round(share * rest / (t_mle + per_val)) if share > 0 else 0
    eval_every = every or max(1, math.ceil((iters + finetune) / evaluations))
    others = {}
    if whole:
        count = math.ceil((iters + finetune) / every) if every else evaluations
        others = {"setup and timing": setup_s, "validation": count * t_val, "report": report_s}
    result = Plan(cfg.budget, iters, finetune, t_first, t_mle, first.name, eval_every, others,
                  kept, rows)  # fmt: skip
    return cfg.replace(iters=iters, finetune_iters=finetune, eval_every=eval_every), result


def _time_validation(probe: _Probe, cfg: TrainConfig) -> tuple[float, float, float | None]:
    """CPU seconds of one validation NLL of the run, of a row of a large solve (the report's
    are: the validation rows repeated, 8 then 4 times as many up to :data:`TIMED_ROWS` while a
    solve takes under :data:`PROBE_SHARE` of the budget), and for a table, of a solve of its
    whole test split (``None`` for other data): at the validation solver, on the probe's model
    and scaled by :data:`NFE_GROWTH`."""
    model = probe.state.model
    data = probe.run.data
    x, c = to_tensors(data.validation(), *_where(model))
    if len(x) == 0:
        return 0.0, 0.0, None
    solver = validation_solver(model.eval_solver, cfg.val_tol)

    def seconds(rows: int) -> float:
        index = torch.arange(rows, device=x.device) % len(x)
        start = time.process_time()
        evaluate(model, x[index], seed=cfg.seed, stream=VALIDATION, solver=solver,
                 context=None if c is None else c[index])  # fmt: skip
        return NFE_GROWTH * (time.process_time() - start)

    rows, took = 8, seconds(8)  # then 4 times as many, while that is cheap (an image is not)
    while rows < TIMED_ROWS and took < PROBE_SHARE * cfg.budget:
        rows *= 4
        took = seconds(rows)
    per_row = took / rows
    whole = seconds(len(x)) if len(x) < rows else per_row * len(x)
    if data.kind != "tabular":
        return whole, per_row, None
    test = data.test()
    n = min(len(getattr(test, "x", test)), cfg.test_size)  # the rows the report evaluates
    split = whole if n == len(x) else seconds(n) if n < rows else per_row * n
    return whole, per_row, split


def _where(model) -> tuple:
    p = next(model.parameters())
    return p.device, p.dtype


def _enter(probe: _Probe, objective: Objective, cfg: TrainConfig, adapter) -> None:
    """Start a phase that solves as the run will (the largest valid step, with its adapter),
    counted as an iteration so that the timed ones do not start it again."""
    probe.state.adapter = adapter
    x, c = probe.batch()
    _enter_solving_phase(probe.state, objective, x, cfg, probe.state.iteration + 1, context=c)
    probe.state.adapter = None
    probe.state.iteration += 1


class _Probe:
    """A copy of a run's model and optimizer for timing, what it trains thrown away; or, with
    ``own``, the run's state itself, with the log rows of what it trains."""

    def __init__(self, run, own: bool = False) -> None:
        self.run, cfg = run, run.cfg
        self.rows: list[dict] = []
        if own:
            self.state = run.state
            return
        model = copy.deepcopy(run.model)
        self.state = TrainState.create(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                       iters=cfg.total_iters, schedule=cfg.schedule)  # fmt: skip

    def batch(self) -> tuple[Tensor, Tensor | None]:
        """The next training batch's rows and their conditions (``None``: unconditional)."""
        p = next(self.state.model.parameters())
        batch = self.run.data.train_batch(self.run.cfg.batch_size, self.state.iteration + 1)
        return to_tensors(batch, p.device, p.dtype)


def _time(probe: _Probe, objective: Objective, cfg: TrainConfig, n: int) -> float:
    """Seconds (CPU) of an iteration of ``objective``, its batch included: the lower quintile
    of ``n`` iterations after one warm-up, or fewer (3 at least) once they took
    :data:`PROBE_SHARE` of the budget. Not the mean nor the median: another job's burst inflates
    the CPU seconds of the iterations it overlaps, and the timing is short enough for a burst to
    cover half of it (an estimate too low costs the run its last iterations, to the deadline; too
    high, its unspent seconds). No step-size checks: the adapter's cost is amortized over
    ``adapt_every`` iterations."""
    x, c = probe.batch()
    probe.rows.append(step(probe.state, objective, x, cfg, context=c))
    times: list[float] = []
    while len(times) < n and (len(times) < 3 or sum(times) < PROBE_SHARE * cfg.budget):
        began = time.process_time()  # the batch too, as the loop's deadline counts it
        x, c = probe.batch()
        probe.rows.append(step(probe.state, objective, x, cfg, context=c))
        times.append(time.process_time() - began)
    return sorted(times)[len(times) // 5]
