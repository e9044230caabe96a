r"""Held-out evaluation: negative log-likelihood with its standard error, NFE, KL where the
true entropy is known (KL(p || q) = E_p[-log q] - H(p) = NLL - H), and bits per dimension for
image models.

Bits per dimension: an image model (one with a ``levels`` attribute, such as
:class:`~cnf.multiscale.MultiscaleCNF`) is a density of dequantized pixel values
:math:`x = k + u \in [0, L)^D`, integers :math:`k` plus uniform noise, in integer units: its
log-determinant includes the rescaling to :math:`[0, 1]`, :math:`-D \log L`. Then

.. math:: \mathrm{bits/dim} = \frac{\mathbb{E}[-\log p(x)]}{D \log 2}
    \ \ge\ \frac{-\log P(k)}{D \log 2},

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
from cnf.seeds import TEST, generator
from cnf.solvers import Solver
from cnf.trace import RowsOfBatch


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
    dequant_samples: int | None = None  # K of the bits/dim bound: 1, one draw per image

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def mean_and_se(values: Tensor) -> tuple[float, float]:
    """The mean of ``values`` and its standard error (NaN with fewer than two).

    Example:
        >>> [round(v, 6) for v in mean_and_se(torch.tensor([1.0, 3.0]))]  # std sqrt(2), n 2
        [2.0, 1.0]
    """
    se = float(values.std()) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return float(values.mean()), se


@torch.no_grad()
def log_probs(
    model: nn.Module,
    x: Tensor,
    *,
    seed: int = 0,
    stream: int = TEST,
    first: int = 0,
    batch_size: int = 5000,
    solver: Solver | None = None,
    share: Callable[[int], slice] | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
    context: Tensor | None = None,
    progress: Callable[[int], Any] | None = None,
) -> tuple[Tensor, int]:
    """``log p`` of every row of ``x`` (float64, in eval mode) and the mean forward NFE per
    solve, in batches of ``batch_size`` rows.

    Batch ``i`` draws its Hutchinson probes for all its rows from the generator of ``(seed,
    stream, first + i)`` (:mod:`cnf.seeds`), so the result is a function of the rows, the seed
    and the batch size alone: the same every time, and the same under any number of
    processes, where each solves its rows of every batch (``share(n)``: this process's rows
    of a batch of ``n``) and ``gather`` joins every process's, in rank order. ``context``: each
    row's condition, for a model of ``p(x | c)`` (the result is then ``log p(x | c)``).
    ``progress`` is told the rows of each batch once it is solved.
    """
    logps, nfes = [], []
    conditions = [None] * len(x.split(batch_size)) if context is None else context.split(batch_size)
    with evaluating(model):
        for i, (batch, c) in enumerate(zip(x.split(batch_size), conditions, strict=True)):
            gen, rows = generator(x.device, seed, stream, first + i), len(batch)
            probes = None
            if share is not None:
                part = share(len(batch))
                probes, batch = RowsOfBatch(gen, part.start, len(batch)), batch[part]
                c = None if c is None else c[part]
            condition = {} if c is None else {"context": c}
            logp = model.log_prob(batch, generator=gen, solver=solver, probes=probes, **condition)
            logp = logp.double()
            logps.append(logp if gather is None else gather(logp))
            if len(batch):  # a process with no rows of this batch solved nothing
                nfes.append(model.nfe.forward)
            if progress is not None:
                progress(rows)
    nfe = sum(nfes) / max(len(nfes), 1)
    if gather is not None:  # every process reports the largest, the solves' real cost
        nfe = float(gather(torch.tensor([nfe], dtype=torch.float64, device=x.device)).max())
    return torch.cat(logps) if logps else x.new_zeros(0, dtype=torch.float64), round(nfe)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    *,
    batch_size: int = 5000,
    solver: Solver | None = None,
    entropy: float | None = None,
    seed: int = 0,
    stream: int = TEST,
    share: Callable[[int], slice] | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
    context: Tensor | None = None,
    progress: Callable[[int], Any] | None = None,
    se: float | None = None,
    least: int = 2000,
) -> Evaluation:
    """NLL of ``x`` under ``model`` in eval mode (its evaluation solver unless ``solver``).

    Arguments:
        model: a flow with ``log_prob`` and ``nfe``.
        x: the held-out data, on the model's device and in its dtype.
        batch_size: rows per solve (bounds memory).
        solver: overrides the model's evaluation solver.
        entropy: the data's true entropy, if known; adds ``kl = nll - entropy``.
        seed: where the Hutchinson probes come from (:func:`log_probs`): the same numbers
            every time for the same ``(seed, stream)``.
        stream: the purpose's stream of ``seed`` (:mod:`cnf.seeds`).
        share: in distributed evaluation, this process's rows of a batch of ``n``.
        gather: the join of every process's log-densities (:func:`log_probs`): every process
            gets the whole set's numbers.
        context: each row's condition, for a model of ``p(x | c)``: the NLL is then the
            conditional one, ``-log p(x | c)``.
        progress: told the rows of each batch once it is solved (a progress bar's update).
        se: stop once the NLL's standard error is ``se`` nats, on ``least`` rows or more
            (``None``: all of ``x``, which caps it either way; :func:`_until_se`).

    Returns:
        The mean NLL, its standard error over rows, the mean forward NFE per batch, where the
        entropy is given the KL divergence from the data to the model and, for image models,
        the NLL in bits per dimension.
    """
    kw = dict(seed=seed, stream=stream, batch_size=batch_size, solver=solver, share=share,
              gather=gather, context=context, progress=progress)  # fmt: skip
    logp, nfe = log_probs(model, x, **kw) if se is None else _until_se(model, x, se, least, **kw)
    nll, se = mean_and_se(-logp)
    kl = None if entropy is None else nll - entropy
    bpd = None
    if model.levels is not None:
        bpd = bits_per_dim(nll, math.prod(x.shape[1:]))
    return Evaluation(nll, se, nfe, len(logp), entropy, kl, bpd, None if bpd is None else 1)


def _until_se(model, x: Tensor, se: float, least: int, *, batch_size: int, context, **kw):
    """:func:`log_probs` of the first ``least`` rows, then of as many more as their spread says
    ``se`` needs (and a tenth), until it is reached: few large solves. Solve ``i``'s probes come
    from ``first = i``."""
    parts, nfes, done, want = [], [], 0, min(len(x), least)
    while done < len(x):
        take = min(want - done, batch_size)
        rows = slice(done, done + take)
        logp, nfe = log_probs(model, x[rows], first=len(parts), batch_size=take,
                              context=None if context is None else context[rows], **kw)  # fmt: skip
        parts.append(logp)
        nfes.append(nfe)
        done += take
        if done < want:
            continue
        scored = torch.cat(parts)
        error = mean_and_se(-scored)[1]
        if error <= se or not math.isfinite(error):
            break
        want = min(len(x), max(math.ceil(1.1 * len(scored) * (error / se) ** 2), done + 1))
    logp = torch.cat(parts) if parts else x.new_zeros(0, dtype=torch.float64)
    return logp, round(sum(nfes) / max(len(nfes), 1))


def bits_per_dim(nll: float, dim: int) -> float:
    """``nll / (dim log 2)``: a mean NLL in nats per image of ``dim`` pixels (of a density in
    integer pixel units, see the module's docstring) as bits per dimension.

    Example:
        >>> round(bits_per_dim(64 * math.log(17), 64), 4)  # the uniform density on [0, 17)^64
        4.0875
    """
    return nll / (dim * math.log(2))
