"""``--log-columns auto``: whether a table's positive columns are modelled on a log scale,
chosen by a short pilot of each before training.

A log scale suits skewed positive measurements (sizes, areas, concentrations) and harms
others (a total beside its parts lies on a plane, which the log bends): on seeds 0 to 2 it
gains 6.35 nats a row on breast_cancer and costs 1.25 on diabetes (``python
bench/bench_tabular.py --methods cnf "cnf log" "cnf no log" GMM KDE NSF``). So the choice is
made by likelihood, as Box and Cox chose their power transform: :data:`PILOT_ITERS` iterations
of flow matching with each scale, the same seed, then the lower NLL wins, on the training and
validation rows together (up to :data:`CHOICE_ROWS` of them; each NLL counts its scale's
log-Jacobian, so both are in the data's units). A pilot this short barely fits its training
rows by heart, and the pooled rows rank the two scales with less noise than a small table's 15
to 18 validation rows alone: on the four tables at seeds 0 to 2 the preset takes the scale that
scores better on the test rows on all twelve splits (the same benchmark's "cnf log" and "cnf no
log" columns). The run then trains from scratch with the winner, saved in its config as
``none`` or ``positive``, so that a resume or a rerun needs no choice.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from cnf.data import Dataset
from cnf.evaluate import evaluate
from cnf.runtime import to_tensors
from cnf.seeds import VALIDATION
from cnf.training.config import TrainConfig
from cnf.training.distributed import SINGLE, Distributed
from cnf.training.loop import fit
from cnf.training.setup import held_out_outside, setup
from cnf.training.validation import validation_solver

PILOT_ITERS = 300  # of flow matching per candidate (fewer if the run itself has fewer)
CHOICE_ROWS = 2000  # training rows and validation rows scored, at most


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
    iters, began = min(PILOT_ITERS, cfg.iters), time.process_time()
    nll = {}
    for option in ("none", "positive"):
        pilot = cfg.replace(log_columns=option, objective="fm", iters=iters, finetune_iters=0,
                            eval_every=iters, patience=0,  # one validation, at the end
                            budget=0)  # fmt: skip
        with torch.random.fork_rng(devices=[]):  # the run's own draws stay as they were
            run = setup(pilot, data=data)
            fit(run.state, data, run.objective, pilot, progress=False, quiet=True)
            nll[option] = _pooled_nll(run.state, data, pilot)
    choice = min(nll, key=nll.get)
    return choice, (f"NLL of the training and validation rows after {iters} flow-matching "
                    f"iterations: {nll['positive']:.3f} "
                    f"with the log of {_columns(int(positive.sum()))}, {nll['none']:.3f} "
                    f"without; {time.process_time() - began:.1f} CPU s")  # fmt: skip


def _pooled_nll(state, data: Dataset, cfg: TrainConfig) -> float:
    """The mean NLL of a pilot's (averaged) weights on the validation rows and, up to
    :data:`CHOICE_ROWS` in all, the first training rows (a random subset: the split is), at the
    validation's tolerance. The validation rows' is the pilot's own: ``fit`` validated once,
    at its last iteration, with these weights and this solver (``state.best``)."""
    n_val = len(data.validation())
    total, n = (state.best * n_val, n_val) if n_val else (0.0, 0)
    p = next(state.model.parameters())
    x, c = to_tensors(_head(data.train_data(), max(0, CHOICE_ROWS - n_val)), p.device, p.dtype)
    if len(x):
        solver = validation_solver(state.model.eval_solver, cfg.val_tol)
        with state.averaged(), torch.no_grad():
            ev = evaluate(state.model, x, context=c, solver=solver, seed=cfg.seed,
                          stream=VALIDATION)  # fmt: skip
        total, n = total + ev.nll * len(x), n + len(x)
    return total / n


def _head(rows, n: int):
    """The first ``n`` rows of an array or of pairs."""
    return type(rows)(*(part[:n] for part in rows)) if hasattr(rows, "c") else rows[:n]


def _columns(n: int) -> str:
    return f"{n} positive column{'s' if n != 1 else ''}"
