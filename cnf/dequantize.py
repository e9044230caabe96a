"""The importance-weighted bound on discrete images' NLL over dequantization draws
(``cnf eval --dequant-samples K``): the bits/dim of :mod:`cnf.evaluate` with ``K`` draws per
image instead of one, tighter as ``K`` grows (Theis et al. 2016; Ho et al. 2019)."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from cnf.evaluate import bits_per_dim, mean_and_se
from cnf.flow import evaluating
from cnf.runtime import check_memory
from cnf.solvers import Solver


@dataclass(frozen=True)
class DiscreteBound:
    """The importance-weighted bound on the discrete images' NLL, in nats and bits/dim, over
    ``samples`` dequantization draws per image (``samples = 1`` is the usual bound), with the
    K = 1 bound on the same draws (``single_nll``: the mean of their log-densities) beside it
    and the draws' log-densities themselves.

    With ``probes`` (Hutchinson estimates averaged over that many probes per draw instead of
    the exact trace), ``probe_bias`` is the second-order estimate, in nats per image, of how
    much lower than the exact-trace bound on the same draws ``nll`` is (see
    :func:`logmeanexp_noise_bias`), good while ``probe_noise`` (the noise of a draw's probe
    mean, in nats) is well under 1; both 0 with the exact trace."""

    nll: float
    nll_se: float
    bits_per_dim: float
    samples: int
    n: int
    single_nll: float
    single_bits_per_dim: float
    trace: str
    draws: Tensor  # (samples, n) float64: log p(k + u_j) of every draw of every image
    probes: int | None = None
    probe_bias: float = 0.0
    probe_bias_bits_per_dim: float = 0.0
    probe_noise: float = 0.0  # nats: the standard deviation of a draw's probe mean (RMS)


DRAW_BLOCK = 64  # images whose dequantizations are drawn together, whatever the solves' size
DRAW_CHUNK = 64  # draws of a block made at once (and held in memory at once)


@torch.no_grad()
def dequantized_bound(
    model: nn.Module,
    pixels: Tensor,
    samples: int,
    *,
    probes: int | None = None,
    generator: torch.Generator | None = None,
    probe_generator: torch.Generator | None = None,
    solver: Solver | None = None,
    batch_size: int = 1000,
    progress: bool = False,
) -> DiscreteBound:
    r"""The importance-weighted bound on :math:`-\log P(k)` of integer images ``pixels``, with
    ``samples`` uniform dequantizations :math:`u_j \sim U[0, 1)^D` (whose density is 1):

    .. math:: \log P(k) \ \ge\ \log \frac1K \sum_{j=1}^K p(k + u_j)
        \ \ge\ \frac1K \sum_j \log p(k + u_j),

    tighter as :math:`K` grows (Burda et al. 2016, arXiv:1509.00519; Ho et al. 2019,
    arXiv:1902.00275; Lipman et al. 2023 report K = 1 and K = 50). With ``K = 1`` it is the
    uniform-dequantization bound of :func:`evaluate` on fresh noise.

    With ``K > 1`` the log-densities are computed with the **exact** trace, whatever the model's
    estimator: a Hutchinson estimate :math:`\log p + \epsilon` is unbiased, but inside the
    log-mean-exp its noise is not. :math:`\log \frac1K \sum_j e^{\epsilon_j}` grows towards
    :math:`\log \mathbb{E}\, e^{\epsilon} > 0` with :math:`K` (about :math:`\sigma^2/2` nats for
    a probe noise of standard deviation :math:`\sigma`, several nats per 8x8 image), which would
    report a likelihood the model does not have. The exact trace costs ``D`` vector-Jacobian
    products per field evaluation instead of one, so a solve takes ``batch_size // (K D)``
    images (at least one; fewer draws of one image where even that is too many: every solve
    stays within ``batch_size`` evaluations, whatever ``K``).

    Where that is too dear (784 products per evaluation at 28x28), ``probes = P`` averages
    ``P`` Hutchinson estimates (independent Rademacher probes) per draw instead: the noise's
    variance falls as :math:`1/P` and with it the bias, which is estimated from the probes'
    own spread and reported as ``probe_bias`` (:func:`logmeanexp_noise_bias`; the estimate is
    optimistic by about that much). The estimate is second order: good while a draw's probe
    mean has well under a nat of noise, short of the bias beyond (on an MNIST model with 1.9
    nats, 0.0001 bits/dim estimated against 0.003 measured). A solve then takes
    ``batch_size // (K P)`` images.

    Arguments:
        model: an image flow with ``log_prob``.
        pixels: integer images, ``(n, C, H, W)``, values in ``0..L-1``.
        samples: ``K``, the dequantization draws per image.
        probes: Hutchinson probes per draw (at least 2, for their spread) instead of the exact
            trace; ``None``: the exact trace for ``K > 1``, the model's own estimator for 1.
        generator: the draws' random numbers (and, with ``K = 1``, the Hutchinson probes');
            the same draws whatever ``probes`` and ``batch_size``.
        probe_generator: with ``probes``, theirs (default: one seeded with ``generator``'s
            seed plus one).
        solver: overrides the model's evaluation solver.
        batch_size: log-density evaluations per solve; with the exact trace each counts ``D``,
            with probes each counts ``P``.
        progress: a progress bar over the solves (on stderr).
    """
    _check_counts(samples, probes)
    dim = math.prod(pixels.shape[1:])
    device = pixels.device if generator is None else generator.device
    trace = "hutchinson" if probes is not None else ("exact" if samples > 1 else None)
    probe_gen = generator
    if probes is not None:
        probe_gen = probe_generator or _next_generator(generator, device)
    cost = dim if trace == "exact" else 1  # evaluations a row costs
    solves = _Solves(model, trace, probes or 1, probe_gen, solver, batch_size // cost)
    check_memory(samples * len(pixels) * 8 * (2 if probes else 1),
                 f"the bound's {samples} draws of {len(pixels)} images",
                 "use fewer dequantization draws or images")  # fmt: skip
    means = torch.empty(samples, len(pixels), dtype=torch.float64)
    variances = torch.empty_like(means) if probes is not None else None
    bar = tqdm(total=solves.count(len(pixels), samples), disable=not progress,
               desc=f"bound, K={samples}", file=sys.stderr, dynamic_ncols=True)  # fmt: skip
    with evaluating(model), bar:
        for (first, draw), block, u in dequantization_draws(pixels, samples, generator):
            cols, rows = slice(first, first + len(block)), slice(draw, draw + len(u))
            mean, variance = solves.run(block, u, bar)
            means[rows, cols] = mean
            if variances is not None:
                variances[rows, cols] = variance
    return _bound(means, variances, samples, probes, dim, trace or _trace_name(model))


class _Solves:
    """The log-densities of draws ``block + u``, solved in parts of at most ``size`` rows:
    whole images with all their draws and probes while they fit, else fewer draws, else fewer
    probes at a time; each draw's mean over its ``probes`` Hutchinson probes and that mean's
    variance."""

    def __init__(self, model, trace, probes: int, generator, solver, size: int) -> None:
        self.model, self.trace, self.probes, self.generator = model, trace, probes, generator
        self.solver, self.size = solver, max(1, size)
        self.like = next(model.parameters())

    def parts(self, images: int, draws: int) -> tuple[int, int, int]:
        """Images, draws and probes per solve."""
        if draws * self.probes <= self.size:
            return max(1, self.size // (draws * self.probes)), draws, self.probes
        if self.probes <= self.size:
            return 1, self.size // self.probes, self.probes
        return 1, 1, self.size

    def count(self, n: int, samples: int) -> int:
        total = 0
        for start in range(0, n, DRAW_BLOCK):
            images = min(DRAW_BLOCK, n - start)
            for first in range(0, samples, DRAW_CHUNK):
                draws = min(DRAW_CHUNK, samples - first)
                r, k, g = self.parts(images, draws)
                total += -(-images // r) * -(-draws // k) * -(-self.probes // g)
        return total

    def run(self, block: Tensor, u: Tensor, bar) -> tuple[Tensor, Tensor]:
        r, k, g = self.parts(len(block), len(u))
        sums = torch.zeros(2, len(u), len(block), dtype=torch.float64)
        for i in range(0, len(block), r):
            for j in range(0, len(u), k):
                x = block[i : i + r].to(u.device).double() + u[j : j + k, i : i + r].double()
                x, shape = x.flatten(0, 1).to(self.like), x.shape[:2]
                for start in range(0, self.probes, g):
                    copies = min(g, self.probes - start)
                    lp = self.model.log_prob(x.repeat(copies, *[1] * (x.ndim - 1)),
                                             solver=self.solver, generator=self.generator,
                                             trace=self.trace)  # fmt: skip
                    lp = lp.double().reshape(copies, *shape).cpu()
                    sums[0, j : j + k, i : i + r] += lp.sum(0)
                    sums[1, j : j + k, i : i + r] += lp.square().sum(0)
                    bar.update()
        mean = sums[0] / self.probes
        spread = (sums[1] - self.probes * mean.square()) / max(self.probes - 1, 1)
        return mean, spread.clamp(min=0) / self.probes  # the variance of the probes' mean


def _bound(means, variances, samples, probes, dim, trace) -> DiscreteBound:
    logp = torch.logsumexp(means, 0) - math.log(samples)
    (nll, se), single = mean_and_se(-logp), -float(means.mean())
    bias = noise = 0.0
    if variances is not None:
        bias = float(logmeanexp_noise_bias(means, variances).mean())
        noise = float(variances.mean() ** 0.5)
    return DiscreteBound(nll, se, bits_per_dim(nll, dim), samples, len(logp), single,
                         bits_per_dim(single, dim), trace, means, probes, bias,
                         bits_per_dim(bias, dim), noise)  # fmt: skip


def _check_counts(samples: int, probes: int | None) -> None:
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if probes is not None and (not isinstance(probes, int) or isinstance(probes, bool)
                               or probes < 2):  # fmt: skip
        raise ValueError(f"probes must be an integer >= 2 (their spread estimates the bias), "
                         f"got {probes!r}")  # fmt: skip


def _next_generator(generator: torch.Generator | None, device) -> torch.Generator:
    """The probes' generator: seeded with ``generator``'s seed plus one (fresh without one)."""
    gen = torch.Generator(device=device)
    if generator is not None:
        gen.manual_seed(generator.initial_seed() + 1)
    else:
        gen.seed()
    return gen


def dequantization_draws(
    pixels: Tensor, samples: int, generator: torch.Generator | None = None
) -> Iterator[tuple[tuple[int, int], Tensor, Tensor]]:
    """The uniform noise of :func:`dequantized_bound`: ``((first image, first draw), block,
    u)`` for blocks of :data:`DRAW_BLOCK` images, each in chunks of at most
    :data:`DRAW_CHUNK` draws, ``u`` of shape ``(draws, *block.shape)`` on the generator's
    device; the same for a generator's seed whatever the solves' size."""
    device = pixels.device if generator is None else generator.device
    for start in range(0, len(pixels), DRAW_BLOCK):
        block = pixels[start : start + DRAW_BLOCK]
        for first in range(0, samples, DRAW_CHUNK):
            draws = min(DRAW_CHUNK, samples - first)
            u = torch.rand((draws, *block.shape), generator=generator, device=device)
            yield (start, first), block, u


def logmeanexp_noise_bias(estimates: Tensor, variances: Tensor) -> Tensor:
    r"""How much :math:`\log \frac1K \sum_j e^{\hat\ell_j}` exceeds, in expectation, the
    log-mean-exp of the true :math:`\ell_j` when each :math:`\hat\ell_j = \ell_j + \epsilon_j`
    carries independent zero-mean noise of variance :math:`v_j`, to second order (the delta
    method; the log-mean-exp's Hessian is :math:`\mathrm{diag}(w) - w w^\top`):

    .. math:: \tfrac12 \sum_j w_j (1 - w_j)\, v_j, \qquad w = \mathrm{softmax}(\hat\ell),

    per column of ``estimates`` and ``variances`` (``(K, n)``: K terms each). At most
    :math:`\tfrac12 (1 - \frac1K) \max_j v_j`; 0 for ``K = 1`` (a mean is unbiased).
    """
    w = torch.softmax(estimates, 0)
    return 0.5 * (w * (1 - w) * variances).sum(0)


def _trace_name(model: nn.Module) -> str:
    return model.ode_blocks()[0].estimator.name
