"""Objectives: how the training loop turns a batch into a loss. The loop (:mod:`cnf.training.loop`)
is the same for every objective; an objective says what it computes, whether the loop should
keep the training solver valid with Ott et al.'s step adapter (an objective that trains without
solving, such as flow matching, does not need it) and what it logs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from cnf import options
from cnf.adaptation import batch_nll_metric
from cnf.fields import SeededDropout, seeded_dropout
from cnf.flow import Flow
from cnf.options import option
from cnf.solvers import Solver
from cnf.trace import RowsOfBatch

Shard = tuple[int, int] | None  # rows (start, stop) of the batch that one process trains on


def rows_of(value: Tensor | None, shard: tuple[int, int]) -> Tensor | None:
    """The rows ``shard = (start, stop)`` of a batch's tensor (``None`` stays ``None``)."""
    return None if value is None else value[shard[0] : shard[1]]


class Objective:
    """The interface of an objective.

    Attributes:
        name: its name in configs and logs.
        adapts: whether the loop runs the step adapter (:mod:`cnf.adaptation`) on it.
    """

    name: ClassVar[str]
    adapts: ClassVar[bool]

    def loss(
        self,
        model: Flow,
        x: Tensor,
        generator: torch.Generator,
        shard: Shard = None,
        context: Tensor | None = None,
    ) -> tuple[Tensor, dict]:
        """The scalar loss to minimize on the batch ``x``, and what to log of it (tensors or
        numbers). ``generator`` draws whatever the objective needs at random. With ``shard =
        (start, stop)`` (distributed training) the loss is the mean over those rows of ``x``,
        the whole batch, with the randomness those rows get when the whole batch is drawn.
        ``context`` is each row's condition, for a conditional model of ``p(x | c)``."""
        raise NotImplementedError

    def counts(self, model: Flow) -> dict[str, Any]:
        """What to log after the backward pass; by default the NFE forward and backward."""
        return {"nfe": model.nfe.forward, "nfe_backward": model.nfe.backward}

    def metric(
        self, model: Flow, x: Tensor, seed: int, shard: Shard = None, reduce=None, context=None
    ) -> Callable[[Solver], float]:
        """The adapter's measure of a solver on the batch ``x`` (for ``adapts`` objectives);
        ``shard``, ``reduce`` and ``context`` as in :func:`~cnf.adaptation.batch_nll_metric`."""
        return batch_nll_metric(model, x, seed, shard, reduce, context=context)

    def at(self, iteration: int) -> Objective:
        """The objective that trains ``iteration`` (itself; :class:`Phases` has several)."""
        return self

    def begins(self, iteration: int) -> int:
        """The first iteration of the phase that trains ``iteration`` (1: there is one)."""
        return 1

    def ends(self, iteration: int) -> int | None:
        """The last iteration of the phase that trains ``iteration``, if a later phase follows
        it (``None``: it is the last)."""
        return None

    def check(self, model: Flow) -> None:
        """Refuse, before training starts, a model this objective cannot train."""


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

    kinetic: float = option(0.0, "weight of RNODE's kinetic-energy penalty, int ||f||^2 dt")
    jacobian: float = option(0.0, "weight of RNODE's Jacobian penalty, int ||df/dz||_F^2 dt")
    name: ClassVar[str] = "mle"
    adapts: ClassVar[bool] = True

    def __post_init__(self) -> None:
        options.finite_floats(self)
        for name in ("kinetic", "jacobian"):
            options.number(name, getattr(self, name), strict=False)

    def loss(
        self,
        model: Flow,
        x: Tensor,
        generator: torch.Generator,
        shard: Shard = None,
        context: Tensor | None = None,
    ) -> tuple[Tensor, dict]:
        regularize = self.kinetic > 0 or self.jacobian > 0
        probes = None if shard is None else RowsOfBatch(generator, shard[0], len(x))
        if shard is not None:
            x, context = rows_of(x, shard), rows_of(context, shard)
        condition = {} if context is None else {"context": context}
        with _without_dropout(model):  # a solve needs a deterministic field
            out = model.to_latent(x, generator=generator, regularize=regularize, probes=probes,
                                  **condition)  # fmt: skip
        nll = -(model.base_log_prob(out.value) + out.logdet).mean()
        loss = nll
        if regularize:
            loss = loss + self.kinetic * out.kinetic.mean() + self.jacobian * out.jacobian.mean()
        return loss, {"nll": nll.detach()}


