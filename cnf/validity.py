r"""Is a trained CNF a flow? The solver validity report.

Ott et al. (2021) showed that a neural ODE trained with too coarse a solver learns to exploit the
solver's error: its accuracy collapses under a finer solver, so it is a discrete model, not an ODE
flow. For a CNF the symptom is a likelihood that depends on the solver.

:func:`solver_validity` measures it: the test NLL under the training solver, a finer variant (half
the step, or a tenth of the tolerances) and a reference (dopri5 at atol = rtol = 1e-8 in
float64), with the same Hutchinson probes for every solver so that estimator noise cancels in the
differences; plus ``x -> z -> x`` reconstruction errors.

**Verdict.** The quantity is the mean per-sample difference
:math:`\delta = \mathrm{NLL}_\text{train} - \mathrm{NLL}_\text{ref}` (nats), estimated on test
points with standard error SE; the tolerance is :math:`\tau = 0.01 \cdot D` nats (0.01 per
dimension). The flow is

* **VALID** when the interval :math:`\delta \pm 2\,\mathrm{SE}` lies inside
  :math:`[-\tau, \tau]`,
* **INVALID** when it lies outside it,
* and otherwise the sample grows (doubling, within the points given) until one of the two
  holds; if the points run out first, **UNDECIDED**.

Noise never turns a failure into a pass: a small or noisy sample widens the interval, which can
only make the verdict UNDECIDED, not VALID. (:mod:`cnf.adaptation` keeps training valid.)

References:
    Ott, Katiyar, Hennig, Thiele, "ResNet After All? Neural ODEs and Their Numerical Solution",
    ICLR 2021 (arXiv:2007.15386).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from cnf.evaluate import log_probs, mean_and_se
from cnf.flow import Flow, evaluating
from cnf.seeds import VALIDITY
from cnf.solvers import Solver

REFERENCE = Solver("dopri5", atol=1e-8, rtol=1e-8, max_nfe=100_000)
NATS_PER_DIM = 0.01
Z = 2.0  # half-width of the verdict's interval in standard errors (about 95%)
VALID, INVALID, UNDECIDED = "VALID", "INVALID", "UNDECIDED"
_UNDECIDED = (
    "; undecided: the interval straddles the tolerance on every point there was, so more "
    "points are needed (a larger validity sample, or more test data)"
)


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
    """Test NLL under the checked solver, a finer one and the float64 reference, on ``n`` points.

    ``delta_nll = NLL(checked) - NLL(reference)`` in nats per sample (``delta_nats_per_dim``,
    ``delta_bits_per_dim`` per dimension) with standard error ``se``; ``threshold`` is the
    tolerance ``0.01 * dim``; ``verdict`` is ``"VALID"`` (``delta_nll +- 2 se`` inside
    ``+-threshold``), ``"INVALID"`` (outside it) or ``"UNDECIDED"`` (the interval straddles
    it on every point available); ``valid`` is ``verdict == "VALID"``.
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
    verdict: str
    # the reference's log p of each point checked, and the rows of a solve (their probes), for
    # :func:`loosest_agreeing`; not part of the report's numbers
    reference_logp: Tensor | None = field(default=None, repr=False, compare=False)
    block: int = field(default=1000, repr=False, compare=False)

    @property
    def valid(self) -> bool:
        return self.verdict == VALID

    @property
    def interval(self) -> tuple[float, float]:
        """``delta_nll +- 2 se``: where the true difference lies (about 95%)."""
        return self.delta_nll - Z * self.se, self.delta_nll + Z * self.se

    @property
    def recon_error(self) -> dict[str, dict[str, float | None]]:
        return {
            "train": {"mean": self.train.recon_mean, "max": self.train.recon_max},
            "reference": {"mean": self.reference.recon_mean, "max": self.reference.recon_max},
        }

    def to_dict(self) -> dict[str, Any]:
        numbers = {k: v for k, v in asdict(self).items() if k not in ("reference_logp", "block")}
        return {**numbers, "valid": self.valid, "interval": list(self.interval),
                "recon_error": self.recon_error}  # fmt: skip

    def summary(self) -> str:
        """Two lines: the verdict with its numbers, and the round trip with what it means.

        The verdict is about the density: the likelihood under the training solver against the
        reference. The ``x -> z -> x`` round trip under the training solver is not part of it:
        the model's densities and samples are computed with its evaluation solver, whose round
        trip is the reference's; the training solver's round trip only shows how far its coarse
        steps are from an exact inverse (large near the gaps a flow tears open between modes,
        where the data has little mass).
        """
        low, high = self.interval
        return (
            f"{self.verdict}: NLL {self.train.nll:.4f} under {self.train.solver}, "
            f"{self.reference.nll:.4f} under the reference {self.reference.solver} in float64 "
            f"(delta {self.delta_nll:+.4f} nats, {self.delta_nats_per_dim:+.4f} nats/dim; "
            f"interval [{low:+.4f}, {high:+.4f}] on {self.n} points, tolerance "
            f"±{self.threshold:.4f}{_UNDECIDED if self.verdict == UNDECIDED else ''})\n"
            f"x -> z -> x round trip: mean {self.train.recon_mean:.1e}, max "
            f"{self.train.recon_max:.1e} under {self.train.solver}; mean "
            f"{self.reference.recon_mean:.1e}, max {self.reference.recon_max:.1e} under the "
            "reference. Not part of the verdict, which is about densities (the model's densities "
            "and samples use its evaluation solver unless told otherwise)"
        )


