"""Training: one recipe (:class:`TrainConfig`), one loop (:func:`fit`) for every caller, the
objective as a strategy (:class:`MaximumLikelihood`), and runs on disk (:func:`train`).

    from cnf.training import TrainConfig, train
    train(TrainConfig.for_data("moons", iters=2000), "runs/moons")
"""

from cnf.adaptation import Adaptation
from cnf.options import ConfigError
from cnf.seeds import stream_seed
from cnf.training.config import TrainConfig
from cnf.training.loop import Diverged, FitResult, Hooks, KeepBest, fit, step
from cnf.training.objectives import FlowMatching, MaximumLikelihood, Objective, Phases
from cnf.training.presets import PRESETS
from cnf.training.resume import RESUMABLE
from cnf.training.run import TrainResult, final_report, train
from cnf.training.setup import Setup, setup
from cnf.training.state import TrainState, lr_factor

__all__ = [
    "PRESETS",
    "RESUMABLE",
    "Adaptation",
    "ConfigError",
    "Diverged",
    "FitResult",
    "FlowMatching",
    "Hooks",
    "KeepBest",
    "MaximumLikelihood",
    "Objective",
    "Phases",
    "Setup",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "final_report",
    "fit",
    "lr_factor",
    "setup",
    "step",
    "stream_seed",
    "train",
]
