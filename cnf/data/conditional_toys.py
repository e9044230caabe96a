"""The conditional tasks of :mod:`cnf.data.conditional` as datasets of pairs ``(x, c)``, for
training a model of :math:`p(x \\mid c)` (``cnf.CNF(..., context=K)`` or ``num_classes=C``):

* ``8gaussians-given-component``: the toy given its component label (8 classes);
* ``rotating-gaussian``: a 2-D Gaussian whose mean and covariance turn with one feature ``c``;
* ``gaussian-linear``: the posterior :math:`p(\\theta \\mid x)` of the Gaussian-linear
  simulation-based-inference task (10-D, Lueckmann et al. 2021), from simulated pairs;
* the 2-D toys of :mod:`cnf.data.toy` given their label (``condition="label"``: the
  component, ring, square, moon, spiral or arm each point was drawn from), the very points of
  the unlabelled toy for the same seed; :math:`p(x \\mid c)` is known where the toy's
  density is (8gaussians, checkerboard, circles, rings).

This module registers the toys too, each with its ``condition`` option where it has labels.

Each batch, validation and test set is a :class:`~cnf.data.conditional.Pairs`; ``entropy`` is
the conditional entropy :math:`H(X \\mid C)` in closed form, so a model's conditional NLL less it
is the KL divergence :math:`E_c\\, KL(p(\\cdot \\mid c)\\,\\|\\,q(\\cdot \\mid c))`.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any

import numpy as np

from cnf.data.base import DatasetInfo, content_hash, register
from cnf.data.conditional import (
    ContextSpec,
    Estimate,
    GaussianLinear,
    GaussiansGivenComponent,
    Pairs,
    RotatingGaussian,
    _labels,
)
from cnf.data.toy import TOY, Chunks, ToyData, ToyDensity


def _gaussian_entropy(cov: np.ndarray) -> float:
    """:math:`\\frac12 \\log\\det(2\\pi e \\Sigma)`."""
    return 0.5 * float(np.linalg.slogdet(2 * math.pi * math.e * cov)[1])


TASKS: dict[str, tuple[Any, float, float, str]] = {
    # name: (task, conditional entropy, plot half-width, note)
    "8gaussians-given-component": (
        GaussiansGivenComponent(),
        _gaussian_entropy(GaussiansGivenComponent.std**2 * np.eye(2)),
        5.0,
        "the 8 Gaussians given their component (8 labels)",
    ),
    "rotating-gaussian": (
        RotatingGaussian(),
        RotatingGaussian().conditional_entropy,
        3.5,
        "a Gaussian turning with one feature c ~ U(-1, 1)",
    ),
    "gaussian-linear": (
        GaussianLinear(),
        _gaussian_entropy(GaussianLinear().posterior_cov),
        1.5,
        "posterior p(theta | x), 10-D Gaussian-linear task (sbibm)",
    ),
}


class ToyGivenLabel:
    """A 2-D toy of :mod:`cnf.data.toy` given its label, as a conditional task: equally likely
    labels, and :math:`p(x \\mid c)` where the toy knows it (``has_truth``)."""

    dim = 2

    def __init__(self, density: ToyDensity) -> None:
        self.density = density
        self.context = ContextSpec(
            "categorical", class_prior=(1 / density.classes,) * density.classes
        )
        self.has_truth = density.given_label is not None

    def check_context(self, c: Any, name: str = "c") -> np.ndarray:
        return _labels(c, self.density.classes, name)

    def sample(self, n: int, seed: Any = None) -> Pairs:
        """``n`` labelled points, the toy's very points for the same seed."""
        return Pairs(*self.density.sample_labelled(n, seed))

    def sample_x(self, c: Any, seed: Any = None) -> np.ndarray:
        """One point per label of ``c``, from the toy's draws with that label."""
        c = self.check_context(c)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        out = np.empty((len(c), 2))
        for label in np.unique(c):
            want, got = np.flatnonzero(c == label), np.empty((0, 2))
            while len(got) < len(want):
                x, labels = self.density.sample_labelled(4 * self.density.classes * len(want), rng)
                got = np.concatenate([got, x[labels == label]])
            out[want] = got[: len(want)]
        return out

    def log_prob(self, x: Any, c: Any) -> np.ndarray:
        """The true :math:`\\log p(x \\mid c)`; a ``ValueError`` where it is not known."""
        if self.density.given_label is None:
            raise ValueError(f"p(x | label) of {self.density.name!r} is not known in closed form")
        c = self.check_context(c)
        return self.density.given_label(np.asarray(x, dtype=np.float64), c)

    def bayes_accuracy(self, n: int = 100_000, seed: Any = 0) -> Estimate | None:
        """The accuracy of the Bayes classifier :math:`\\arg\\max_c p(x \\mid c)` (equal
        priors) on ``n`` fresh pairs, with its binomial standard error; ``None`` where
        :math:`p(x \\mid c)` is not known."""
        if not self.has_truth:
            return None
        x, c = self.sample(n, seed)
        classes = self.density.classes
        scores = np.stack([self.log_prob(x, np.full(len(x), k)) for k in range(classes)], 1)
        acc = float((scores.argmax(1) == c).mean())
        return Estimate(acc, math.sqrt(acc * (1 - acc) / len(c)), len(c))


