r"""Is a trained CNF a flow? The solver validity report.

Ott et al. (2021) showed that a neural ODE trained with too coarse a solver learns to exploit the
solver's error: its accuracy collapses under a finer solver, so it is a discrete model, not an ODE
flow. For a CNF the symptom is a likelihood that depends on the solver.

:func:`solver_validity` measures it: the test NLL under the training solver, a finer variant (half
the step, or a tenth of the tolerances) and a reference (dopri5 at atol = rtol = 1e-8 in
float64), with the same Hutchinson probes for every solver so that estimator noise cancels in the
differences; plus ``x -> z -> x`` reconstruction errors. **Verdict**: valid iff

.. math:: |\mathrm{NLL}_\text{train} - \mathrm{NLL}_\text{ref}| \le
    \max(0.01 \cdot D,\ 2\,\mathrm{SE})

in nats per sample, with :math:`D` the data dimension (so 0.01 nats per dimension) and SE the
standard error of the paired per-sample differences. (:mod:`cnf.adaptation` keeps training valid.)

References:
    Ott, Katiyar, Hennig, Thiele, "ResNet After All? Neural ODEs and Their Numerical Solution",
    ICLR 2021 (arXiv:2007.15386).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from cnf.flow import Flow, evaluating
from cnf.solvers import Solver

REFERENCE = Solver("dopri5", atol=1e-8, rtol=1e-8, max_nfe=100_000)
NATS_PER_DIM = 0.01


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
        """Two lines: the verdict with its numbers, and the round trip with what it means.

        The verdict is about the density: the likelihood under the training solver against the
        reference. The ``x -> z -> x`` round trip under the training solver is not part of it:
        the model's densities and samples are computed with its evaluation solver, whose round
        trip is the reference's; the training solver's round trip only shows how far its coarse
        steps are from an exact inverse (large near the gaps a flow tears open between modes,
        where the data has little mass).
        """
        verdict = "VALID" if self.valid else "INVALID"
        return (
            f"{verdict}: NLL {self.train.nll:.4f} under {self.train.solver}, "
            f"{self.reference.nll:.4f} under the reference {self.reference.solver} in float64 "
            f"(delta {self.delta_nll:+.4f} nats, {self.delta_nats_per_dim:+.4f} nats/dim; valid "
            f"within {self.threshold:.4f})\n"
            f"x -> z -> x round trip: mean {self.train.recon_mean:.1e}, max "
            f"{self.train.recon_max:.1e} under {self.train.solver}; mean "
            f"{self.reference.recon_mean:.1e}, max {self.reference.recon_max:.1e} under the "
            "reference. Not part of the verdict, which is about densities (the model's densities "
            "and samples use its evaluation solver unless told otherwise)"
        )


def _log_probs(model: Flow, x: Tensor, solver: Solver, seed: int, batch: int):
    logps, nfes = [], []
    for i, chunk in enumerate(x.split(batch)):
        gen = torch.Generator(device=x.device).manual_seed(seed + i)
        logps.append(model.log_prob(chunk, generator=gen, solver=solver).double())
        nfes.append(model.nfe.forward)
    return torch.cat(logps), round(sum(nfes) / len(nfes))


def _recon(model: Flow, x: Tensor, solver: Solver, batch: int) -> Tensor:
    errors = [x.new_zeros(0, dtype=torch.float64)]
    for chunk in x.split(batch):
        z = model.to_latent(chunk, solver=solver, logdet=False).value  # the map: no trace
        back = model.to_data(z, solver=solver, logdet=False).value
        errors.append((back - chunk).flatten(1).double().norm(dim=1))
    return torch.cat(errors)


@torch.no_grad()
def _check(
    model: Flow, x: Tensor, solver: Solver, seed: int, batch: int, recon: bool, gather
) -> tuple[Tensor, SolverCheck]:
    logp, nfe = _log_probs(model, x, solver, seed, batch)
    logp = gather(logp)
    errors = (None, None)
    if recon:
        err = gather(_recon(model, x, solver, batch))
        errors = (float(err.mean()), float(err.max()))
    return logp, SolverCheck(solver.describe(), -float(logp.mean()), nfe, *errors)


def solver_validity(
    flow: Flow,
    x: Tensor,
    *,
    solver: Solver | None = None,
    reference: Solver = REFERENCE,
    nats_per_dim: float = NATS_PER_DIM,
    seed: int = 0,
    batch_size: int = 1000,
    gather: Callable[[Tensor], Tensor] | None = None,
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
        gather: in distributed evaluation, ``x`` is this process's share and ``gather`` joins
            every process's per-sample tensor (in rank order): the report is the whole set's.

    Returns:
        A :class:`ValidityReport`.
    """
    solver = solver or flow.solver
    gather = gather or (lambda t: t)
    with evaluating(flow):
        lp_train, train = _check(flow, x, solver, seed, batch_size, True, gather)
        lp_finer, finer = _check(flow, x, solver.finer(), seed, batch_size, False, gather)
        exact = copy.deepcopy(flow).double()
        lp_ref, ref = _check(exact, x.double(), reference, seed, batch_size, True, gather)
    dim = math.prod(x.shape[1:])
    diff = lp_ref - lp_train  # per-sample NLL(train) - NLL(ref)
    se = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    delta = float(diff.mean())
    threshold = max(nats_per_dim * dim, 2 * se)
    return ValidityReport(
        train=train, finer=finer, reference=ref, dim=dim, n=len(diff), delta_nll=delta,
        delta_nll_finer=float((lp_finer - lp_train).mean()), delta_nats_per_dim=delta / dim,
        delta_bits_per_dim=delta / dim / math.log(2), se=se, threshold=threshold,
        valid=abs(delta) <= threshold,
    )  # fmt: skip
