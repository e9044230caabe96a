"""A training-time budget, planned into iterations: ``cnf train --budget SECONDS``.

The plan times a few iterations of each phase of the recipe on a throwaway copy of the run
(the same data and model, on this machine), then sets ``iters`` (and, after flow matching,
``finetune_iters``) so that the phases fill their shares of the budget: ``finetune_share`` of
it for the maximum-likelihood phase, the rest for flow matching. The plan is made once, before
training, and saved in ``config.json``: the run itself, and its resume, are then as repeatable
as any other (two budget runs on different machines plan different iteration counts).

A maximum-likelihood iteration after flow matching costs more than one at initialization (the
trained field needs more steps); :data:`MLE_COST_AFTER_FM` is that ratio, measured by
``bench/bench_objectives.py``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

from torch import Tensor

from cnf.runtime import to_tensors
from cnf.training.config import TrainConfig
from cnf.training.loop import _enter_solving_phase, step
from cnf.training.objectives import Objective
from cnf.training.state import TrainState

MLE_COST_AFTER_FM = 1.75  # measured on 8gaussians and checkerboard: 1.4 and 2.1
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
    t_first = _time(probe, first, cfg, _PROBES[first.name])
    share = cfg.budget_share
    t_mle = 0.0
    if share > 0:
        mle = cfg.mle
        probe.state.adapter = setup_run.state.adapter  # the phase starts at the largest valid step
        x, c = probe.batch()
        _enter_solving_phase(probe.state, mle, x, cfg, probe.state.iteration + 1, context=c)
        probe.state.adapter = None
        t_mle = _time(probe, mle, cfg, _PROBES["mle"]) * MLE_COST_AFTER_FM
    iters = max(1, round((1 - share) * cfg.budget / t_first))
    finetune = round(share * cfg.budget / t_mle) if share > 0 else 0
    result = Plan(cfg.budget, iters, finetune, t_first, t_mle, first.name)
    return cfg.replace(iters=iters, finetune_iters=finetune), result


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