class ConditionalToyData:
    """A conditional task as a dataset: fresh pairs every iteration, seeded per iteration, or
    a fixed training set of ``n_train`` pairs (a simulation budget) batches are drawn from.

    Arguments:
        name: a key of :data:`TASKS`, or a labelled toy's name (with ``task``).
        seed: the run's seed; batches, validation and test sets come from disjoint streams.
        n_val: validation pairs.
        n_train: training pairs, drawn once (0: fresh pairs for every batch).
        task: a labelled toy's :class:`ToyGivenLabel` (``None``: the task of ``TASKS``).
    """

    kind = "toy"

    def __init__(
        self, name: str, seed: int = 0, n_val: int = 2000, n_train: int = 0,
        task: ToyGivenLabel | None = None,
    ) -> None:  # fmt: skip
        for option, value, low in (("n_val", n_val, 1), ("n_train", n_train, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{option} must be an integer >= {low}, got {value!r}")
        self.name, self.seed, self.n_val, self.n_train = name, seed, n_val, n_train
        if task is None:
            self.task, self.entropy, self.support, _ = TASKS[name]
        else:
            density = task.density
            self.task, self.entropy, self.support = (
                task,
                density.conditional_entropy,
                density.support,
            )
        self.event_shape = (self.task.dim,)
        self.condition = "label" if task is not None else ""
        self._chunks = Chunks(self._draw)

    def _draw(self, n: int, *stream: int) -> Pairs:
        return self.task.sample(n, np.random.default_rng([self.seed, *stream]))

    @cached_property
    def _train(self) -> Pairs:
        return self._draw(self.n_train, 3)

    def train_batch(self, batch_size: int, iteration: int) -> Pairs:
        """Fresh pairs drawn as a toy's batches are (:class:`~cnf.data.toy.Chunks`: a labelled
        toy's points are the toy's own), or ``batch_size`` of the training set's."""
        if not self.n_train:
            drawn, rows = self._chunks.batch(batch_size, iteration)
            return Pairs(drawn.x[rows].copy(), drawn.c[rows].copy())
        rows = np.random.default_rng([self.seed, 0, iteration]).integers(
            0, self.n_train, batch_size
        )
        return Pairs(self._train.x[rows], self._train.c[rows])

    @cached_property
    def _validation(self) -> Pairs:
        return self._draw(self.n_val, 1)

    def validation(self) -> Pairs:
        return self._validation

    def test(self, n: int | None = None) -> Pairs:
        """``n`` fresh pairs (default 20,000) from a stream the training never sees."""
        return self._draw(n or 20_000, 2)

    def check_range(self, dtype: str) -> None:
        """Nothing to check: the tasks' values are of order one."""

    def to(self, device: Any) -> ConditionalToyData:
        return self  # pairs are drawn on the CPU

    def log_prob(self, x: np.ndarray, c: np.ndarray) -> np.ndarray:
        """The true :math:`\\log p(x \\mid c)`."""
        return self.task.log_prob(x, c)

    def context_meta(self) -> dict[str, Any]:
        """The condition a model of these data takes: ``{"kind": "categorical", "classes":
        C}`` or ``{"kind": "continuous", "features": K}``."""
        spec = self.task.context
        if spec.kind == "categorical":
            return {"kind": "categorical", "classes": spec.classes}
        return {"kind": "continuous", "features": spec.features}

    @property
    def has_truth(self) -> bool:
        """Whether :meth:`log_prob` knows :math:`p(x \\mid c)`."""
        return getattr(self.task, "has_truth", True)

    def meta(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "event_shape": list(self.event_shape),
                "context": self.context_meta()}  # fmt: skip

    def fingerprint(self) -> str:
        """A hash of the validation pairs (and of a fixed training set)."""
        train = (self._train.x, self._train.c) if self.n_train else ()
        name = f"{self.name}|{self.condition}" if self.condition else self.name
        return content_hash(name, self._validation.x, self._validation.c, *train)


def _toy(density: ToyDensity, seed: int = 0, condition: str = "", **options: Any) -> Any:
    """A toy, or with ``condition="label"`` its pairs of points and labels."""
    if condition not in ("", "label"):
        raise ValueError(
            f"condition must be 'label' for {density.name} (a model of p(x | label), the "
            f"{density.classes} labels its sampler draws), got {condition!r}"
        )
    if not condition:
        return ToyData(density, seed, **options)
    return ConditionalToyData(density.name, seed, task=ToyGivenLabel(density), **options)


for _name, _density in TOY.items():  # name -> (factory(seed, **options) -> Dataset, info)
    _note = "FFJORD toy density" + (
        f"; condition=label: given its label ({_density.classes} classes)"
        if _density.classes
        else ""
    )
    register(
        DatasetInfo(
            _name,
            "toy",
            2,
            _density.has_truth,
            _note,
            ("n_val", "condition") if _density.classes else ("n_val",),
        ),
        lambda seed=0, _d=_density, **kw: _toy(_d, seed, **kw),
    )

for _name, (_task, _, _, _note) in TASKS.items():
    register(
        DatasetInfo(_name, "toy", _task.dim, True, _note, ("n_val", "n_train")),
        lambda seed=0, _n=_name, **kw: ConditionalToyData(_n, seed, **kw),
    )
