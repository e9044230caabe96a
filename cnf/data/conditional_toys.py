"""The conditional tasks of :mod:`cnf.data.conditional` as datasets of pairs ``(x, c)``, for
training a model of :math:`p(x \\mid c)` (``cnf.CNF(..., context=K)`` or ``num_classes=C``):

* ``8gaussians-given-component``: the toy given its component label (8 classes);
* ``rotating-gaussian``: a 2-D Gaussian whose mean and covariance turn with one feature ``c``;
* ``gaussian-linear``: the posterior :math:`p(\\theta \\mid x)` of the Gaussian-linear
  simulation-based-inference task (10-D, Lueckmann et al. 2021), from simulated pairs.

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
    GaussianLinear,
    GaussiansGivenComponent,
    Pairs,
    RotatingGaussian,
)


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


class ConditionalToyData:
    """A conditional task as a dataset: fresh pairs every iteration, seeded per iteration, or
    a fixed training set of ``n_train`` pairs (a simulation budget) batches are drawn from.

    Arguments:
        name: a key of :data:`TASKS`.
        seed: the run's seed; batches, validation and test sets come from disjoint streams.
        n_val: validation pairs.
        n_train: training pairs, drawn once (0: fresh pairs for every batch).
    """

    kind = "toy"

    def __init__(self, name: str, seed: int = 0, n_val: int = 2000, n_train: int = 0) -> None:
        for option, value, low in (("n_val", n_val, 1), ("n_train", n_train, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{option} must be an integer >= {low}, got {value!r}")
        self.name, self.seed, self.n_val, self.n_train = name, seed, n_val, n_train
        self.task, self.entropy, self.support, _ = TASKS[name]
        self.event_shape = (self.task.dim,)

    def _draw(self, n: int, *stream: int) -> Pairs:
        return self.task.sample(n, np.random.default_rng([self.seed, *stream]))

    @cached_property
    def _train(self) -> Pairs:
        return self._draw(self.n_train, 3)

    def train_batch(self, batch_size: int, iteration: int) -> Pairs:
        if not self.n_train:
            return self._draw(batch_size, 0, iteration)
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

    def meta(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "event_shape": list(self.event_shape),
                "context": self.context_meta()}  # fmt: skip

    def fingerprint(self) -> str:
        """A hash of the validation pairs (and of a fixed training set)."""
        train = (self._train.x, self._train.c) if self.n_train else ()
        return content_hash(self.name, self._validation.x, self._validation.c, *train)


for _name, (_task, _, _, _note) in TASKS.items():
    register(
        DatasetInfo(_name, "toy", _task.dim, True, _note, ("n_val", "n_train")),
        lambda seed=0, _n=_name, **kw: ConditionalToyData(_n, seed, **kw),
    )
