"""``--log-columns auto``: whether a table's positive columns are modelled on a log scale,
chosen on the validation rows before training.

A log scale suits skewed positive measurements (sizes, areas, concentrations) and harms
others (a total beside its parts lies on a plane, which the log bends): on seeds 0 to 2 it
gains 6.35 nats a row on breast_cancer and costs 1.25 on diabetes (``python
bench/bench_tabular.py --methods cnf "cnf log" "cnf no log" GMM KDE NSF``). So the choice is
made the way any other is: :data:`PILOT_ITERS` iterations of flow matching with each, the same
seed, then the lower validation NLL (the best of :data:`PILOT_EVALUATIONS` evaluations) wins.
The run then trains from scratch with the winner, saved in its config as ``none`` or
``positive``, so that a resume or a rerun needs no choice.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from cnf.data import Dataset
from cnf.training.config import TrainConfig
from cnf.training.distributed import SINGLE, Distributed
from cnf.training.loop import fit
from cnf.training.setup import held_out_outside, setup

PILOT_ITERS = 300  # of flow matching per candidate (fewer if the run itself has fewer)
PILOT_EVALUATIONS = 3


def choose_log_columns(cfg: TrainConfig, data: Dataset, dist: Distributed = SINGLE,
                       say=None) -> TrainConfig:  # fmt: skip
    """``cfg`` with ``log_columns`` ``"auto"`` resolved to ``"none"`` or ``"positive"`` on
    ``data`` (rank 0's choice on every process); any other ``cfg`` as it is. ``say``: told
    the choice and why, in a sentence."""
    table = cfg.model.table
    if table is None or table.log_columns != "auto":
        return cfg
    choice, why = dist.broadcast(_choose(cfg, data))
    if say is not None:
        say(f"--log-columns auto: {choice} ({why})")
    return cfg.replace(log_columns=choice)


def _choose(cfg: TrainConfig, data: Dataset) -> tuple[str, str]:
    train = data.train_data()  # a conditional table's are pairs: their x
    positive = (np.asarray(getattr(train, "x", train)) > 0).all(0)
    if not positive.any():
        return "none", "no column is positive on every training row"
    if held_out_outside(data, positive) is not None:
        return "none", "held-out rows are at or below zero where the training rows are positive"
    if not len(data.validation()):
        return "none", "no validation rows to choose on"
    iters, began = min(PILOT_ITERS, cfg.iters), time.process_time()
    nll = {}
    for option in ("none", "positive"):
        pilot = cfg.replace(log_columns=option, objective="fm", iters=iters, finetune_iters=0,
                            eval_every=max(1, iters // PILOT_EVALUATIONS), patience=0,
                            budget=0)  # fmt: skip
        with torch.random.fork_rng(devices=[]):  # the run's own draws stay as they were
            run = setup(pilot, data=data)
            fit(run.state, data, run.objective, pilot, progress=False, quiet=True)
        nll[option] = run.state.best
    choice = min(nll, key=nll.get)
    return choice, (f"validation NLL after {iters} flow-matching iterations: {nll['positive']:.3f} "
                    f"with the log of {_columns(int(positive.sum()))}, {nll['none']:.3f} "
                    f"without; {time.process_time() - began:.1f} CPU s")  # fmt: skip


def _columns(n: int) -> str:
    return f"{n} positive column{'s' if n != 1 else ''}"