def _double(c: Tensor | None) -> Tensor | None:
    """A condition for the float64 copy of a flow: features in float64, labels as they are."""
    return c.double() if c is not None and c.is_floating_point() else c


def _recon(model: Flow, x: Tensor, c, solver: Solver, block: int, share, gather) -> Tensor:
    """``|x -> z -> x - x|`` per row (given its condition ``c``, or ``None``), in blocks of
    ``block`` rows (each process its share)."""
    errors = [x.new_zeros(0, dtype=torch.float64)]
    for i, chunk in enumerate(x.split(block)):
        part = slice(None) if share is None else share(len(chunk))
        mine = chunk[part]
        condition = {} if c is None else {"context": c[i * block : (i + 1) * block][part]}
        z = model.to_latent(mine, solver=solver, logdet=False, **condition).value  # no trace
        back = model.to_data(z, solver=solver, logdet=False, **condition).value
        error = (back - mine).flatten(1).double().norm(dim=1)
        errors.append(error if gather is None else gather(error))
    return torch.cat(errors)


class _Measured:
    """The per-point numbers of one solver, block by block as the sample grows."""

    def __init__(self, model: Flow, solver: Solver, recon: bool) -> None:
        self.model, self.solver, self.recon = model, solver, recon
        self.logp: list[Tensor] = []
        self.errors: list[Tensor] = []
        self.nfe: list[int] = []

    def add(self, x: Tensor, c, first: int, block: int, seed: int, share, gather,
            progress=None) -> None:  # fmt: skip
        """Rows ``x`` (blocks ``first, first + 1, ...`` of the sample: their probes), with
        their conditions ``c`` (or ``None``)."""
        logp, nfe = log_probs(self.model, x, seed=seed, stream=VALIDITY, first=first,
                              batch_size=block, solver=self.solver, share=share,
                              gather=gather, context=c, progress=progress)  # fmt: skip
        self.logp.append(logp)
        self.nfe.append(nfe)
        if self.recon:
            self.errors.append(_recon(self.model, x, c, self.solver, block, share, gather))

    def check(self) -> tuple[Tensor, SolverCheck]:
        logp = torch.cat(self.logp)
        errors = (None, None)
        if self.recon:
            err = torch.cat(self.errors)
            errors = (float(err.mean()), float(err.max()))
        nfe = round(sum(self.nfe) / len(self.nfe))
        return logp, SolverCheck(self.solver.describe(), -float(logp.mean()), nfe, *errors)


def decide(delta: float, se: float, n: int, threshold: float) -> str:
    """The verdict for a mean difference ``delta`` with standard error ``se`` on ``n`` points:
    VALID or INVALID when ``delta +- 2 se`` is inside or outside ``+-threshold``, UNDECIDED
    while it straddles it (and on fewer than 2 points, with no standard error).

    Example:
        >>> decide(-0.102, 0.052, 60, 0.02), decide(-0.102, 0.01, 2000, 0.02)
        ('UNDECIDED', 'INVALID')
    """
    if n < 2 or not math.isfinite(se):
        return UNDECIDED
    if abs(delta) + Z * se <= threshold:
        return VALID
    if abs(delta) - Z * se > threshold:
        return INVALID
    return UNDECIDED