@contextmanager
def _without_dropout(model: Flow) -> Iterator[None]:
    """The model's dropout layers (a U-Net field's, for flow matching) in eval mode for the
    block: an ODE solve, and its adjoint, need the same field at every evaluation."""
    kinds = (torch.nn.Dropout, SeededDropout)
    dropouts = [m for m in model.modules() if isinstance(m, kinds) and m.training]
    for m in dropouts:
        m.eval()
    try:
        yield
    finally:
        for m in dropouts:
            m.train()


COUPLINGS = ("independent", "ot")
TIME_SAMPLINGS = ("uniform", "logit-normal")
AUTOCASTS = ("off", "bf16")


@dataclass(frozen=True)
class FlowMatching(Objective):
    r"""Conditional flow matching on the linear (CondOT) path, in cnf's time convention (data
    at :math:`t = 0`, the standard normal base at :math:`t = T`; :math:`s = t/T`):

    .. math::
        x_s = (1 - s)\,x + (\sigma_{\min} + (1 - \sigma_{\min})\,s)\,z, \qquad
        u = \frac{(1 - \sigma_{\min})\,z - x}{T}, \qquad
        \mathcal{L} = \mathbb{E}_{s, (x, z)}\ \tfrac1D \lVert f(sT, x_s) - u \rVert^2,

    the regression of the CNF's own field :math:`f = dz/dt` onto the conditional velocity, with
    :math:`x` a data batch (after a table's fixed normalizer: the coordinates the field sees) and
    :math:`z \sim \mathcal{N}(0, I)`. One field evaluation per example and no solve, so the loop
    runs no step adapter on it; the trained model is an ordinary CNF, whose likelihood, samples
    and validity are computed as for any other.

    Arguments:
        coupling: ``"independent"`` (each :math:`x` with an independent :math:`z`) or ``"ot"``
            (minibatch optimal transport: the exact assignment of the :math:`z` to the :math:`x`
            that minimizes the total squared distance, within chunks of ``ot_chunk`` rows of the
            batch: straighter paths, Tong et al. 2023). The assignment is cubic in the chunk:
            128 rows cost about 1 ms, 512 about 30 ms, ten flow-matching iterations.
        sigma_min: the path's width at the data (0: rectified flow).
        time_sampling: ``"uniform"`` :math:`s \sim U(0, 1)`, or ``"logit-normal"``
            (:math:`s = \sigma(n)`, :math:`n \sim \mathcal{N}(0, 1)`; Esser et al. 2024).
        autocast: ``"bf16"`` runs the field's forward pass of the regression under bfloat16
            autocast (meant for GPUs; its speed-up is not measured yet); the loss, the target
            and the optimizer stay float32. Training only: likelihoods,
            samples and the validity check never autocast.

    References:
        Lipman et al., "Flow Matching for Generative Modeling", ICLR 2023 (arXiv:2210.02747).
        Liu et al., "Flow Straight and Fast", ICLR 2023 (arXiv:2209.03003). Tong et al.,
        "Improving and generalizing flow-based generative models with minibatch optimal
        transport", TMLR 2024 (arXiv:2302.00482).
    """

    coupling: str = option("independent", "independent, or ot (minibatch optimal transport)")
    sigma_min: float = option(0.0, "width of the linear path at the data (0: rectified flow)")
    time_sampling: str = option("uniform", "path times, uniform or logit-normal")
    cond_dropout: float = option(
        0.0,
        "conditional models: the share of rows trained on the learned null condition, for "
        "classifier-free guidance when sampling",
    )
    ot_chunk: int = 128
    autocast: str = option(
        "off",
        "bf16 runs the regression's field under bfloat16 autocast, faster on GPUs and on CPUs "
        "with bfloat16 instructions (likelihoods and samples stay float32)",
    )
    name: ClassVar[str] = "fm"
    adapts: ClassVar[bool] = False

    def __post_init__(self) -> None:
        options.finite_floats(self)
        options.choice("coupling", self.coupling, COUPLINGS)
        options.choice("time_sampling", self.time_sampling, TIME_SAMPLINGS)
        options.within("sigma_min", self.sigma_min, 0, 1, closed=True)
        options.choice("autocast", self.autocast, AUTOCASTS)
        options.within("cond_dropout", self.cond_dropout, 0, 1, closed=True)

    def loss(
        self,
        model: Flow,
        x: Tensor,
        generator: torch.Generator,
        shard: Shard = None,
        context: Tensor | None = None,
    ) -> tuple[Tensor, dict]:
        block = _single_block(model)
        if context is not None and self.coupling == "ot":
            raise ValueError(
                "coupling 'ot' pairs noise with data across rows of different conditions, which "
                "changes the base given each condition: use coupling independent for a model of "
                "p(x | c)"
            )
        x0 = model.field_coordinates(x)  # the whole batch: its noise, pairing and times
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.coupling == "ot":
            chunks = zip(x0.split(self.ot_chunk), z.split(self.ot_chunk), strict=True)
            z = torch.cat([zc[ot_pairing(xc, zc)] for xc, zc in chunks])
        s = self.times(len(x0), generator, x0)
        drop = self._dropped(context, generator, x0)
        total = len(x0)
        if shard is not None:  # this process's rows of it
            x0, z, s = (v[shard[0] : shard[1]] for v in (x0, z, s))
            context, drop = rows_of(context, shard), rows_of(drop, shard)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        a, b = (self.sigma_min + (1 - self.sigma_min) * s).reshape(shape), (1 - s).reshape(shape)
        T = block.T.detach()
        target = ((1 - self.sigma_min) * z - x0) / T
        bf16 = self.autocast == "bf16"
        with (
            torch.autocast(x0.device.type, torch.bfloat16) if bf16 else nullcontext(),
            seeded_dropout(block.field, generator, shard, total),  # masks of (seed, iteration)
        ):
            velocity = block.velocity(s * T, a * z + b * x0, context=context, drop=drop)
        loss = (velocity.to(target.dtype) - target).square().mean()
        return loss, {"fm_loss": loss.detach()}

    def _dropped(self, context: Tensor | None, generator: torch.Generator, like: Tensor):
        """The rows that train the null condition (``cond_dropout`` of them, drawn for the
        whole batch), or ``None``."""
        if context is None or not self.cond_dropout:
            return None
        u = torch.rand(len(like), generator=generator, device=like.device, dtype=like.dtype)
        return u < self.cond_dropout

    def times(self, n: int, generator: torch.Generator, like: Tensor) -> Tensor:
        """``n`` path times ``s`` in ``[0, 1]``."""
        if self.time_sampling == "uniform":
            return torch.rand(n, generator=generator, device=like.device, dtype=like.dtype)
        normal = torch.randn(n, generator=generator, device=like.device, dtype=like.dtype)
        return torch.sigmoid(normal)

    def counts(self, model: Flow) -> dict[str, Any]:
        return {"nfe": 1, "nfe_backward": 0}  # one field evaluation, backpropagated directly

    def check(self, model: Flow) -> None:
        _single_block(model)


