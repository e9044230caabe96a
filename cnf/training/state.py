"""The training state: model, optimizer, schedule, where training stands, and the step adapter;
one seeding scheme; a checkpoint's training part in and out.

Randomness is a function of ``(seed, stream, iteration)`` (:mod:`cnf.seeds`): batches (drawn
by the dataset), Hutchinson probes (``PROBES``) and the adapter's probes (``ADAPT``) do not
depend on what ran before, so a resumed run repeats an uninterrupted one exactly and the state
needs no RNG positions of its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cnf.adaptation import StepAdapter
from cnf.flow import Flow


def lr_factor(
    step: int,
    iters: int,
    schedule: str,
    start: tuple[int, float] = (0, 1.0),
    floor: float = 0.01,
) -> float:
    """The schedule in closed form: ``"cosine"`` from ``start = (step, factor)`` (1 at step 0)
    down to ``floor`` at ``iters`` (and after), or ``"constant"``. A resume that changes
    ``iters`` starts the cosine again from where it stood, so the learning rate never jumps."""
    if schedule == "constant":
        return 1.0
    t0, f0 = start
    progress = 1.0 if iters <= t0 else (min(step, iters) - t0) / (iters - t0)
    return floor + (f0 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainState:
    """Everything that changes during training.

    Attributes:
        model: the flow (it owns the training solver the adapter changes).
        optimizer: AdamW over the model's parameters.
        scheduler: the learning-rate schedule (:func:`lr_factor`).
        adapter: Ott et al.'s step adapter, or ``None`` when the step is fixed.
        iteration: iterations done.
        best: the lowest validation NLL so far; ``stale``: evaluations since it improved.
        phase_best: the weights of the best validation NLL of a phase a later one follows
            (flow matching before maximum likelihood), which that phase starts from.
        ema_decay: with a decay in (0, 1), :attr:`average` holds an exponential moving average
            of the parameters, updated after every step (:meth:`update_average`); it is what
            validation scores and checkpoints give as ``"model"`` (:meth:`weights`).
    """

    model: Flow
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    adapter: StepAdapter | None = None
    iteration: int = 0
    best: float = math.inf
    stale: int = 0
    schedule_start: list = field(default_factory=lambda: [0, 1.0])  # see lr_factor
    phase_best: dict[str, Tensor] | None = None
    ema_decay: float = 0.0
    average: dict[str, Tensor] | None = None
    average_start: int = 0  # the iteration the average (re)started at

    @classmethod
    def create(
        cls,
        model: Flow,
        *,
        lr: float,
        weight_decay: float,
        iters: int,
        schedule: str,
        adapter: StepAdapter | None = None,
        restart: tuple[int, float] | None = None,
        ema: float = 0.0,
    ) -> TrainState:
        """A fresh state: AdamW at ``lr`` on the schedule over ``iters`` iterations; with
        ``restart = (iteration, factor)`` the schedule starts again after that iteration, from
        ``factor * lr`` down to 1% of that (the maximum-likelihood phase after flow matching).
        ``ema``: the decay of an average of the weights (0: none)."""
        # foreach: one kernel per step for all tensors, not one per tensor (the same update)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                      foreach=True)  # fmt: skip
        start = [0, 1.0]  # shared with the schedule, which reads it at every step

        def factor(step: int) -> float:
            if restart is not None and step <= restart[0]:  # the first phase ends at the restart
                return lr_factor(step, restart[0], schedule, tuple(start))
            first = (0, 1.0) if restart is None else restart
            begin = tuple(start) if start[0] > first[0] else first  # a resume moved it later
            return lr_factor(step, iters, schedule, begin, floor=0.01 * first[1])

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        state = cls(model, optimizer, scheduler, adapter, schedule_start=start, ema_decay=ema)
        state.restart_average()
        return state

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], model: Flow, **settings: Any) -> TrainState:
        """A state made as :meth:`create` makes it (``settings``: its keywords), then brought to
        where the checkpoint stands (:meth:`load`)."""
        state = cls.create(model, **settings)
        state.load(ckpt, lr=settings["lr"], iters=settings["iters"], schedule=settings["schedule"])
        return state

    def restart_average(self) -> None:
        """The average starts again from the current parameters (at the start, and where a
        phase starts from the last one's best weights)."""
        if self.ema_decay:
            self.average = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            self.average_start = self.iteration

    def update_average(self) -> None:
        """One step of the average, after an optimizer step. Its decay warms up as
        ``min(decay, (1 + k) / (10 + k))`` over the ``k`` steps since it started, so that a
        short run is not held at its initial weights; a function of the iteration, so a resume
        continues it exactly."""
        if self.average is None:
            return
        k = self.iteration - self.average_start
        decay = min(self.ema_decay, (1 + k) / (10 + k))
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                self.average[name].lerp_(p.detach(), 1 - decay)

    def weights(self) -> dict[str, Tensor]:
        """The weights that are scored and saved: the model's, the average in place of its
        parameters when there is one."""
        weights = dict(self.model.state_dict())
        if self.average is not None:
            weights.update(self.average)
        return weights

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """The model with the averaged parameters inside the block, its own after it."""
        if self.average is None:
            yield
            return
        own = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self.average.items():
                params[name].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in own.items():
                    params[name].copy_(value)

    def record(self, nll: float, keep: bool = False) -> bool:
        """Note a validation NLL; whether it is the best so far. ``keep``: a later phase
        follows this one, and starts from its best weights (:attr:`phase_best`)."""
        improved = nll < self.best
        self.stale = 0 if improved else self.stale + 1
        self.best = min(self.best, nll)
        if improved and keep:
            self.phase_best = {k: v.detach().clone() for k, v in self.weights().items()}
        return improved

    def to_checkpoint(self) -> dict[str, Any]:
        """The training part of a checkpoint (:mod:`cnf.checkpoint` has the whole schema)."""
        solver = self.model.solver
        # the average is "model"; the weights being trained are kept beside it
        averaged: dict[str, Any] = {}
        if self.average is not None:
            averaged["training_model"] = self.model.state_dict()
            averaged["average_start"] = self.average_start
        return {
            "model": self.weights(),
            **averaged,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "solver": {
                "method": solver.method,
                "step_size": solver.step_size,
                "atol": solver.atol,
                "rtol": solver.rtol,
            },
            "iteration": self.iteration,
            "best_val_nll": self.best,
            "stale_evals": self.stale,
            "schedule_start": list(self.schedule_start),
            **({} if self.phase_best is None else {"phase_best": self.phase_best}),
        }

    def load(self, ckpt: dict[str, Any], *, lr: float, iters: int, schedule: str) -> None:
        """Continue from a checkpoint's training part. ``lr`` may differ from the saved one (a
        resume with a lower learning rate keeps the schedule's shape and scales it), and so may
        ``iters`` (the cosine then restarts from the factor it had reached)."""
        self.model.load_state_dict(ckpt.get("training_model", ckpt["model"]))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.model.set_solver(self.model.solver.replace(**ckpt["solver"]))
        self.iteration = ckpt["iteration"]
        self.best, self.stale = ckpt["best_val_nll"], ckpt.get("stale_evals", 0)
        self.schedule_start[:] = ckpt.get("schedule_start", [0, 1.0])
        self.phase_best = ckpt.get("phase_best")
        self.restart_average()  # from the saved average where there is one
        if self.average is not None and "training_model" in ckpt:
            self.average = {n: ckpt["model"][n].clone() for n in self.average}
            self.average_start = ckpt["average_start"]
        saved = ckpt.get("config", {})
        saved_iters = saved.get("iters", iters) + saved.get("finetune_iters", 0)
        if saved_iters != iters:  # go on from the factor the saved schedule had reached
            group = ckpt["optimizer"]["param_groups"][0]
            reached = group["lr"] / group.get("initial_lr", group["lr"])
            self.schedule_start[:] = [self.iteration, reached]
        self.scheduler.base_lrs = [lr for _ in self.scheduler.base_lrs]
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["lr"] = lr, lr * factor
