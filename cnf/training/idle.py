"""The options that would have no effect in a recipe, each with why and the fix: ``cnf train``
and :meth:`~cnf.training.TrainConfig.for_data` refuse them when they are given."""

from __future__ import annotations

from typing import Any

from cnf.data import is_conditional
from cnf.model_config import ModelConfig
from cnf.solvers import FIXED_STEP

TrainConfig = Any  # cnf.training.config.TrainConfig, which imports this module

# fixed-step methods that ignore atol/rtol once they have a step (the implicit Adams methods
# iterate their corrector to the tolerances)
TOLERANCE_FREE = frozenset(FIXED_STEP) - {"implicit_adams", "fixed_adams"}
# what the options that only maximum likelihood uses do, for the refusal under flow matching
ML_ONLY = {
    "finetune_lr": "is the learning rate of maximum likelihood after flow matching",
    "kinetic": "weighs a penalty of maximum-likelihood training",
    "jacobian": "weighs a penalty of maximum-likelihood training",
    "adjoint": "is how maximum likelihood backpropagates through the solver",
    "adapt_every": "steers the step adaptation of maximum-likelihood training",
    "adapt_size": "steers the step adaptation of maximum-likelihood training",
    "adapt_threshold": "steers the step adaptation of maximum-likelihood training",
}
ADAPTER = ("adapt_every", "adapt_size", "adapt_threshold", "max_steps")


def idle_options(cfg: TrainConfig) -> dict[str, str]:
    """The options that have no effect in ``cfg``, each with why and the fix (a sentence that
    follows the option's name)."""
    return {**_idle_solvers(cfg.model), **_idle_adapter(cfg), **_idle_objective(cfg),
            **_idle_budget(cfg), **_idle_condition(cfg)}  # fmt: skip


def _idle_solvers(model: ModelConfig) -> dict[str, str]:
    """Tolerances of a fixed-step solver that has its step (a training step is otherwise
    Hairer's, which the tolerances choose)."""
    idle, solver, check = {}, model.solver, model.eval_solver
    if solver.method in TOLERANCE_FREE and solver.step_size is not None:
        why = (f"has no effect: method {solver.method!r} takes fixed steps from step_size "
               f"{solver.step_size:g} (the tolerances only choose a first step when no step_size "
               "is given): drop it, or choose an adaptive method such as dopri5")  # fmt: skip
        idle.update(atol=why, rtol=why)
    if check.method in TOLERANCE_FREE:
        why = (f"has no effect: eval_method {check.method!r} takes fixed steps of "
               f"eval_step_size {check.step_size:g}: drop it, or choose an adaptive "
               "eval_method such as dopri5")  # fmt: skip
        idle.update(eval_atol=why, eval_rtol=why)
    return idle


def _idle_adapter(cfg: TrainConfig) -> dict[str, str]:
    if cfg.adaptation.on:
        return {}
    why = "has no effect with adapt off (it steers the step adaptation): drop it, or turn adapt on"
    return dict.fromkeys(ADAPTER, why)


def _idle_objective(cfg: TrainConfig) -> dict[str, str]:
    """Under flow matching: the options of maximum likelihood when no phase of it follows, and
    bfloat16 autocast in float64 (the options of flow matching under maximum likelihood are
    refused by the config itself, whatever set them)."""
    if cfg.objective != "fm":
        return {}
    idle = {}
    if cfg.fm.autocast == "bf16" and cfg.model.dtype == "float64":
        idle["autocast"] = ("has no effect with dtype float64: bfloat16 autocast lowers only "
                            "float32 operations: drop it, or train in float32")  # fmt: skip
    fine_tunes = cfg.budget_share > 0 if cfg.budget else cfg.finetune_iters > 0
    if fine_tunes:
        return idle
    phase = "finetune_share above 0" if cfg.budget else "finetune_iters"
    for name, what in ML_ONLY.items():
        idle[name] = (f"has no effect: it {what}, and this run trains by flow matching alone: "
                      f"drop it, or give {phase} for a maximum-likelihood phase after flow "
                      "matching")  # fmt: skip
    return idle


def _idle_budget(cfg: TrainConfig) -> dict[str, str]:
    """The options that a budget plans over, or that only a budget reads."""
    if not cfg.budget:
        return {"finetune_share": "has no effect without a budget, of which it is the share "
                "for maximum likelihood after flow matching: give budget too, or drop it "
                "(finetune_iters sets that phase's length without a budget)"}  # fmt: skip
    why = "has no effect with a budget, which plans the number of iterations to fill it: give "
    idle = {"iters": why + "one or the other",
            "finetune_iters": why + "one or the other (finetune_share splits a budget between "
            "flow matching and maximum likelihood)"}  # fmt: skip
    if cfg.objective == "mle":
        idle["finetune_share"] = ("has no effect under objective mle, for which a budget plans "
                                  "maximum likelihood alone: drop it, or set objective to fm "
                                  "(flow matching, then maximum likelihood)")  # fmt: skip
    return idle


def _idle_condition(cfg: TrainConfig) -> dict[str, str]:
    """The options of conditional models, for data without conditions."""
    if is_conditional(cfg.data, {"target": cfg.target, "condition": cfg.condition}):
        return {}
    why = "has no effect: the data have no conditions (it is for models of p(x | c)): drop it"
    return {"cond_dropout": why, "embed": why}
