r"""FFJORD's 2-D toy densities, seedable, with their true log-densities where known.

Each generator follows FFJORD's ``toy_data.inf_train_gen`` (same shapes and scales) but draws from
a ``numpy.random.Generator`` so that runs reproduce. Ring and moon angles are drawn uniformly
rather than evenly spaced as in FFJORD (whose samples are then not independent); the density is the
same.

Known truths (``log_prob``; ``entropy`` by quadrature of :math:`-p \log p` on a fine grid):

* 8gaussians: equal mixture of 8 isotropic Gaussians, centres :math:`(4/1.414)(\cos k\pi/4,
  \sin k\pi/4)`, :math:`\sigma = 0.5/1.414`; entropy about 2.831 nats.
* checkerboard: uniform on 8 squares of side 2 (area 32); entropy :math:`\log 32`.
* circles, rings: rings of radius :math:`R` blurred by isotropic Gaussian noise, whose density is
  :math:`p(x) = \frac{1}{2\pi\sigma^2} e^{-(r^2 + R^2)/2\sigma^2} I_0(rR/\sigma^2)` with
  :math:`r = \lVert x \rVert` and :math:`I_0` the modified Bessel function (computed as
  ``i0e`` for stability).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from scipy.special import i0e, logsumexp

from cnf.data.base import content_hash

# points a side of the entropy's quadrature grid: 500 and 1,500 agree to 1e-9 nats on
# 8gaussians, circles and rings, at a ninth of the cost (3 CPU s at 1,500 on 8gaussians)
GRID = 500

Labelled = tuple[np.ndarray, np.ndarray]  # points and their labels (component, ring, arm...)
Sampler = Callable[[int, np.random.Generator], Labelled | np.ndarray]
LogProb = Callable[[np.ndarray], np.ndarray]
LabelLogProb = Callable[[np.ndarray, np.ndarray], np.ndarray]  # log p(x | label), row by row


def _8gaussians(n: int, rng: np.random.Generator) -> Labelled:
    centres = _8GAUSS_CENTRES * 1.414  # FFJORD adds unit-circle centres * 4 then divides by 1.414
    idx = rng.integers(0, 8, n)
    return ((rng.standard_normal((n, 2)) * 0.5 + centres[idx]) / 1.414).astype(np.float64), idx


_8GAUSS_CENTRES = (
    4.0
    / 1.414
    * np.array(
        [(1, 0), (-1, 0), (0, 1), (0, -1)]
        + [(s1 / math.sqrt(2), s2 / math.sqrt(2)) for s1 in (1, -1) for s2 in (1, -1)]
    )
)
_8GAUSS_SIGMA = 0.5 / 1.414


def _8gaussians_log_comp(x: np.ndarray) -> np.ndarray:
    """:math:`\\log p(x \\mid c)` for each component ``c``, shape ``(n, 8)``."""
    sq = ((x[:, None, :] - _8GAUSS_CENTRES[None]) ** 2).sum(-1)
    return -sq / (2 * _8GAUSS_SIGMA**2) - math.log(2 * math.pi * _8GAUSS_SIGMA**2)


def _8gaussians_log_prob(x: np.ndarray) -> np.ndarray:
    return logsumexp(_8gaussians_log_comp(x), axis=1) - math.log(8)


def _checkerboard(n: int, rng: np.random.Generator) -> Labelled:
    x1 = rng.random(n) * 4 - 2
    x2 = rng.random(n)
    lower = rng.integers(0, 2, n)
    x2 = x2 - lower * 2
    x2 = x2 + np.floor(x1) % 2
    # the square: its column 0..3, then lower or upper of the two filled in that column
    return np.stack([x1, x2], 1) * 2, (np.floor(x1).astype(np.int64) + 2) * 2 + lower


def _checkerboard_log_prob(x: np.ndarray) -> np.ndarray:
    return np.where(_checkerboard_square(x) >= 0, -math.log(32.0), -np.inf)


def _checkerboard_square(x: np.ndarray) -> np.ndarray:
    """The filled square (label 0..7) each point of ``x`` lies in, or -1 outside them."""
    inside = (np.abs(x) < 4).all(1)
    cell = np.floor(x / 2).astype(np.int64)
    filled = (cell[:, 0] + cell[:, 1]) % 2 == 0  # the squares the sampler fills
    column = cell[:, 0] + 2
    lower = (column % 2 - cell[:, 1]) // 2  # the row is column % 2 - 2 * lower
    return np.where(inside & filled, column * 2 + lower, -1)


def _checkerboard_given_square(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.where(_checkerboard_square(x) == c, -math.log(4.0), -np.inf)


def _ring_sample(n: int, rng: np.random.Generator, radii: np.ndarray, sigma: float) -> Labelled:
    """Equal mixture of rings of the given radii, blurred with isotropic noise ``sigma``; the
    label is the ring's index."""
    ring = rng.integers(0, len(radii), n)
    r = radii[ring]
    theta = rng.random(n) * 2 * math.pi
    pts = np.stack([r * np.cos(theta), r * np.sin(theta)], 1)
    return pts + rng.standard_normal((n, 2)) * sigma, ring


