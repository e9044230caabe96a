r"""Held-out evaluation: negative log-likelihood with its standard error, NFE, KL where the
true entropy is known (KL(p || q) = E_p[-log q] - H(p) = NLL - H), and bits per dimension for
image models.

Bits per dimension: an image model (one with a ``levels`` attribute, such as
:class:`~cnf.multiscale.MultiscaleCNF`) is a density of dequantized pixel values
:math:`x = k + u \in [0, L)^D`, integers :math:`k` plus uniform noise, in integer units: its
log-determinant includes the rescaling to :math:`[0, 1]`, :math:`-D \log L`. Then

.. math:: \mathrm{bits/dim} = rac{\mathbb{E}[-\log p(x)]}{D \log 2}
    \ \ge\ rac{-\log P(k)}{D \log 2},

an upper bound on the discrete data's code length (Theis et al. 2016, arXiv:1511.01844). The
density of the same images rescaled to :math:`[0, 1]` is higher by a factor :math:`L^D`: leaving
out the :math:`-D \log L` term under-reports by :math:`\log_2 L` bits/dim (8 for 8-bit images).
The literature's numbers (FFJORD: 0.99 on MNIST, 3.40 on CIFAR-10) are in pixel units with
:math:`L = 256`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cnf.flow import evaluating
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
    gather: Callable[[Tensor], Tensor] | None = None,
) -> Evaluation:
    """NLL of ``x`` under ``model`` in eval mode (its evaluation solver unless ``solver``).

    Arguments:
        model: a flow with ``log_prob`` and ``nfe``.
        x: the held-out data, on the model's device and in its dtype.
        batch_size: rows per solve (bounds memory).
        solver: overrides the model's evaluation solver.
        entropy: the data's true entropy, if known; adds ``kl = nll - entropy``.
        generator: for Hutchinson probes, so repeated evaluations see the same ones.
        gather: in distributed evaluation, ``x`` is this process's share and ``gather`` joins
            every process's log-densities (in rank order), so every process gets the whole
            set's numbers; the NFE stays this process's.

    Returns:
        The mean NLL, its standard error over rows, the mean forward NFE per batch, where the
        entropy is given the KL divergence from the data to the model and, for image models,
        the NLL in bits per dimension.
    """
    logps, nfes = [], []
    with evaluating(model):
        for batch in x.split(batch_size):
            logps.append(model.log_prob(batch, generator=generator, solver=solver))
            nfes.append(model.nfe.forward)
    logp = torch.cat(logps).double()
    if gather is not None:
        logp = gather(logp)
    nll = -float(logp.mean())
    se = float(logp.std()) / math.sqrt(len(logp)) if len(logp) > 1 else math.nan
    kl = None if entropy is None else nll - entropy
    nfe = round(sum(nfes) / len(nfes))
    bpd = None
    if getattr(model, "levels", None) is not None:
        bpd = bits_per_dim(nll, math.prod(x.shape[1:]))
    return Evaluation(nll, se, nfe, len(logp), entropy, kl, bpd)


def bits_per_dim(nll: float, dim: int) -> float:
    """``nll / (dim log 2)``: a mean NLL in nats per image of ``dim`` pixels (of a density in
    integer pixel units, see the module's docstring) as bits per dimension.

    Example:
        >>> round(bits_per_dim(64 * math.log(17), 64), 4)  # the uniform density on [0, 17)^64
        4.0875
    """
    return nll / (dim * math.log(2))
