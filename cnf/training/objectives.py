"""Objectives: how the training loop turns a batch into a loss. The loop (:mod:`cnf.training.loop`)
is the same for every objective; an objective says what it computes, whether the loop should
keep the training solver valid with Ott et al.'s step adapter (an objective that trains without
solving, such as flow matching, does not need it) and what it logs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from cnf.adaptation import batch_nll_metric
from cnf.flow import Flow
from cnf.solvers import Solver


class Objective:
    """The interface of an objective.

    Attributes:
        name: its name in configs and logs.
        adapts: whether the loop runs the step adapter (:mod:`cnf.adaptation`) on it.
    """

    name: ClassVar[str]
    adapts: ClassVar[bool]

    def loss(self, model: Flow, x: Tensor, generator: torch.Generator) -> tuple[Tensor, dict]:
        """The scalar loss to minimize on the batch ``x``, and what to log of it (tensors or
        numbers). ``generator`` draws whatever the objective needs at random."""
        raise NotImplementedError

    def counts(self, model: Flow) -> dict[str, Any]:
        """What to log after the backward pass; by default the NFE forward and backward."""
        return {"nfe": model.nfe.forward, "nfe_backward": model.nfe.backward}

    def metric(self, model: Flow, x: Tensor, seed: int) -> Callable[[Solver], float]:
        """The adapter's measure of a solver on the batch ``x`` (for ``adapts`` objectives)."""
        return batch_nll_metric(model, x, seed)


@dataclass(frozen=True)
class MaximumLikelihood(Objective):
    """The mean negative log-likelihood (nats) of the batch, through the solver, plus RNODE's
    kinetic-energy and Jacobian-norm penalties:

    .. math:: \\mathcal{L} = -\\frac1n \\sum_i \\log p(x_i)
        + \\lambda_K \\frac1n \\sum_i \\int_0^T \\lVert f \\rVert^2 dt
        + \\lambda_J \\frac1n \\sum_i \\int_0^T \\lVert \\partial f/\\partial z \\rVert_F^2 dt.

    References:
        Grathwohl et al., "FFJORD", ICLR 2019 (arXiv:1810.01367). Finlay et al., "How to train
        your neural ODE", ICML 2020 (arXiv:2002.02798).
    """

    kinetic: float = 0.0
    jacobian: float = 0.0
    name: ClassVar[str] = "mle"
    adapts: ClassVar[bool] = True

    def loss(self, model: Flow, x: Tensor, generator: torch.Generator) -> tuple[Tensor, dict]:
        regularize = self.kinetic > 0 or self.jacobian > 0
        out = model.to_latent(x, generator=generator, regularize=regularize)
        nll = -(model.base_log_prob(out.value) + out.logdet).mean()
        loss = nll
        if regularize:
            loss = loss + self.kinetic * out.kinetic.mean() + self.jacobian * out.jacobian.mean()
        return loss, {"nll": nll.detach()}
