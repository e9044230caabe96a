r"""Conditional tasks whose density :math:`p(x \mid c)` is known in closed form: pure maths, no
training. Each draws pairs ``(x, c)`` (``x`` modelled, ``c`` its context), draws ``x`` given
contexts (one per row) and gives the exact :math:`\log p(x \mid c)`, so that a model ``q`` is
scored by :func:`conditional_kl`, Monte-Carlo :math:`\mathrm{KL}(p(\cdot\mid c)\,\|\,q(\cdot\mid
c))` with its standard error. Tasks: :class:`GaussiansGivenComponent` (the ``8gaussians`` toy
given its component), :class:`RotatingGaussian` (2-D, one continuous feature) and
:class:`GaussianLinear` (sbibm's ``gaussian_linear`` posterior). As in :mod:`cnf.data.toy`, arrays
are numpy float64 (labels int64); a ``seed`` is an int, ``None`` or a ``numpy.random.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple, Protocol

import numpy as np
import torch
from scipy.linalg import solve_triangular
from scipy.special import logsumexp

from cnf.data.toy import _8GAUSS_CENTRES, _8GAUSS_SIGMA

Seed = np.random.Generator | int | None
LogDensity = Callable[[np.ndarray, np.ndarray], Any]  # log_q(x, c) -> (n,) log-densities
LOG_2PI = math.log(2 * math.pi)


class Pairs(NamedTuple):
    """Draws from the joint: ``x`` the modelled variable, ``c`` its context (row by row)."""

    x: np.ndarray
    c: np.ndarray


class Simulation(NamedTuple):
    """Draws of a simulator: parameters ``theta`` and the data ``x`` they produced."""

    theta: np.ndarray
    x: np.ndarray


@dataclass(frozen=True)
class Estimate:
    """A Monte-Carlo ``value``, its ``stderr``, its ``n`` draws (a KL's: per context)."""

    value: float
    stderr: float
    n: int
    per_context: np.ndarray | None = field(default=None, repr=False)  # a KL's, one per context


@dataclass(frozen=True)
class ContextSpec:
    """What a task's context is: ``"continuous"`` with ``features`` K (``c`` of shape ``(n, K)``,
    float64), or ``"categorical"`` with ``class_prior`` :math:`p(c)` over ``classes`` labels
    (``c`` of shape ``(n,)``, int64 in ``0..classes-1``)."""

    kind: Literal["continuous", "categorical"]
    features: int = 0
    class_prior: tuple[float, ...] = ()

    @property
    def classes(self) -> int:
        return len(self.class_prior)


class ConditionalTask(Protocol):
    """What :func:`conditional_kl` needs of a task: ``dim`` is the dimension of ``x``."""

    dim: int
    context: ContextSpec

    def check_context(self, c: Any, name: str = "c") -> np.ndarray: ...
    def sample(self, n: int, seed: Seed = None) -> Pairs: ...
    def sample_x(self, c: Any, seed: Seed = None) -> np.ndarray: ...
    def log_prob(self, x: Any, c: Any) -> np.ndarray: ...


def _rng(seed: Seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _count(n: Any, name: str = "n", least: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {n!r}")
    return int(n)


def _rows(a: Any, width: int, name: str, *, finite: bool = False, rows: int = 0) -> np.ndarray:
    """``a`` as float64 of shape ``(n, width)``, ``n >= 1`` (``n == rows`` where given)."""
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != width or len(arr) == 0:
        raise ValueError(f"expected {name} of shape (n, {width}), n >= 1, got {arr.shape}")
    if rows and len(arr) != rows:
        raise ValueError(f"{name} has {len(arr)} rows, its contexts {rows}: give one per row")
    if finite and not np.isfinite(arr).all():
        raise ValueError(f"{name} holds {(~np.isfinite(arr)).sum()} NaN or infinite value(s)")
    return arr


def _labels(c: Any, classes: int, name: str) -> np.ndarray:
    """``c`` as int64 class labels of shape ``(n,)``, each in ``0..classes-1``."""
    arr = np.asarray(c)
    if arr.ndim != 1 or len(arr) == 0 or arr.dtype.kind not in "iuf":
        raise ValueError(f"expected {name}: labels of shape (n,), got {arr.shape} {arr.dtype}")
    bad = ~np.isfinite(arr) | (arr != np.round(arr)) | (arr < 0) | (arr >= classes)
    if bad.any():
        raise ValueError(f"{name} must hold labels in 0..{classes - 1}, got {arr[bad][:5]}")
    return arr.astype(np.int64)


def _as_log_density(out: Any, m: int) -> np.ndarray:
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().double()
    arr = np.asarray(out, dtype=np.float64)
    if arr.shape != (m,):
        raise ValueError(f"log_q must return {m} log-densities of shape ({m},), got {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"log_q returned NaN for {np.isnan(arr).sum()} of {m} points")
    return arr


def conditional_kl(
    task: ConditionalTask, log_q: LogDensity, contexts: Any, n: int = 1000, seed: Seed = 0
) -> Estimate:
    r"""Monte-Carlo :math:`\mathrm{KL}(p(\cdot\mid c)\,\|\,q(\cdot\mid c))`, averaged over contexts.

    For contexts :math:`c_1, \dots, c_K` and :math:`x_{ki} \sim p(\cdot \mid c_k)`,

    .. math::
        \widehat{\mathrm{KL}} = \frac{1}{K}\sum_k \frac{1}{n}\sum_i \big[\log p(x_{ki}\mid c_k)
        - \log q(x_{ki}\mid c_k)\big], \qquad
        \mathrm{se}^2 = \frac{1}{K^2}\sum_k \frac{s_k^2}{n},

    with :math:`s_k^2` the sample variance of the log-ratio at :math:`c_k` (the draws are
    independent across contexts). ``q = p`` gives exactly 0 with standard error 0.

    Arguments:
        task: the true conditional, e.g. :class:`RotatingGaussian`.
        log_q: ``log_q(x, c)``, the model's log-density of each row: float64 arrays in, an array
            or tensor of shape ``(len(x),)`` out; called once, on all ``K * n`` rows.
        contexts: ``K`` contexts in the task's format; ``n`` draws per context (at least 2).

    Example:
        >>> task = RotatingGaussian()
        >>> conditional_kl(task, task.log_prob, [[0.0], [0.5]], n=10).value
        0.0
    """
    n = _count(n, "n", least=2)
    c = task.check_context(contexts, "contexts")
    rep = np.repeat(c, n, axis=0)
    x = task.sample_x(rep, seed)
    gap = task.log_prob(x, rep) - _as_log_density(log_q(x, rep), len(rep))
    gap = gap.reshape(len(c), n)
    stderr = math.sqrt(gap.var(axis=1, ddof=1).sum() / n) / len(c)
    return Estimate(float(gap.mean()), stderr, n, gap.mean(axis=1))


class GaussiansGivenComponent:
    r"""The ``8gaussians`` toy given its component label :math:`c \in \{0, \dots, 7\}`:

    .. math::
        p(c) = 1/8, \qquad p(x \mid c) = \mathcal{N}(x;\, m_c,\, \sigma^2 I),

    with the centres :math:`m_c = (4/1.414)(\cos, \sin)` of the toy (in its order: east, west,
    north, south, then the diagonals) and its :math:`\sigma = 0.5/1.414`, so that
    :math:`\sum_c p(c)\, p(x \mid c)` is :mod:`cnf.data.toy`'s density, and :meth:`sample` draws
    the toy's very points for the same seed.
    """

    dim: ClassVar[int] = 2
    context: ClassVar[ContextSpec] = ContextSpec("categorical", class_prior=(1 / 8,) * 8)
    centres: ClassVar[np.ndarray] = _8GAUSS_CENTRES
    std: ClassVar[float] = _8GAUSS_SIGMA

    def check_context(self, c: Any, name: str = "c") -> np.ndarray:
        """``c`` as int64 labels of shape ``(n,)``; a ``ValueError`` names what is wrong."""
        return _labels(c, 8, name)

    def sample(self, n: int, seed: Seed = None) -> Pairs:
        """``n`` pairs: labels from the uniform prior, then ``x`` given each label."""
        rng = _rng(seed)
        c = rng.integers(0, 8, _count(n))  # the toy's own order of draws
        return Pairs(self.sample_x(c, rng), c)

    def sample_x(self, c: Any, seed: Seed = None) -> np.ndarray:
        """One ``x`` per label of ``c``, shape ``(len(c), 2)``."""
        c = self.check_context(c)
        return self.centres[c] + self.std * _rng(seed).standard_normal((len(c), 2))

    def log_prob(self, x: Any, c: Any) -> np.ndarray:
        r""":math:`\log p(x \mid c) = -\lVert x - m_c \rVert^2 / 2\sigma^2 - \log 2\pi\sigma^2`."""
        c = self.check_context(c)
        return self.log_joint(_rows(x, 2, "x", rows=len(c)))[np.arange(len(c)), c] + math.log(8)

    def log_joint(self, x: Any) -> np.ndarray:
        r""":math:`\log p(x \mid c) + \log p(c)` for every class, shape ``(n, 8)``."""
        x = _rows(x, 2, "x")
        sq = ((x[:, None, :] - self.centres[None]) ** 2).sum(-1)
        return -sq / (2 * self.std**2) - math.log(2 * math.pi * self.std**2) - math.log(8)

    def log_prob_marginal(self, x: Any) -> np.ndarray:
        r""":math:`\log p(x) = \operatorname{logsumexp}_c [\log p(x \mid c) + \log p(c)]`."""
        return logsumexp(self.log_joint(x), axis=1)

    def context_log_prob(self, c: Any) -> np.ndarray:
        r""":math:`\log p(c) = -\log 8` for each label."""
        return np.log(np.asarray(self.context.class_prior))[self.check_context(c)]

    def bayes_accuracy(self, n: int = 100_000, seed: Seed = 0) -> Estimate:
        r"""The accuracy of the Bayes-optimal classifier :math:`\arg\max_c p(x \mid c)\,p(c)` on
        ``n`` fresh pairs, with its binomial standard error :math:`\sqrt{a(1-a)/n}` (about
        0.998 here: neighbouring centres lie 3.06 standard deviations from their midpoint)."""
        x, c = self.sample(n, seed)
        acc = float((self.log_joint(x).argmax(1) == c).mean())
        return Estimate(acc, math.sqrt(acc * (1 - acc) / len(c)), len(c))


@dataclass(frozen=True)
class RotatingGaussian:
    r"""A 2-D Gaussian whose mean, orientation and spread follow one feature :math:`c \sim U(-1,1)`:

    .. math::
        x \mid c \sim \mathcal{N}\big(m(c),\, R(tc)\,\mathrm{diag}(s_1^2, s_2^2)\,R(tc)^\top\big),
        \quad m(c) = r(\cos ac, \sin ac), \quad s_1 = s\,e^{gc}, \quad s_2 = s_\perp,

    with :math:`R` a rotation and the fields ``radius, arc, turn, major, growth, minor`` as
    :math:`r, a, t, s, g, s_\perp`: the mean moves along an arc, the ellipse turns by :math:`2t`
    and its major axis grows by :math:`e^{2g}`. The density and the entropy :math:`H(x \mid c) =
    1 + \log 2\pi + \log s_1 s_2` are exact; contexts outside ``[-1, 1]`` are extrapolations
    (the formulas hold, the prior gives them no mass).
    """

    radius: float = 2.0
    arc: float = 0.75 * math.pi
    turn: float = math.pi / 2
    major: float = 0.5
    growth: float = 0.5
    minor: float = 0.15
    dim: ClassVar[int] = 2
    context: ClassVar[ContextSpec] = ContextSpec("continuous", features=1)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not math.isfinite(value) or (name in ("major", "minor") and value <= 0):
                raise ValueError(f"{name} must be finite (a std: > 0), got {value!r}")

    def check_context(self, c: Any, name: str = "c") -> np.ndarray:
        """``c`` as float64 of shape ``(n, 1)``, finite; a ``ValueError`` names what is wrong."""
        return _rows(c, 1, name, finite=True)

    def frame(self, c: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row of ``c``: the mean ``(n, 2)``, rotation ``(n, 2, 2)`` and scales ``(n, 2)``."""
        c = self.check_context(c)[:, 0]
        mean = self.radius * np.stack([np.cos(self.arc * c), np.sin(self.arc * c)], 1)
        cos, sin = np.cos(self.turn * c), np.sin(self.turn * c)
        rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
        scales = np.stack([self.major * np.exp(self.growth * c), np.full_like(c, self.minor)], 1)
        return mean, rot, scales

    def covariance(self, c: Any) -> np.ndarray:
        r""":math:`\Sigma(c) = R\,\mathrm{diag}(s_1^2, s_2^2)\,R^\top`, shape ``(n, 2, 2)``."""
        _, rot, s = self.frame(c)
        return np.einsum("nij,nj,nkj->nik", rot, s**2, rot)

    def sample(self, n: int, seed: Seed = None) -> Pairs:
        """``n`` pairs: ``c`` of shape ``(n, 1)`` uniform on ``[-1, 1]``, then ``x`` given ``c``."""
        rng = _rng(seed)
        c = rng.uniform(-1.0, 1.0, (_count(n), 1))
        return Pairs(self.sample_x(c, rng), c)

    def sample_x(self, c: Any, seed: Seed = None) -> np.ndarray:
        r"""One ``x`` per row of ``c``: :math:`m + R\,(s \odot z)`, :math:`z \sim N(0, I)`."""
        mean, rot, s = self.frame(c)
        return mean + np.einsum("nij,nj->ni", rot, s * _rng(seed).standard_normal(mean.shape))

    def log_prob(self, x: Any, c: Any) -> np.ndarray:
        r""":math:`-\tfrac12 \lVert R^\top (x - m) / s \rVert^2 - \log 2\pi - \log s_1 s_2`."""
        mean, rot, s = self.frame(c)
        u = np.einsum("nji,nj->ni", rot, _rows(x, 2, "x", rows=len(s)) - mean) / s
        return -0.5 * (u**2).sum(1) - LOG_2PI - np.log(s).sum(1)

    def entropy(self, c: Any) -> np.ndarray:
        r""":math:`H(x \mid c) = 1 + \log 2\pi + \log s_1(c) s_2`, shape ``(n,)``."""
        return 1 + LOG_2PI + np.log(self.frame(c)[2]).sum(1)

    @property
    def conditional_entropy(self) -> float:
        r""":math:`E_{c \sim U(-1,1)} H(x \mid c) = 1 + \log 2\pi + \log s s_\perp`."""
        return 1 + LOG_2PI + math.log(self.major * self.minor)


def _covariance(value: Any, dim: int, name: str) -> np.ndarray:
    """A variance (times I), a diagonal ``(dim,)`` or a ``(dim, dim)`` positive-definite matrix."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim < 2:
        arr = np.diag(np.broadcast_to(arr, (dim,))) if arr.shape in ((), (dim,)) else arr
    ok = arr.shape == (dim, dim) and np.isfinite(arr).all() and np.allclose(arr, arr.T)
    if ok and np.all(np.linalg.eigvalsh(arr) > 0):
        return arr
    raise ValueError(
        f"{name} must be a variance > 0, a diagonal ({dim},) > 0 or a symmetric positive-definite"
        f" ({dim}, {dim}) matrix; got {value!r}"
    )


def _gauss_log_prob(x: np.ndarray, mean: np.ndarray, chol: np.ndarray) -> np.ndarray:
    r""":math:`-\tfrac12\lVert L^{-1}(x-\mu)\rVert^2 - \sum_i \log L_{ii} - \tfrac d2 \log 2\pi`."""
    z = solve_triangular(chol, (x - mean).T, lower=True)
    return -0.5 * (z**2).sum(0) - np.log(np.diag(chol)).sum() - 0.5 * len(chol) * LOG_2PI


class GaussianLinear:
    r"""sbibm's ``gaussian_linear``: :math:`\theta \sim \mathcal{N}(0, \Sigma_p)`,
    :math:`x \mid \theta \sim \mathcal{N}(\theta, \Sigma_l)`; the modelled variable is
    :math:`\theta`, the context the data :math:`x` (so :meth:`sample` gives ``Pairs(theta, x)``).

    Completing the square in :math:`\log p(\theta) + \log p(x \mid \theta) = -\tfrac12
    [\theta^\top (\Sigma_p^{-1} + \Sigma_l^{-1}) \theta - 2 \theta^\top \Sigma_l^{-1} x] +
    \text{const}` gives the posterior :math:`\mathcal{N}(\mu_{\rm post}, \Sigma_{\rm post})`,

    .. math::
        \Sigma_{\rm post} = (\Sigma_p^{-1} + \Sigma_l^{-1})^{-1}, \qquad
        \mu_{\rm post}(x) = \Sigma_{\rm post}\, \Sigma_l^{-1} x.

    Arguments:
        dim: the dimension of :math:`\theta` and :math:`x` (sbibm: 10).
        prior_cov, noise_cov: :math:`\Sigma_p` and :math:`\Sigma_l`: a variance (times
            :math:`I`), a diagonal ``(dim,)`` or a full ``(dim, dim)`` matrix (sbibm: 0.1 each).

    References:
        Lueckmann, Boelts, Greenberg, Goncalves, Macke. "Benchmarking Simulation-Based
        Inference", AISTATS 2021, arXiv:2101.04653 (task ``gaussian_linear``).
    """

    OBSERVATION_SEED: ClassVar[int] = 2101_04653  # x_o's seed (not sbibm's stored files)

    def __init__(self, dim: int = 10, *, prior_cov: Any = 0.1, noise_cov: Any = 0.1) -> None:
        self.dim = _count(dim, "dim")
        self.context = ContextSpec("continuous", features=self.dim)
        self.prior_cov = _covariance(prior_cov, self.dim, "prior_cov")
        self.noise_cov = _covariance(noise_cov, self.dim, "noise_cov")
        noise_precision = np.linalg.inv(self.noise_cov)
        post = np.linalg.inv(np.linalg.inv(self.prior_cov) + noise_precision)
        self.posterior_cov = (post + post.T) / 2
        self.gain = self.posterior_cov @ noise_precision  # mu_post(x) = gain @ x
        covs = {"prior": self.prior_cov, "noise": self.noise_cov, "post": self.posterior_cov}
        self._chol = {k: np.linalg.cholesky(v) for k, v in covs.items()}

    def check_context(self, c: Any, name: str = "x") -> np.ndarray:
        """Data ``x`` as float64 of shape ``(n, dim)``, finite."""
        return _rows(c, self.dim, name, finite=True)

    def simulate(self, n: int, seed: Seed = None) -> Simulation:
        """``n`` draws of the joint: ``theta`` from the prior, ``x`` from the simulator."""
        rng, n = _rng(seed), _count(n)
        theta = rng.standard_normal((n, self.dim)) @ self._chol["prior"].T
        return Simulation(theta, theta + rng.standard_normal((n, self.dim)) @ self._chol["noise"].T)

    def sample(self, n: int, seed: Seed = None) -> Pairs:
        """:meth:`simulate` as ``Pairs(x=theta, c=x)``: theta is what is modelled."""
        return Pairs(*self.simulate(n, seed))

    def posterior_mean(self, x: Any) -> np.ndarray:
        r""":math:`\mu_{\rm post}(x) = \Sigma_{\rm post} \Sigma_l^{-1} x` for each row of ``x``."""
        return self.check_context(x) @ self.gain.T

    def posterior_log_prob(self, theta: Any, x: Any) -> np.ndarray:
        r""":math:`\log \mathcal{N}(\theta; \mu_{\rm post}(x), \Sigma_{\rm post})`, row by row."""
        mean = self.posterior_mean(x)
        theta = _rows(theta, self.dim, "theta", rows=len(mean))
        return _gauss_log_prob(theta, mean, self._chol["post"])

    log_prob = posterior_log_prob  # the task's log p(x | c), with x = theta and c = the data

    def sample_x(self, c: Any, seed: Seed = None) -> np.ndarray:
        """One posterior draw of theta per row of the data ``c``."""
        mean = self.posterior_mean(c)
        return mean + _rng(seed).standard_normal(mean.shape) @ self._chol["post"].T

    def posterior_sample(self, x: Any, n: int, seed: Seed = None) -> np.ndarray:
        """``n`` draws of :math:`\\theta \\sim p(\\theta \\mid x)` for one observation ``x`` of
        shape ``(dim,)``, shape ``(n, dim)``."""
        x = self.check_context(np.reshape(x, (1, -1)) if np.ndim(x) == 1 else x)
        if len(x) != 1:
            raise ValueError(f"x must be one observation of shape ({self.dim},), got {len(x)}")
        return self.sample_x(np.repeat(x, _count(n), axis=0), seed)

    def observations(self, k: int = 10, seed: int = OBSERVATION_SEED) -> np.ndarray:
        """``k`` reference observations :math:`x_o` from the prior predictive, shape ``(k, dim)``;
        row ``i`` comes from stream ``(seed, i)``, whatever ``k`` (sbibm's 10 are its own)."""
        rows = range(_count(k, "k"))
        return np.concatenate([self.simulate(1, np.random.default_rng([seed, i])).x for i in rows])

    def posterior_kl(self, log_q: LogDensity, x_o: Any, n: int = 1000, seed: Seed = 0) -> Estimate:
        r""":math:`E_{p(\theta \mid x_o)}[\log p - \log q]` averaged over the rows of ``x_o``,
        with its standard error: :func:`conditional_kl` with ``log_q(theta, x)``."""
        return conditional_kl(self, log_q, x_o, n, seed)