@torch.no_grad()
def solver_validity(
    flow: Flow,
    x: Tensor,
    *,
    solver: Solver | None = None,
    reference: Solver = REFERENCE,
    nats_per_dim: float = NATS_PER_DIM,
    start: int | None = None,
    seed: int = 0,
    batch_size: int = 1000,
    share: Callable[[int], slice] | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
    context: Tensor | None = None,
    progress: Callable[[int], Any] | None = None,
) -> ValidityReport:
    """Check that ``flow`` is a flow: its likelihood must not depend on the solver.

    The check starts on the first ``start`` points of ``x`` and doubles the sample, within
    ``x``, until the verdict is decided (see the module's docstring).

    Arguments:
        flow: a trained CNF (or any model made of ODE blocks with ``log_prob``).
        x: held-out data in the flow's dtype and device: every point the check may use.
        solver: the solver to check (default: the flow's training solver).
        reference: the accurate solver, run on a float64 copy of the flow.
        nats_per_dim: the tolerated NLL difference per dimension.
        start: the points of the first look (default: all of ``x``).
        seed: seeds the Hutchinson probes, the same for every solver (:mod:`cnf.seeds`).
        batch_size: rows per solve, at most.
        share: in distributed evaluation, this process's rows of a block of ``n``.
        gather: the join of every process's per-point tensors, in rank order: every process
            solves its share and gets the whole sample's report.
        context: each row's condition, for a model of ``p(x | c)``: the check is then of the
            conditional likelihood.
        progress: told the rows of each block once a solver has scored them (three solvers
            score every row).

    Returns:
        A :class:`ValidityReport`.
    """
    solver = solver or flow.solver
    dim = math.prod(x.shape[1:])
    threshold = nats_per_dim * dim
    first = len(x) if start is None else max(1, min(start, len(x)))
    block = math.ceil(first / math.ceil(first / batch_size))  # stages are whole blocks
    exact = copy.deepcopy(flow).double()
    measured = (_Measured(flow, solver, True), _Measured(flow, solver.finer(), False),
                _Measured(exact, reference, True))  # fmt: skip
    done, target = 0, first
    with evaluating(flow):
        while True:
            for m in measured:
                part, c = x[done:target], None if context is None else context[done:target]
                if m.model is not flow:  # the float64 copy
                    part, c = part.double(), _double(c)
                m.add(part, c, done // block, block, seed, share, gather, progress)
            done = target
            (lp_train, train), (lp_finer, finer), (lp_ref, ref) = (m.check() for m in measured)
            diff = lp_ref - lp_train  # per-point NLL(checked) - NLL(reference)
            delta, se = mean_and_se(diff)
            verdict = decide(delta, se, len(diff), threshold)
            if verdict != UNDECIDED or done >= len(x):
                break
            target = min(2 * done, len(x))
    return ValidityReport(
        train=train, finer=finer, reference=ref, dim=dim, n=len(diff), delta_nll=delta,
        delta_nll_finer=float((lp_finer - lp_train).mean()), delta_nats_per_dim=delta / dim,
        delta_bits_per_dim=delta / dim / math.log(2), se=se, threshold=threshold,
        verdict=verdict, reference_logp=lp_ref, block=block,
    )  # fmt: skip


@dataclass(frozen=True)
class Agreement:
    """How far one solver's log-likelihood is from the reference's on the same points."""

    solver: str
    delta: float  # mean of log p(reference) - log p(solver): the NLL's error, nats
    se: float
    agrees: bool


@torch.no_grad()
def loosest_agreeing(
    flow: Flow,
    x: Tensor,
    check: ValidityReport,
    candidates: list[Solver],
    tolerance: float,
    *,
    seed: int = 0,
    share: Callable[[int], slice] | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
    context: Tensor | None = None,
) -> tuple[Solver | None, list[Agreement]]:
    """The first of ``candidates`` (loosest first) whose NLL on the points ``check`` measured
    (the first rows of ``x``, with their probes) is within ``tolerance`` nats of the float64
    reference's: ``|delta| + 2 se <= tolerance``; ``None`` if none is. Each candidate tried
    is in the list returned."""
    if check.reference_logp is None:
        raise ValueError("loosest_agreeing needs a ValidityReport made by solver_validity")
    rows = x[: check.n]
    c = None if context is None else context[: check.n]
    tried = []
    with evaluating(flow):
        for solver in candidates:
            logp, _ = log_probs(flow, rows, seed=seed, stream=VALIDITY, batch_size=check.block,
                                solver=solver, share=share, gather=gather, context=c)  # fmt: skip
            delta, se = mean_and_se(check.reference_logp - logp)
            agrees = math.isfinite(se) and abs(delta) + Z * se <= tolerance
            tried.append(Agreement(solver.describe(), delta, se, agrees))
            if agrees:
                return solver, tried
    return None, tried
