r"""``cnf.CNFRegressor``: a conditional continuous normalizing flow as a scikit-learn regressor
with a full predictive density :math:`p(y \mid X)`.

``fit(X, y)`` trains a :class:`~cnf.table_flow.TabularCNF` of ``y`` given the features ``X``
(``TabularCNF(d_y, context=K)``: ``y`` and ``X`` each standardized on the training rows) with
the recipe, defaults and training loop of :class:`cnf.CNFDensity` (flow matching, then maximum
likelihood stopped early on a held-out part of the rows). Its methods follow scikit-learn for a
point prediction and skpro for the distribution:

* ``predict(X)``: the conditional mean :math:`E[y \mid X]`, estimated from draws;
* ``score(X, y)``: :math:`R^2` of ``predict``, :class:`~sklearn.base.RegressorMixin`'s, so that
  cross-validation, grid searches and pipelines treat it as any regressor; the likelihood,
  the score of a density, is ``score_samples(X, y)`` (:math:`\log p(y_i \mid X_i)` per row,
  in the units of ``y``) and ``log_likelihood(X, y)`` (their mean). Grid-search on it with
  ``scoring=lambda est, X, y: est.log_likelihood(X, y)``;
* ``sample(X, n_samples)``: draws of :math:`y \sim p(y \mid X_i)` for every row;
* ``predict_interval(X, coverage)`` and ``predict_quantiles(X, alpha)``: skpro's central
  intervals (the quantiles :math:`\tfrac12 \mp c/2` for a coverage :math:`c`) and quantiles,
  per column of ``y``: from draws, or exact for one output. The flow of a scalar ``y`` is an
  ODE on the line, whose solutions cannot cross: :math:`T_X` is increasing, so the quantile
  :math:`\alpha` of :math:`p(y \mid X)` is :math:`T_X(\Phi^{-1}(\alpha))`, one solve a quantile.

Draws push one set of base points :math:`z_1, \dots, z_m \sim N(0, I)` through every row's flow
:math:`y = T_{X_i}(z)` (common random numbers): a row's draws do not depend on the other rows
asked with it, and predictions vary smoothly with ``X``. Predictions use antithetic points
(:math:`z` and :math:`-z`, so the mean is exact wherever :math:`T_{X}` is affine) seeded at fit:
a fitted regressor's ``predict`` is a function of ``X``.

scikit-learn's ``check_estimator`` passes but for the checks in :data:`EXPECTED_FAILED_CHECKS`,
which call ``score_samples(X)`` as a density estimator's; as for CNFDensity, a row's results do
not depend on its batch-mates with a fixed-step ``method`` and ``step_size`` (an adaptive solver
chooses its steps for the whole batch, within ``eval_tol``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import RegressorMixin
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from cnf.data.columns import ColumnPlan
from cnf.data.conditional import Pairs
from cnf.data.pairs import PairData
from cnf.density import FlowEstimator, _count, _warn
from cnf.runtime import SAMPLE_CHUNK, check_memory

# the checks that call score_samples(X) without y (pass to check_estimator's
# expected_failed_checks); tests/test_regressor.py checks predict's invariances itself
_NEEDS_Y = "score_samples(X, y) scores pairs: this check calls score_samples(X) without y"
EXPECTED_FAILED_CHECKS = {
    "check_methods_subset_invariance": _NEEDS_Y,
    "check_methods_sample_order_invariance": _NEEDS_Y,
}


class CNFRegressor(RegressorMixin, FlowEstimator):
    r"""Regression with a full predictive density :math:`p(y \mid X)`, by a conditional CNF.

    Its parameters are those of :class:`cnf.CNFDensity`, with its defaults; ``preprocess``,
    ``log_columns`` and ``dequantize`` are of ``y`` (the features ``X`` are standardized, never
    dequantized), and the validation rows are pairs.

    Attributes:
        model_: the fitted :class:`~cnf.table_flow.TabularCNF` of ``y`` given ``X`` (eval mode).
        columns_: the :class:`~cnf.data.columns.ColumnPlan` of ``y``: constant and duplicated
            columns are dropped with a warning (densities are of the kept ones; draws put them
            back). ``features_``: the columns of ``X`` the flow sees (those not constant on
            the training rows; the others carry no information about ``y``).
        n_outputs_: the columns of ``y``; ``n_features_in_``, ``feature_names_in_``: as in
            scikit-learn.
        n_iter_, validation_scores_, best_validation_score_: as in :class:`cnf.CNFDensity`.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(200, 2))
        >>> y = X @ [1.0, -2.0] + 0.5 * rng.normal(size=200)
        >>> est = CNFRegressor(hidden=(16,), max_iter=20, finetune_iter=10, random_state=0)
        >>> est.fit(X, y).predict(X[:3]).shape
        (3,)
        >>> est.predict_interval(X[:3], coverage=0.9).shape  # lower, upper
        (3, 2)
        >>> est.sample(X[:3], n_samples=5).shape
        (3, 5)
        >>> est.score_samples(X[:3], y[:3]).shape  # log p(y | X) per row
        (3,)
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.single_output = True
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X: Any, y: Any) -> CNFRegressor:
        """Fit the flow of ``y`` (shape ``(n,)`` or ``(n, d_y)``) given ``X`` (``(n, K)``).

        Returns:
            ``self``.
        """
        X, y = validate_data(self, X, y, dtype=np.float64, multi_output=True, y_numeric=True,
                             ensure_min_samples=2)  # fmt: skip
        if self.coupling == "ot":  # the trainer's minibatch OT pairs rows whatever their X
            raise ValueError(
                "coupling='ot' pairs each y with the noise nearest to it across rows of "
                "different X, so the flow's base given X is no longer N(0, I) and p(y | X) is "
                "wrong: use coupling='independent'"
            )
        Y = y.reshape(len(y), -1)
        self.n_outputs_, self._flat = Y.shape[1], y.ndim == 1
        seed, train, val = self._split(len(X))
        self.features_ = _varying(X[train])
        names = ["y"] if self._flat else [f"y{j}" for j in range(Y.shape[1])]
        self.columns_ = ColumnPlan.fit(Y[train], names, "y", note=_warn)
        cfg = self._config(seed, len(train))
        x, c = self.columns_.apply(Y), X[:, self.features_]
        data = PairData("y | X", Pairs(x[train], c[train]), Pairs(x[val], c[val]),
                        columns=[names[j] for j in self.columns_.keep],
                        features=self._feature_names(),
                        seed=seed, dequantize=self.dequantize, note=_warn,
                        dequantize_hint="dequantize=True")  # fmt: skip
        self.model_ = self._train(cfg, data)
        # the predictions' base points: a function of the fit, a stream of its own
        self._seed = int(np.random.default_rng([seed, 11]).integers(2**62))
        return self

    def _feature_names(self) -> list[str]:
        """The names of the features the flow sees (``x0, x1, ...`` for an array)."""
        names = getattr(self, "feature_names_in_", None)
        return [f"x{j}" if names is None else str(names[j]) for j in self.features_]

    # --- densities ----------------------------------------------------------------------------

    @torch.no_grad()
    def score_samples(self, X: Any, y: Any) -> np.ndarray:
        r""":math:`\log p(y_i \mid X_i)` for each row, in the units of ``y`` (of its kept columns).

        Returns:
            An array of shape ``(n_samples,)``.
        """
        X, Y = self._pairs(X, y)
        c, x = self._tensor(X[:, self.features_]), self._tensor(self.columns_.apply(Y))
        gen = torch.Generator(device=x.device).manual_seed(0)  # Hutchinson probes above 64 dims
        with self._threads():
            logp = [self.model_.log_prob(xb, context=cb, generator=gen)
                    for xb, cb in zip(x.split(4096), c.split(4096), strict=True)]  # fmt: skip
        return torch.cat(logp).double().cpu().numpy()

    def log_likelihood(self, X: Any, y: Any) -> float:
        r"""The mean conditional log-likelihood :math:`\frac1n \sum_i \log p(y_i \mid X_i)`
        (``score`` is :math:`R^2`, as for every scikit-learn regressor)."""
        return float(np.mean(self.score_samples(X, y)))

    def _pairs(self, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        check_is_fitted(self, "model_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        Y = check_array(y, dtype=np.float64, ensure_2d=False, input_name="y")
        Y = Y.reshape(len(Y), -1) if Y.ndim == 1 else Y
        if Y.ndim != 2 or Y.shape[1] != self.n_outputs_:
            raise ValueError(f"expected y of {self.n_outputs_} column(s), as in fit, got shape "
                             f"{np.shape(y)}")  # fmt: skip
        if len(Y) != len(X):
            raise ValueError(f"X has {len(X)} rows but y has {len(Y)}: give one y per row of X")
        return X, Y

    # --- draws and what is estimated from them ------------------------------------------------

    def sample(self, X: Any, n_samples: int = 1, random_state: Any = None) -> np.ndarray:
        r"""``n_samples`` draws of :math:`y \sim p(y \mid X_i)` for each row of ``X``.

        The same base points serve every row (see the module's docstring), so a row's draws do
        not depend on the other rows; ``random_state`` seeds them (None: fresh ones).

        Returns:
            An array of shape ``(n_rows, n_samples, d_y)``, ``(n_rows, n_samples)`` for a 1-D
            ``y``; dropped columns of ``y`` are filled back in.
        """
        X, m = self._features(X), _count(n_samples)
        z = self._base_points(m, self._generator(random_state))
        return self._shaped(self._push(X, z), axis=2)

    def predict(self, X: Any, n_samples: int = 100) -> np.ndarray:
        r"""The conditional mean :math:`E[y \mid X_i]`, the mean of ``n_samples`` antithetic
        draws per row (the same at every call).

        Returns:
            An array of shape ``(n_rows,)`` for a 1-D ``y``, else ``(n_rows, d_y)``.
        """
        return self._shaped(self._draws(X, n_samples).mean(1), axis=1)

    def predict_quantiles(
        self, X: Any, alpha: float | Sequence[float] = (0.05, 0.5, 0.95), n_samples: int = 1000
    ) -> np.ndarray:
        r"""The quantiles ``alpha`` of :math:`p(y_j \mid X_i)` of each column ``j`` of ``y``
        (skpro's ``predict_quantiles``): for one output, exact (:math:`T_{X_i}(\Phi^{-1}
        (\alpha))`, the flow being increasing; ``n_samples`` is not used), else the empirical
        quantiles of ``n_samples`` draws (as in :meth:`predict`).

        Returns:
            An array of shape ``(n_rows, [d_y,] [len(alpha)])``: the axis of ``y`` only for a
            2-D ``y``, that of ``alpha`` only for a sequence.
        """
        q = self._quantiles(X, _probabilities(alpha, "alpha"), n_samples)
        return self._shaped(q if np.ndim(alpha) else q[..., 0], axis=1)

    def predict_interval(
        self, X: Any, coverage: float | Sequence[float] = 0.9, n_samples: int = 1000
    ) -> np.ndarray:
        r"""Central prediction intervals of ``coverage`` for each column of ``y`` (skpro's
        ``predict_interval``): the quantiles :math:`\tfrac12 - c/2` and :math:`\tfrac12 + c/2`
        of :meth:`predict_quantiles` (exact for one output, else from ``n_samples`` draws).

        Returns:
            An array of shape ``(n_rows, [d_y,] [len(coverage),] 2)``, the last axis (lower,
            upper); the axis of ``y`` only for a 2-D ``y``, that of ``coverage`` only for a
            sequence.
        """
        c = _probabilities(coverage, "coverage")
        q = self._quantiles(X, np.concatenate([0.5 - c / 2, 0.5 + c / 2]), n_samples)
        bounds = np.stack([q[..., : len(c)], q[..., len(c) :]], -1)
        return self._shaped(bounds if np.ndim(coverage) else bounds[..., 0, :], axis=1)

    def _quantiles(self, X: Any, probs: np.ndarray, n_samples: int) -> np.ndarray:
        """The quantiles ``probs`` of every column of ``y`` given each row, ``(n, d_y, k)``."""
        X = self._features(X)
        if self.model_.dim > 1:
            return np.moveaxis(np.quantile(self._draws(X, n_samples), probs, axis=1), 0, -1)
        like = self.model_.log_T  # one output: its increasing map of the base quantiles
        z = torch.special.ndtri(torch.as_tensor(probs, dtype=like.dtype, device=like.device))
        return np.moveaxis(self._push(X, z[:, None]), 1, -1)

    def _draws(self, X: Any, n_samples: int) -> np.ndarray:
        """The prediction draws: antithetic base points from the fit's seed, ``(n, m, d_y)``."""
        X, m = self._features(X), _count(n_samples)
        gen = torch.Generator(device=torch.device(self.device)).manual_seed(self._seed)
        half = self._base_points((m + 1) // 2, gen)
        return self._push(X, torch.cat([half, -half])[:m])

    def _features(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "model_")
        return validate_data(self, X, dtype=np.float64, reset=False)

    def _base_points(self, m: int, gen: torch.Generator) -> torch.Tensor:
        param = self.model_.log_T
        return torch.randn((m, self.model_.dim), generator=gen, dtype=param.dtype,
                           device=param.device)  # fmt: skip

    @torch.no_grad()
    def _push(self, X: np.ndarray, z: torch.Tensor) -> np.ndarray:
        """Every row's flow applied to the base points ``z`` of shape ``(m, d)``: the draws
        ``T_{X_i}(z_k)`` of shape ``(n, m, width of y)``, dropped columns filled in."""
        n, m, width = len(X), len(z), self.columns_.width
        check_memory(n * m * width * 8 * 3, f"{n} x {m} draws",
                     "ask for fewer rows or n_samples at a time")  # fmt: skip
        c, out = self._tensor(X[:, self.features_]), np.empty((n, m, width))
        rows, step = max(1, SAMPLE_CHUNK // m), min(m, SAMPLE_CHUNK)  # bounded memory a solve
        with self._threads():
            for i in range(0, n, rows):
                for k in range(0, m, step):
                    out[i : i + rows, k : k + step] = self._solve(c[i : i + rows], z[k : k + step])
        return out

    def _solve(self, c: torch.Tensor, z: torch.Tensor) -> np.ndarray:
        """``T_c(z)`` for every row of ``c`` and every point of ``z``, ``(len(c), len(z), .)``."""
        context = c.repeat_interleave(len(z), dim=0)
        flow = self.model_.to_data(z.repeat(len(c), 1), context=context, logdet=False)
        return self.columns_.restore(flow.value.double().cpu().numpy()).reshape(len(c), len(z), -1)

    def _shaped(self, a: np.ndarray, axis: int) -> np.ndarray:
        """``a`` without its ``axis`` of the columns of ``y`` where ``y`` was 1-D at fit."""
        return a.squeeze(axis) if self._flat else a


def _varying(X: np.ndarray) -> np.ndarray:
    """The indices of the columns of ``X`` that are not constant on its rows."""
    varying = np.flatnonzero((X != X[:1]).any(0))
    if not len(varying):
        raise ValueError(
            f"every feature of X is constant on the {len(X)} training rows: there is nothing "
            "to condition on (p(y | X) is p(y): fit cnf.CNFDensity to y instead)"
        )
    return varying


def _probabilities(value: Any, name: str) -> np.ndarray:
    """A probability in ``(0, 1)``, or a sequence of them, as a 1-D float array (0 and 1 would
    be the infinite ends of a density on the whole line)."""
    p = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if p.ndim != 1 or not len(p) or not ((p > 0) & (p < 1)).all():
        raise ValueError(f"{name} must be a number in (0, 1) or a sequence of them, got "
                         f"{value!r}")  # fmt: skip
    return p
