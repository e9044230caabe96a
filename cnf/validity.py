r"""Is a trained CNF a flow? Solver validity reports and step-size adaptation during training.

Ott et al. (2021) showed that a neural ODE trained with too coarse a solver learns to exploit the
solver's error: its accuracy collapses under a finer solver, so it is a discrete model, not an ODE
flow. For a CNF the symptom is a likelihood that depends on the solver.

* :func:`solver_validity` measures it: the test NLL under the training solver, a finer variant
  (half the step, or a tenth of the tolerances) and a reference (dopri5 at atol = rtol = 1e-8 in
  float64), with the same Hutchinson probes for every solver so that estimator noise cancels in
  the differences; plus ``x -> z -> x`` reconstruction errors. **Verdict**: valid iff

  .. math:: |\mathrm{NLL}_\text{train} - \mathrm{NLL}_\text{ref}| \le
      \max(0.01 \cdot D,\ 2\,\mathrm{SE})

  in nats per sample, with :math:`D` the data dimension (so 0.01 nats per dimension) and SE the
  standard error of the paired per-sample differences.
* :class:`StepAdapter` keeps training valid (Ott et al.'s algorithm with the batch NLL as the
  metric): every ``k`` iterations it compares the training solver with a more accurate test solver
  on the current batch; on disagreement it halves the step (at most ``max_steps`` steps), else it
  tries 1.1 times the step and reverts if that disagrees. Adaptive solvers adapt their tolerance
  the same way (test at a tenth of it).
* :func:`hairer_initial_step` gives the starting step for a method of order ``p``.

References:
    Ott, Katiyar, Hennig, Thiele, "ResNet After All? Neural ODEs and Their Numerical Solution",
    ICLR 2021 (arXiv:2007.15386). Hairer, Norsett, Wanner, "Solving Ordinary Differential
    Equations I", 2nd ed., Sec. II.4.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cnf.ode import ODEBlock
from cnf.solvers import Solver

REFERENCE = Solver("dopri5", atol=1e-8, rtol=1e-8, max_nfe=100_000)
NATS_PER_DIM = 0.01


# --- solvers of a model ------------------------------------------------------------------------


def blocks(model: nn.Module) -> list[ODEBlock]:
    """Every ODE block of a model (one for a plain CNF, several for a multiscale flow)."""
    found = [m for m in model.modules() if isinstance(m, ODEBlock)]
    if not found:
        raise TypeError(f"{type(model).__name__} has no ODE blocks: nothing to check")
    return found


def training_solver(model: nn.Module) -> Solver:
    return blocks(model)[0].solver


def set_training_solver(model: nn.Module, solver: Solver) -> None:
    for block in blocks(model):
        block.solver = solver


@contextmanager
def evaluated_with(model: nn.Module, solver: Solver) -> Iterator[nn.Module]:
    """Temporarily make ``solver`` the evaluation solver of every block."""
    saved = [(b, b.eval_solver) for b in blocks(model)]
    try:
        for b, _ in saved:
            b.eval_solver = solver.replace(adjoint=False, seminorm=False)
        yield model
    finally:
        for b, s in saved:
            b.eval_solver = s


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


def initial_step(model: nn.Module, x: Tensor, order: int, rtol: float, atol: float) -> float:
    """Hairer's starting step for the first block of ``model`` on the batch ``x``, in units of
    integration time (the data and log-density state at t = 0), taken in the coordinates the
    block sees (after a tabular model's normalizer). A field that is still zero on the batch
    (a flow initialized at the identity) leaves Hairer's rule nothing to measure (it would
    answer 1e-6); any step integrates it exactly, so the start is then ``T / 8`` and the
    adaptation takes it from there."""
    block = blocks(model)[0]
    estimator = getattr(block, "estimator", None)
    normalizer = getattr(model, "normalizer", None)

    def f(t: float, y: Tensor) -> Tensor:
        tt = torch.as_tensor(t, dtype=y.dtype, device=y.device)
        if estimator is None:
            return block.field(tt, y)
        return estimator(block.field, tt, y, estimator.probe(y)).value

    with torch.no_grad():
        y = x if normalizer is None else normalizer(x)
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
        shrink, grow: the step (or tolerance) factors on disagreement and on agreement.
        min_tol, max_tol: bounds for adaptive solvers' tolerances.
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


def batch_nll_metric(model: nn.Module, x: Tensor, generator_seed: int) -> Callable[[Solver], float]:
    """The metric of :class:`StepAdapter`: the batch NLL (nats) of ``x`` under a solver, with the
    same Hutchinson probes for every solver."""

    def metric(solver: Solver) -> float:
        gen = torch.Generator(device=x.device).manual_seed(generator_seed)
        with torch.no_grad(), evaluated_with(model, solver):
            was = model.training
            model.eval()
            try:
                return -float(model.log_prob(x, generator=gen).double().mean())
            finally:
                model.train(was)

    return metric


# --- validity report -------------------------------------------------------------------------


@dataclass(frozen=True)
class SolverCheck:
    """One solver's numbers in a validity report."""

    solver: str
    nll: float
    nfe: int
    recon_mean: float | None = None
    recon_max: float | None = None


