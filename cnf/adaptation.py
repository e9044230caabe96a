r"""Keeping training an ODE flow: Hairer's starting step and Ott et al.'s step adaptation.

* :func:`hairer_initial_step` gives the starting step for a method of order ``p``;
  :func:`initial_step` applies it to a flow's first block on a batch.
* :class:`StepAdapter` keeps training valid (Ott et al.'s algorithm with the batch NLL as the
  metric, :func:`batch_nll_metric`): every ``k`` iterations it compares the training solver with a
  more accurate test solver (:func:`checking_solver`) on the current batch; on disagreement it
  halves the step (at most ``max_steps`` steps), else it tries 1.1 times the step and reverts if
  that disagrees. Adaptive solvers adapt their tolerance the same way (test at a tenth of it).

References:
    Ott, Katiyar, Hennig, Thiele, "ResNet After All? Neural ODEs and Their Numerical Solution",
    ICLR 2021 (arXiv:2007.15386). Hairer, Norsett, Wanner, "Solving Ordinary Differential
    Equations I", 2nd ed., Sec. II.4.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cnf import options
from cnf.flow import Flow, evaluating
from cnf.options import option
from cnf.solvers import Solver
from cnf.trace import RowsOfBatch

# --- Hairer's starting step ------------------------------------------------------------------


def _rms(x: Tensor) -> float:
    return float(x.double().square().mean().sqrt())


def hairer_initial_step(
    func: Callable[[float, Tensor], Tensor],
    t0: float,
    y0: Tensor,
    order: int,
    *,
    rtol: float = 1e-3,
    atol: float = 1e-6,
) -> float:
    r"""Starting step for a method of order ``order`` (Hairer et al., Sec. II.4, algorithm (a)-(f)).

    With :math:`sc = atol + |y_0|\,rtol` and RMS norms of vectors divided by :math:`sc`:
    :math:`d_0 = \|y_0\|`, :math:`d_1 = \|f(t_0, y_0)\|`, :math:`h_0 = 0.01\,d_0/d_1` (or
    :math:`10^{-6}` if either is below :math:`10^{-5}`), an explicit Euler step to :math:`y_1`,
    :math:`d_2 = \|f(t_0 + h_0, y_1) - f(t_0, y_0)\| / h_0`,
    :math:`h_1 = (0.01/\max(d_1, d_2))^{1/(p+1)}` (or :math:`\max(10^{-6}, 10^{-3} h_0)` if both
    are below :math:`10^{-15}`), and the step is :math:`\min(100\,h_0, h_1)`.

    Example:
        >>> h = hairer_initial_step(lambda t, y: -y, 0.0, torch.ones(1), 1, rtol=0.0, atol=1e-3)
        >>> round(h, 6)
        0.003162
    """
    scale = atol + y0.abs() * rtol
    f0 = func(t0, y0)
    d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    f1 = func(t0 + h0, y0 + h0 * f0)
    d2 = _rms((f1 - f0) / scale) / h0
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100 * h0, h1)


def initial_step(
    model: Flow, x: Tensor, order: int, rtol: float, atol: float, context: Tensor | None = None
) -> float:
    """Hairer's starting step for the first block of ``model`` on the batch ``x``, in units of
    integration time (the data and log-density state at t = 0), taken in the coordinates the
    block sees (after a tabular model's normalizer). A field that is still zero on the batch
    (a flow initialized at the identity) leaves Hairer's rule nothing to measure (it would
    answer 1e-6); any step integrates it exactly, so the start is then ``T / 8`` and the
    adaptation takes it from there."""
    block = model.ode_blocks()[0]

    def f(t: float, y: Tensor) -> Tensor:
        tt = torch.as_tensor(t, dtype=y.dtype, device=y.device)
        return block.velocity(tt, y, context=context)

    with torch.no_grad():  # a one-block model's coordinates (a table's are normalized)
        y = model.field_coordinates(x) if len(model.ode_blocks()) == 1 else x
        if _rms(f(0.0, y) / (atol + y.abs() * rtol)) < 1e-5:
            return float(block.T) / 8
        return hairer_initial_step(f, 0.0, y, order, rtol=rtol, atol=atol)


# --- adaptation ------------------------------------------------------------------------------


def checking_solver(solver: Solver, tight: float = 1e-6) -> Solver:
    """The more accurate solver that checks ``solver``: euler -> midpoint at half the step,
    midpoint/heun2 -> rk4 at half the step, order >= 3 fixed-step -> dopri5 at ``tight``
    tolerance, adaptive -> the same method at a tenth of the tolerances."""
    if not solver.fixed_step:
        return solver.finer()
    half = solver.step_size / 2
    if solver.method == "euler":
        return Solver("midpoint", step_size=half, max_nfe=solver.max_nfe)
    if solver.order == 2:
        return Solver("rk4", step_size=half, max_nfe=solver.max_nfe)
    return Solver("dopri5", atol=tight, rtol=tight, max_nfe=solver.max_nfe)


@dataclass
class StepAdapter:
    """Ott et al.'s step adaptation on a metric (the batch NLL) of a solver.

    Arguments:
        threshold: largest acceptable disagreement between the training and the test solver, in
            the metric's units (nats per sample; the trainer uses 0.01 nats per dimension).
        T: integration time, for the step bounds.
        max_steps: the step never falls below ``T / max_steps``.
        shrink: the step (or tolerance) factor on disagreement.
        grow: the step (or tolerance) factor on agreement.
        min_tol: the lowest tolerance an adaptive solver is given.
        max_tol: the highest tolerance an adaptive solver is given.
        tight: tolerance of the dopri5 test solver for high-order fixed-step methods.
    """

    threshold: float
    T: float = 1.0
    max_steps: int = 500
    shrink: float = 0.5
    grow: float = 1.1
    min_tol: float = 1e-9
    max_tol: float = 1e-1
    tight: float = 1e-6

    def scaled(self, solver: Solver, factor: float) -> Solver:
        """``solver`` with its step (fixed-step) or tolerances (adaptive) times ``factor``,
        clamped to the bounds."""
        if solver.fixed_step:
            step = min(max(solver.step_size * factor, self.T / self.max_steps), self.T)
            return solver.replace(step_size=step)
        tol = lambda v: min(max(v * factor, self.min_tol), self.max_tol)  # noqa: E731
        return solver.replace(atol=tol(solver.atol), rtol=tol(solver.rtol))

    def adapt(self, solver: Solver, metric: Callable[[Solver], float]) -> tuple[Solver, dict]:
        """One check: returns the solver to train with next and a record of what happened
        (``event`` is ``"shrink"``, ``"grow"`` or ``"revert"``)."""
        reference = metric(checking_solver(solver, self.tight))
        gap = abs(metric(solver) - reference)
        record = {"gap": gap, "threshold": self.threshold}
        if gap > self.threshold:
            return self.scaled(solver, self.shrink), {**record, "event": "shrink"}
        trial = self.scaled(solver, self.grow)
        trial_gap = abs(metric(trial) - reference)
        if trial_gap > self.threshold:
            return solver, {**record, "event": "revert", "trial_gap": trial_gap}
        return trial, {**record, "event": "grow", "trial_gap": trial_gap}

    def largest_valid(self, solver: Solver, metric: Callable[[Solver], float]) -> Solver:
        """The largest step (or loosest tolerance) in halvings from the largest allowed (one
        step over ``T``, or ``max_tol``) at which ``solver`` agrees with its checking solver:
        where training by maximum likelihood starts from a field trained otherwise (a few
        forward solves, no gradients)."""
        trial = self.scaled(solver, math.inf)
        references: list[tuple[Solver, float]] = []  # a fixed-step method's is the same dopri5

        def reference(s: Solver) -> float:
            check = checking_solver(s, self.tight)
            for known, value in references:
                if known == check:
                    return value
            references.append((check, metric(check)))
            return references[-1][1]

        for _ in range(64):
            gap = abs(metric(trial) - reference(trial))
            smaller = self.scaled(trial, self.shrink)
            if gap <= self.threshold or smaller == trial:
                return trial
            trial = smaller
        return trial


@dataclass(frozen=True)
class Adaptation:
    """How a trainer keeps its model an ODE flow (Ott et al. 2021): every ``every`` iterations,
    the training step (or tolerance) is checked against a finer solver and adapted so that the
    two agree within ``threshold`` nats per dimension. Half the validity report's 0.01: the
    grow-and-revert rule keeps the step near its threshold, and the report should pass with
    margin (euler adapted at 0.01 ended 0.0106 nats/dim off on test data)."""

    on: bool = option(
        True,
        "adapt the training step (or tolerance) so a finer solver agrees (Ott et al. 2021)",
    )
    every: int = option(
        50,
        "iterations between step-size checks (and 1, 2, 4, ... after a switch from flow matching "
        "to maximum likelihood)",
    )
    size: int = option(
        0,
        "training rows each step-size check scores, the first of the batch (0: all; each check "
        "solves them with a fine reference solver)",
    )
    threshold: float = option(
        0.005,
        "tolerated NLL difference from the finer solver, nats per dimension",
    )
    max_steps: int = option(500, "the adapted step never falls below T / max_steps")

    def __post_init__(self) -> None:
        options.finite_floats(self)
        options.booleans(self)
        options.integer("every", self.every, 1, "a positive integer")
        options.integer("max_steps", self.max_steps, 1, "a positive integer")
        options.integer("size", self.size, 0, "an integer >= 0 (0: all rows)")
        options.number("threshold", self.threshold, strict=False)

    def adapter(self, dim: int, T: float) -> StepAdapter | None:
        """The adapter for ``dim``-dimensional data and integration time ``T`` (``None``
        when off)."""
        if not self.on:
            return None
        return StepAdapter(self.threshold * dim, T=T, max_steps=self.max_steps)


def batch_nll_metric(
    model: Flow,
    x: Tensor,
    generator_seed: int,
    shard: tuple[int, int] | None = None,
    reduce: Callable[[float], float] | None = None,
    *,
    context: Tensor | None = None,
) -> Callable[[Solver], float]:
    """The metric of :class:`StepAdapter`: the batch NLL (nats) of ``x`` under a solver, in eval
    mode, with the same Hutchinson probes for every solver. In distributed training each
    process scores its ``shard = (start, stop)`` of the batch and ``reduce`` averages them, so
    every process takes the same decision. ``context``: each row's condition, for a model of
    ``p(x | c)``."""

    def metric(solver: Solver) -> float:
        gen = torch.Generator(device=x.device).manual_seed(generator_seed)
        probes, xs, cs = None, x, context
        if shard is not None:
            probes, xs = RowsOfBatch(gen, shard[0], len(x)), x[shard[0] : shard[1]]
            cs = None if context is None else context[shard[0] : shard[1]]
        condition = {} if cs is None else {"context": cs}
        with torch.no_grad(), evaluating(model):
            logp = model.log_prob(xs, generator=gen, solver=solver, probes=probes, **condition)
        value = -float(logp.double().mean())
        return value if reduce is None else reduce(value)

    return metric


def start_step(
    model: Flow,
    x: Tensor,
    adapter: StepAdapter | None,
    *,
    rtol: float,
    atol: float,
    context: Tensor | None = None,
) -> None:
    """Start a fixed-step training solver at Hairer's step for its order, measured on the batch
    ``x`` (clamped to the adapter's bounds); adaptive solvers are left as they are."""
    solver = model.solver
    if not solver.fixed_step:
        return
    h = initial_step(model, x, solver.order, rtol=rtol, atol=atol, context=context)
    solver = solver.replace(step_size=h)
    model.set_solver(adapter.scaled(solver, 1.0) if adapter else solver)
