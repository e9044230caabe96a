"""Held-out evaluation: negative log-likelihood with its standard error, NFE, and KL where the
true entropy is known (KL(p || q) = E_p[-log q] - H(p) = NLL - H)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cnf.solvers import Solver


@dataclass(frozen=True)
class Evaluation:
    """Test metrics in nats (``bits_per_dim`` for image models)."""

    nll: float
    nll_se: float
    nfe: int
    n: int
    entropy: float | None = None
    kl: float | None = None
    bits_per_dim: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    *,
    batch_size: int = 5000,
    solver: Solver | None = None,
    entropy: float | None = None,
    generator: torch.Generator | None = None,
) -> Evaluation:
    """NLL of ``x`` under ``model`` in eval mode (its evaluation solver unless ``solver``).

    Arguments:
        model: a flow with ``log_prob`` and ``nfe``.
        x: the held-out data, on the model's device and in its dtype.
        batch_size: rows per solve (bounds memory).
        solver: overrides the model's evaluation solver.
        entropy: the data's true entropy, if known; adds ``kl = nll - entropy``.
        generator: for Hutchinson probes, so repeated evaluations see the same ones.

    Returns:
        The mean NLL, its standard error over rows, the mean forward NFE per batch and, where
        the entropy is given, the KL divergence from the data to the model.
    """
    was_training = model.training
    model.eval()
    try:
        logps, nfes = [], []
        for batch in x.split(batch_size):
            kwargs = {} if solver is None else {"solver": solver}
            logps.append(model.log_prob(batch, generator=generator, **kwargs))
            nfes.append(model.nfe.forward)
    finally:
        model.train(was_training)
    logp = torch.cat(logps).double()
    nll = -float(logp.mean())
    se = float(logp.std()) / math.sqrt(len(logp)) if len(logp) > 1 else math.nan
    kl = None if entropy is None else nll - entropy
    nfe = round(sum(nfes) / len(nfes))
    return Evaluation(nll, se, nfe, len(logp), entropy, kl)
