"""A training-time budget, planned into iterations: ``cnf train --budget SECONDS``.

The plan times a few iterations of each phase of the recipe on a throwaway copy of the run
(the same data and model, on this machine), then sets ``iters`` (and, after flow matching,
``finetune_iters``) so that the phases fill their shares of the budget: ``finetune_share`` of
it for the maximum-likelihood phase, the rest for flow matching. The plan is made once, before
training, and saved in ``config.json``: the run itself, and its resume, are then as repeatable
as any other (two budget runs on different machines plan different iteration counts).

Maximum likelihood starts at the largest valid step, timed there, and refines the step as the
field sharpens, so its iterations cost more as training goes on: :data:`MLE_COST_AFTER_FM` is
the ratio of their mean cost to the first ones' after flow matching (measured by
``bench/bench_objectives.py``), :data:`MLE_COST_FROM_SCRATCH` from an untrained field.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

from torch import Tensor

from cnf.runtime import to_tensors
from cnf.training.config import TrainConfig
from cnf.training.loop import _enter_solving_phase, _starts_largest, step
from cnf.training.objectives import Objective
from cnf.training.state import TrainState

MLE_COST_AFTER_FM = 1.75  # measured on 8gaussians and checkerboard: 1.4 and 2.1
# 1,000 iterations of cnf train: 3.2 on 8gaussians, 3.8 on checkerboard; 2.8 over 5,658 on
# rotating-gaussian (mean CPU per iteration over the run / the first iterations' at the start)
MLE_COST_FROM_SCRATCH = 3.3
_PROBES = {"fm": 100, "mle": 4}  # iterations timed per phase


@dataclass(frozen=True)
class Plan:
    """What a budget became: the iterations of each phase and what one iteration costs."""

    seconds: float
    iters: int
    finetune_iters: int
    seconds_per_iter: float
    seconds_per_finetune_iter: float
    first: str = "fm"  # the first phase's objective: "fm" or "mle"

    def describe(self) -> str:
        text = (
            f"{self.iters:,} {_kind(self)} iterations ({1e3 * self.seconds_per_iter:.1f} ms each)"
        )
        if self.finetune_iters:
            text += (f" then {self.finetune_iters:,} maximum-likelihood iterations "
                     f"({1e3 * self.seconds_per_finetune_iter:.0f} ms each)")  # fmt: skip
        return f"planned {self.seconds:g} s of training on this machine: {text}"


def _kind(plan: Plan) -> str:
    return "flow-matching" if plan.first == "fm" else "maximum-likelihood"


def plan(cfg: TrainConfig, setup_run) -> tuple[TrainConfig, Plan]:
    """The recipe ``cfg`` with its iterations set for ``cfg.budget`` seconds; ``setup_run`` is a
    fresh :class:`~cnf.training.setup.Setup` of it, which the timing leaves untouched."""
    first = cfg.mle if cfg.objective == "mle" else cfg.fm
    probe = _Probe(setup_run)
    adapter = setup_run.state.adapter
    largest = first.adapts and _starts_largest(first, 1, cfg)
    if largest:  # from the step the run starts at, with one iteration to get there
        _enter(probe, first, cfg, adapter)
    t_first = _time(probe, first, cfg, _PROBES[first.name])
    if largest and adapter is not None:  # whose steps then refine
        t_first *= MLE_COST_FROM_SCRATCH
    share = cfg.budget_share
    t_mle = 0.0
    if share > 0:
        mle = cfg.mle
        _enter(probe, mle, cfg, adapter)  # the phase starts at the largest valid step
        t_mle = _time(probe, mle, cfg, _PROBES["mle"]) * MLE_COST_AFTER_FM
    iters = max(1, round((1 - share) * cfg.budget / t_first))
    finetune = round(share * cfg.budget / t_mle) if share > 0 else 0
    result = Plan(cfg.budget, iters, finetune, t_first, t_mle, first.name)
    return cfg.replace(iters=iters, finetune_iters=finetune), result


def _enter(probe: _Probe, objective: Objective, cfg: TrainConfig, adapter) -> None:
    """Start a phase that solves as the run will (the largest valid step, with its adapter),
    counted as an iteration so that the timed ones do not start it again."""
    probe.state.adapter = adapter
    x, c = probe.batch()
    _enter_solving_phase(probe.state, objective, x, cfg, probe.state.iteration + 1, context=c)
    probe.state.adapter = None
    probe.state.iteration += 1


class _Probe:
    """A copy of a run's model and optimizer for timing: what it trains is thrown away."""

    def __init__(self, run) -> None:
        self.run, cfg = run, run.cfg
        model = copy.deepcopy(run.model)
        self.state = TrainState.create(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                       iters=cfg.total_iters, schedule=cfg.schedule)  # fmt: skip

    def batch(self) -> tuple[Tensor, Tensor | None]:
        """The next training batch's rows and their conditions (``None``: unconditional)."""
        p = next(self.state.model.parameters())
        batch = self.run.data.train_batch(self.run.cfg.batch_size, self.state.iteration + 1)
        return to_tensors(batch, p.device, p.dtype)


def _time(probe: _Probe, objective: Objective, cfg: TrainConfig, n: int) -> float:
    """Seconds (CPU) per iteration of ``objective``, over ``n`` iterations after one warm-up
    (no step-size checks: the adapter's cost is amortized over ``adapt_every`` iterations)."""
    x, c = probe.batch()
    step(probe.state, objective, x, cfg, context=c)
    start = time.process_time()
    for _ in range(n):
        x, c = probe.batch()
        step(probe.state, objective, x, cfg, context=c)
    return (time.process_time() - start) / n