def _ring_log_comp(x: np.ndarray, radii: np.ndarray, sigma: float) -> np.ndarray:
    """:math:`\\log p(x \\mid \\text{ring})` for each ring, shape ``(n, rings)``."""
    r = np.linalg.norm(x, axis=1)[:, None]
    R = radii[None, :]
    s2 = sigma**2
    # log I0(a) = log i0e(a) + a, so the Gaussian in (r - R) stays finite far from the origin
    return -((r - R) ** 2) / (2 * s2) + np.log(i0e(r * R / s2)) - math.log(2 * math.pi * s2)


def _ring_log_prob(x: np.ndarray, radii: np.ndarray, sigma: float) -> np.ndarray:
    return logsumexp(_ring_log_comp(x, radii, sigma), axis=1) - math.log(len(radii))


_CIRCLES = (np.array([3.0, 1.5]), 0.08 * 3)  # sklearn make_circles(factor=.5, noise=.08) * 3
_RINGS = (np.array([3.0, 2.25, 1.5, 0.75]), 0.08)  # radii (1, .75, .5, .25) * 3, noise after


def _moons(n: int, rng: np.random.Generator) -> Labelled:
    theta = rng.random(n) * math.pi
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(theta), 1 - np.cos(theta))
    y = np.where(upper, np.sin(theta), 1 - np.sin(theta) - 0.5)
    pts = np.stack([x, y], 1) + rng.standard_normal((n, 2)) * 0.1
    return pts * 2 + np.array([-1, -0.2]), (~upper).astype(np.int64)  # 0: the upper moon


def _swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
    t = 1.5 * math.pi * (1 + 2 * rng.random(n))  # sklearn make_swiss_roll(noise=1.0)[:, [0, 2]]
    pts = np.stack([t * np.cos(t), t * np.sin(t)], 1) + rng.standard_normal((n, 2))
    return pts / 5


def _2spirals(n: int, rng: np.random.Generator) -> Labelled:
    m = np.sqrt(rng.random((n, 1))) * 540 * (2 * math.pi) / 360
    arm = np.hstack([-np.cos(m) * m, np.sin(m) * m]) + rng.random((n, 2)) * 0.5
    first = rng.random((n, 1)) < 0.5  # FFJORD mirrors each arm point instead
    sign = np.where(first, 1.0, -1.0)
    return sign * arm / 3 + rng.standard_normal((n, 2)) * 0.1, (~first[:, 0]).astype(np.int64)


def _pinwheel(n: int, rng: np.random.Generator) -> Labelled:
    radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
    rads = np.linspace(0, 2 * math.pi, num_classes, endpoint=False)
    features = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
    features[:, 0] += 1.0
    labels = rng.integers(0, num_classes, n)
    angles = rads[labels] + rate * np.exp(features[:, 0])
    c, s = np.cos(angles), np.sin(angles)
    rotations = np.stack([c, -s, s, c], 1).reshape(-1, 2, 2)
    return 2 * np.einsum("ti,tij->tj", features, rotations), labels