def ot_pairing(x: Tensor, z: Tensor) -> Tensor:
    """The permutation ``p`` of ``z`` that minimizes ``sum_i ||x_i - z_p[i]||^2`` over the batch
    (an exact assignment, by the Hungarian method of ``scipy.optimize.linear_sum_assignment``)."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x.flatten(1).double(), z.flatten(1).double()).square()
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    order = torch.empty(len(x), dtype=torch.long)
    order[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return order.to(z.device)


def _single_block(model: Flow) -> Any:
    blocks = model.ode_blocks()
    if len(blocks) != 1:
        raise ValueError(
            f"flow matching trains one CNF block, and {type(model).__name__} has {len(blocks)}: "
            "train a multiscale image model by maximum likelihood (objective 'mle'), or give it "
            "one block (--scales 1 --blocks 1, as the image preset of --objective fm does)"
        )
    return blocks[0]


@dataclass(frozen=True)
class Phases(Objective):
    """Objectives one after another: ``phases`` is ``((objective, last iteration), ...)``, e.g.
    flow matching for 2000 iterations, then maximum likelihood to 2500 (``"fm+mle"``). The loop
    asks :meth:`at` which one trains each iteration; at the start of a phase that adapts the
    step it measures Hairer's starting step on the field trained so far."""

    phases: tuple[tuple[Objective, int], ...]
    adapts: ClassVar[bool] = False

    @property
    def name(self) -> str:  # type: ignore[override]
        return "+".join(objective.name for objective, _ in self.phases)

    def at(self, iteration: int) -> Objective:
        for objective, last in self.phases:
            if iteration <= last:
                return objective
        return self.phases[-1][0]

    def begins(self, iteration: int) -> int:
        first = 1
        for _, last in self.phases[:-1]:
            if iteration <= last:
                break
            first = last + 1
        return first

    def ends(self, iteration: int) -> int | None:
        for _, last in self.phases[:-1]:
            if iteration <= last:
                return last
        return None

    def check(self, model: Flow) -> None:
        for objective, _ in self.phases:
            objective.check(model)