@dataclass(frozen=True)
class ValidityReport:
    """Test NLL under the training solver, a finer one and the float64 reference.

    ``delta_nll = NLL(train) - NLL(reference)`` in nats per sample (``delta_nats_per_dim``,
    ``delta_bits_per_dim`` per dimension); ``valid`` iff ``|delta_nll| <= threshold`` with
    ``threshold = max(0.01 * dim, 2 * se)``.
    """

    train: SolverCheck
    finer: SolverCheck
    reference: SolverCheck
    dim: int
    n: int
    delta_nll: float
    delta_nll_finer: float
    delta_nats_per_dim: float
    delta_bits_per_dim: float
    se: float
    threshold: float
    valid: bool

    @property
    def recon_error(self) -> dict[str, dict[str, float | None]]:
        return {
            "train": {"mean": self.train.recon_mean, "max": self.train.recon_max},
            "reference": {"mean": self.reference.recon_mean, "max": self.reference.recon_max},
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "recon_error": self.recon_error}

    def summary(self) -> str:
        verdict = "VALID" if self.valid else "INVALID"
        return (
            f"{verdict}: NLL {self.train.nll:.4f} under {self.train.solver}, "
            f"{self.reference.nll:.4f} under the reference (delta {self.delta_nll:+.4f} nats, "
            f"{self.delta_nats_per_dim:+.4f} nats/dim, threshold {self.threshold:.4f}); "
            f"x->z->x error {self.train.recon_max:.2e} (train), "
            f"{self.reference.recon_max:.2e} (reference)"
        )


def _log_probs(model: nn.Module, x: Tensor, seed: int, batch: int) -> tuple[Tensor, int]:
    logps, nfes = [], []
    for i, chunk in enumerate(x.split(batch)):
        gen = torch.Generator(device=x.device).manual_seed(seed + i)
        logps.append(model.log_prob(chunk, generator=gen).double())
        nfes.append(model.nfe.forward)
    return torch.cat(logps), round(sum(nfes) / len(nfes))


def _recon(model: nn.Module, x: Tensor, batch: int) -> tuple[float, float]:
    errors = []
    for chunk in x.split(batch):
        z = model.to_latent(chunk).value
        back = model.to_data(z).value
        errors.append((back - chunk).reshape(len(chunk), -1).double().norm(dim=1))
    err = torch.cat(errors)
    return float(err.mean()), float(err.max())


@torch.no_grad()
def _check(
    model: nn.Module, x: Tensor, solver: Solver, seed: int, batch: int, recon: bool
) -> tuple[Tensor, SolverCheck]:
    with evaluated_with(model, solver):
        logp, nfe = _log_probs(model, x, seed, batch)
        errors = _recon(model, x, batch) if recon else (None, None)
    return logp, SolverCheck(solver.describe(), -float(logp.mean()), nfe, *errors)


def solver_validity(
    flow: nn.Module,
    x: Tensor,
    *,
    solver: Solver | None = None,
    reference: Solver = REFERENCE,
    nats_per_dim: float = NATS_PER_DIM,
    seed: int = 0,
    batch_size: int = 1000,
) -> ValidityReport:
    """Check that ``flow`` is a flow: its likelihood must not depend on the solver.

    Arguments:
        flow: a trained CNF (or any model made of ODE blocks with ``log_prob``).
        x: held-out data in the flow's dtype and device.
        solver: the solver to check (default: the flow's training solver).
        reference: the accurate solver, run on a float64 copy of the flow.
        nats_per_dim: the tolerated NLL difference per dimension.
        seed: seeds the Hutchinson probes, the same for every solver.
        batch_size: rows per solve.

    Returns:
        A :class:`ValidityReport`.
    """
    solver = solver or training_solver(flow)
    was = flow.training
    flow.eval()
    try:
        lp_train, train = _check(flow, x, solver, seed, batch_size, recon=True)
        lp_finer, finer = _check(flow, x, solver.finer(), seed, batch_size, recon=False)
        exact = copy.deepcopy(flow).double()
        lp_ref, ref = _check(exact, x.double(), reference, seed, batch_size, recon=True)
    finally:
        flow.train(was)
    dim = math.prod(x.shape[1:])
    diff = lp_ref - lp_train  # per-sample NLL(train) - NLL(ref)
    se = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    delta = float(diff.mean())
    threshold = max(nats_per_dim * dim, 2 * se)
    return ValidityReport(
        train=train, finer=finer, reference=ref, dim=dim, n=len(x), delta_nll=delta,
        delta_nll_finer=float((lp_finer - lp_train).mean()), delta_nats_per_dim=delta / dim,
        delta_bits_per_dim=delta / dim / math.log(2), se=se, threshold=threshold,
        valid=abs(delta) <= threshold,
    )  # fmt: skip