def _pick(per_class: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Row ``i``'s entry ``c[i]`` of a ``(n, classes)`` array."""
    return per_class[np.arange(len(per_class)), np.asarray(c, dtype=np.int64)]


@dataclass(frozen=True)
class ToyDensity:
    r"""A 2-D toy distribution: a seedable sampler and, where known, its true log-density.

    Attributes:
        name: the registry name.
        sampler: ``sampler(n, rng) -> (n, 2)`` array, or with ``classes``, that array and the
            points' labels ``(n,)`` (int64, equally likely).
        truth: ``truth(x) -> (n,)`` true log-density, or ``None`` if unknown.
        support: half-width of a square holding essentially all the mass (for quadrature/plots).
        exact_entropy: the entropy in closed form, where it has one.
        classes: the number of labels the sampler gives (0: none).
        given_label: ``given_label(x, c) -> (n,)`` the true :math:`\log p(x \mid c)`, where
            known.
        exact_conditional_entropy: :math:`H(X \mid C)` in closed form, where it has one.
    """

    name: str
    sampler: Sampler
    truth: LogProb | None = None
    support: float = 4.5
    exact_entropy: float | None = None
    classes: int = 0
    given_label: LabelLogProb | None = None
    exact_conditional_entropy: float | None = None

    def sample(self, n: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
        """``n`` samples as a float64 array of shape ``(n, 2)``."""
        return self.sample_labelled(n, rng)[0] if self.classes else self._draw(n, rng)

    def sample_labelled(self, n: int, rng: np.random.Generator | int | None = None) -> Labelled:
        """``n`` samples and their labels (the very points :meth:`sample` draws)."""
        if not self.classes:
            raise ValueError(f"{self.name!r} has no labels")
        x, labels = self._draw(n, rng)
        return np.asarray(x, dtype=np.float64), np.asarray(labels, dtype=np.int64)

    def _draw(self, n: int, rng: np.random.Generator | int | None) -> Any:
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        out = self.sampler(int(n), rng)
        return out if self.classes else np.asarray(out, dtype=np.float64)

    @property
    def has_truth(self) -> bool:
        return self.truth is not None

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """The true log-density; raises ``ValueError`` where it is not known."""
        if self.truth is None:
            raise ValueError(f"the true density of {self.name!r} is not known in closed form")
        return self.truth(np.asarray(x, dtype=np.float64))

    @cached_property
    def entropy(self) -> float | None:
        """Differential entropy in nats (closed form, else quadrature on a :data:`GRID` ^ 2
        grid)."""
        if self.exact_entropy is not None or self.truth is None:
            return self.exact_entropy
        g = np.linspace(-self.support, self.support, GRID)
        xx, yy = np.meshgrid(g, g, indexing="ij")
        logp = self.log_prob(np.stack([xx.ravel(), yy.ravel()], 1))
        p = np.exp(logp)
        return float(-(p * np.where(p > 0, logp, 0.0)).sum() * (g[1] - g[0]) ** 2)

    @cached_property
    def conditional_entropy(self) -> float | None:
        r""":math:`H(X \mid C)` in nats over the equally likely labels (quadrature as for
        :attr:`entropy`), where :math:`p(x \mid c)` is known."""
        if self.exact_conditional_entropy is not None or self.given_label is None:
            return self.exact_conditional_entropy
        g = np.linspace(-self.support, self.support, GRID)
        xx, yy = np.meshgrid(g, g, indexing="ij")
        pts = np.stack([xx.ravel(), yy.ravel()], 1)
        total = 0.0
        for c in range(self.classes):
            logp = self.given_label(pts, np.full(len(pts), c))
            p = np.exp(logp)
            total -= (p * np.where(p > 0, logp, 0.0)).sum() * (g[1] - g[0]) ** 2
        return float(total / self.classes)


TOY: dict[str, ToyDensity] = {
    d.name: d
    for d in [
        ToyDensity(
            "8gaussians",
            _8gaussians,
            _8gaussians_log_prob,
            support=5.0,
            classes=8,
            given_label=lambda x, c: _pick(_8gaussians_log_comp(x), c),
        ),
        ToyDensity("2spirals", _2spirals, support=4.5, classes=2),
        ToyDensity(
            "checkerboard",
            _checkerboard,
            _checkerboard_log_prob,
            4.0,
            math.log(32.0),
            classes=8,
            given_label=_checkerboard_given_square,
            exact_conditional_entropy=math.log(4.0),
        ),
        ToyDensity("moons", _moons, support=4.0, classes=2),
        ToyDensity(
            "circles",
            lambda n, rng: _ring_sample(n, rng, *_CIRCLES),
            lambda x: _ring_log_prob(x, *_CIRCLES),
            support=4.5,
            classes=2,
            given_label=lambda x, c: _pick(_ring_log_comp(x, *_CIRCLES), c),
        ),
        ToyDensity("pinwheel", _pinwheel, support=4.5, classes=5),
        ToyDensity("swissroll", _swissroll, support=4.5),
        ToyDensity(
            "rings",
            lambda n, rng: _ring_sample(n, rng, *_RINGS),
            lambda x: _ring_log_prob(x, *_RINGS),
            support=4.0,
            classes=4,
            given_label=lambda x, c: _pick(_ring_log_comp(x, *_RINGS), c),
        ),
    ]
}


# the rows drawn at once for training batches: one draw serves this many rows' iterations (a
# draw per batch cost 0.19 ms an iteration in the training loop, a tenth of a flow-matching step)
CHUNK_ROWS = 32_768


class Chunks:
    """Training batches as slices of one draw per :data:`CHUNK_ROWS` rows: ``draw(n, 0,
    batch_size, chunk)`` draws a chunk of consecutive iterations' rows from the stream of those
    numbers, so an iteration's batch is the same whenever and in whatever order it is asked
    for. The last draw is kept."""

    def __init__(self, draw: Callable[..., Any]) -> None:
        self.draw = draw
        self._last: tuple[tuple[int, int], Any] | None = None

    def batch(self, batch_size: int, iteration: int) -> tuple[Any, slice]:
        """The draw that holds ``iteration``'s batch, and the batch's rows in it."""
        per = max(1, CHUNK_ROWS // batch_size)
        chunk, at = divmod(iteration, per)
        if self._last is None or self._last[0] != (batch_size, chunk):
            self._last = ((batch_size, chunk), self.draw(per * batch_size, 0, batch_size, chunk))
        return self._last[1], slice(at * batch_size, (at + 1) * batch_size)


class ToyData:
    """A 2-D toy density as a dataset: fresh samples every iteration, seeded per iteration.

    Arguments:
        density: the :class:`~cnf.data.toy.ToyDensity`.
        seed: the run's seed; batches, validation and test sets come from disjoint streams of it.
        n_val: validation set size.
    """

    kind = "toy"
    event_shape = (2,)

    def __init__(self, density: ToyDensity, seed: int = 0, n_val: int = 2000) -> None:
        self.density, self.seed, self.n_val = density, seed, n_val
        self.name = density.name
        self._chunks = Chunks(self._draw)

    def _draw(self, n: int, *stream: int) -> np.ndarray:
        return self.density.sample(n, np.random.default_rng([self.seed, *stream]))

    def train_batch(self, batch_size: int, iteration: int) -> np.ndarray:
        """The batch of ``iteration``, its rows of a :class:`Chunks` draw."""
        drawn, rows = self._chunks.batch(batch_size, iteration)
        return drawn[rows].copy()

    @cached_property
    def _validation(self) -> np.ndarray:
        return self.density.sample(self.n_val, np.random.default_rng([self.seed, 1]))

    def validation(self) -> np.ndarray:
        return self._validation

    def test(self, n: int | None = None) -> np.ndarray:
        """``n`` fresh samples (default 20,000) from a stream the training never sees."""
        return self.density.sample(n or 20_000, np.random.default_rng([self.seed, 2]))

    @property
    def entropy(self) -> float | None:
        return self.density.entropy

    @property
    def support(self) -> float:
        return self.density.support

    def check_range(self, dtype: str) -> None:
        """Nothing to check: the toys' values are bounded."""

    def to(self, device: Any) -> ToyData:
        return self  # batches are drawn afresh, on the CPU

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return self.density.log_prob(x)

    def meta(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "event_shape": list(self.event_shape)}

    def fingerprint(self) -> str:
        """A hash of the validation samples: changes if the density's sampler does."""
        return content_hash(self.name, self._validation)
