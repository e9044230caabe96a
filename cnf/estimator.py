"""``cnf.CNFDensity``: a continuous normalizing flow as a scikit-learn density estimator.

It follows :class:`sklearn.neighbors.KernelDensity` and :class:`sklearn.mixture.GaussianMixture`:
``fit(X)``, ``score_samples(X)`` (log-density per row), ``score(X)`` (total log-likelihood, as
KernelDensity), ``sample(n_samples, random_state)``; plain constructor arguments, so ``clone``,
``Pipeline`` and ``GridSearchCV`` work. It runs the same code as ``cnf train`` on a table: the
column rules and dequantization of :mod:`cnf.data.tabular`, the model of :mod:`cnf.tabular` (a
fixed standardization layer whose log-det is included, so densities are in the units of ``X``)
and the trainer's loss and optimizer (:func:`cnf.train.training_loss`,
:func:`cnf.train.make_optimizer`), with early stopping on a held-out part of ``X``.

scikit-learn's ``check_estimator`` passes in full, no check skipped or expected to fail
(tests/test_estimator.py runs them on a small fixed-step float64 configuration;
``check_array_api_input`` skips itself unless ``SCIPY_ARRAY_API`` is set). One property depends on
the solver: with a fixed-step ``method`` (``"rk4"`` with ``step_size``) a row's log-density does
not depend on the other rows scored with it; an adaptive solver (the default ``dopri5``) picks its
steps for the whole batch, so a row's log-density moves within the solver tolerance
(``eval_tol``) with its batch-mates, and ``check_methods_subset_invariance`` (which asks for a
relative 1e-7) fails for that configuration.
"""

from __future__ import annotations

import copy
import math
import sys
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data
from tqdm.auto import tqdm

from cnf.data.tabular import ColumnPlan, Splits, TabularData
from cnf.evaluate import evaluate
from cnf.solvers import SolverError
from cnf.tabular import TabularCNF, build_tabular_cnf
from cnf.train import DTYPES, TrainConfig, make_optimizer, training_loss


class CNFDensity(DensityMixin, BaseEstimator):
    """Density estimation with a continuous normalizing flow, in the manner of KernelDensity.

    Arguments:
        hidden: hidden widths of the vector field (ConcatSquash MLP).
        activation: its activation (``tanh``, ``softplus``, ...).
        preprocess: the fixed affine layer fitted on the training rows: ``"standardize"``,
            ``"whiten"`` (inverse Cholesky of the covariance; the flow starts at the identity,
            so the untrained model is then the full-covariance Gaussian fit) or ``"none"``.
            Its log-det is part of every density.
        dequantize: add ``U[0, 1)`` noise to integer-valued columns while training (the density is
            then that of the dequantized data; evaluate it at ``X + U`` for the bound on the
            discrete likelihood).
        max_iter: training iterations (Adam steps), at most.
        batch_size: rows per step (at most the number of training rows).
        lr, weight_decay: AdamW's learning rate (cosine schedule to 1%) and weight decay.
        kinetic, jacobian: RNODE regularization weights (arXiv:2002.02798).
        validation_fraction: part of ``X`` held out for early stopping (0, or fewer than 10
            rows: none, train ``max_iter`` steps).
        patience: stop after this many evaluations without a better validation NLL (0: never);
            the best parameters are kept.
        eval_every: iterations between validation evaluations.
        trace: ``"auto"`` (exact up to 8 dimensions, Hutchinson above), ``"exact"`` or
            ``"hutchinson"`` for training; ``score_samples`` uses the exact trace up to
            :data:`cnf.tabular.EXACT_EVAL_MAX_DIM` (64) dimensions.
        method, tol, step_size: training solver (``atol = rtol = tol``; ``step_size`` for
            fixed-step methods).
        eval_tol: tolerance of the solver used by ``score_samples`` and ``sample``.
        dtype: ``"float32"`` or ``"float64"``.
        device: torch device (``"cpu"``, ``"cuda"``).
        random_state: seed (int), ``RandomState`` or None: split, initialization, batches.
        verbose: show a progress bar with the validation NLL.

    Attributes:
        model_: the fitted :class:`~cnf.tabular.TabularCNF` (eval mode).
        columns_: the :class:`~cnf.data.tabular.ColumnPlan`: constant and exactly duplicated
            columns (on the training rows) are dropped, with a logged warning; ``score_samples``
            is the density of the kept columns and ``sample`` fills the dropped ones back in.
        n_features_in_, feature_names_in_: as in scikit-learn.
        n_iter_: iterations run; ``validation_scores_``: mean validation log-likelihood at each
            evaluation; ``best_validation_score_``: the best of them.

    Example:
        >>> import numpy as np
        >>> X = np.random.default_rng(0).normal(size=(200, 2)) * [1.0, 100.0]
        >>> est = CNFDensity(hidden=(16,), max_iter=20, random_state=0).fit(X)
        >>> est.score_samples(X[:3]).shape
        (3,)
        >>> est.sample(5, random_state=0).shape
        (5, 2)
    """

    def __init__(
        self,
        *,
        hidden: tuple[int, ...] = (64, 64),
        activation: str = "tanh",
        preprocess: str = "standardize",
        dequantize: bool = False,
        max_iter: int = 1000,
        batch_size: int = 256,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        kinetic: float = 0.0,
        jacobian: float = 0.0,
        validation_fraction: float = 0.1,
        patience: int = 10,
        eval_every: int = 50,
        trace: str = "auto",
        method: str = "dopri5",
        tol: float = 1e-5,
        step_size: float | None = None,
        eval_tol: float = 1e-7,
        dtype: str = "float32",
        device: str = "cpu",
        random_state: int | np.random.RandomState | None = None,
        verbose: bool = False,
    ) -> None:
        self.hidden = hidden
        self.activation = activation
        self.preprocess = preprocess
        self.dequantize = dequantize
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.kinetic = kinetic
        self.jacobian = jacobian
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.eval_every = eval_every
        self.trace = trace
        self.method = method
        self.tol = tol
        self.step_size = step_size
        self.eval_tol = eval_tol
        self.dtype = dtype
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # --- fitting ------------------------------------------------------------------------------

    def _config(self, seed: int, n_train: int) -> TrainConfig:
        return TrainConfig(
            data="array", iters=self.max_iter, batch_size=min(self.batch_size, n_train),
            lr=self.lr, weight_decay=self.weight_decay, eval_every=self.eval_every, seed=seed,
            dtype=self.dtype, hidden=tuple(self.hidden), activation=self.activation,
            trace=self.trace, method=self.method, atol=self.tol, rtol=self.tol,
            step_size=self.step_size, kinetic=self.kinetic, jacobian=self.jacobian,
            eval_method=self.method, eval_atol=self.eval_tol, eval_rtol=self.eval_tol,
            eval_step_size=self.step_size, preprocess=self.preprocess, patience=self.patience,
        )  # fmt: skip

    def fit(self, X: Any, y: Any = None) -> CNFDensity:
        """Fit the flow to the rows of ``X`` (``y`` is ignored).

        Returns:
            ``self``.
        """
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction!r}"
            )
        seed = int(check_random_state(self.random_state).randint(2**31 - 1))
        n_val = int(self.validation_fraction * len(X)) if len(X) >= 10 else 0
        order = np.random.default_rng([seed, 7]).permutation(len(X))
        names = [str(c) for c in getattr(self, "feature_names_in_", range(X.shape[1]))]
        self.columns_ = ColumnPlan.fit(X[order[n_val:]], names, "CNFDensity.fit")
        x = self.columns_.apply(X)
        splits = Splits(x[order[n_val:]], x[order[:n_val]], x[:0])
        cfg = self._config(seed, len(splits.train))
        kept = [names[j] for j in self.columns_.keep]
        data = TabularData("X", splits, kept, seed=seed, dequantize=self.dequantize)
        data.check_range(self.dtype)
        self.model_ = self._train(cfg, data)
        return self

    def _train(self, cfg: TrainConfig, data: TabularData) -> TabularCNF:
        device, dtype = torch.device(self.device), DTYPES[cfg.dtype]
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(cfg.seed)
            model = build_tabular_cnf(cfg, {"event_shape": list(data.event_shape)})
        model = model.to(device=device, dtype=dtype)
        model.fit_preprocessing(data.train_data())
        opt, sched = make_optimizer(model, cfg)
        x_val = self._tensor(data.validation())
        best, best_state, stale, self.validation_scores_ = math.inf, None, 0, []
        bar = tqdm(range(1, cfg.iters + 1), disable=not self.verbose, file=sys.stderr)
        for it in bar:
            self.n_iter_ = it
            x = self._tensor(data.train_batch(cfg.batch_size, it))
            gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + it)
            loss, _ = training_loss(model, x, cfg, gen)
            if not torch.isfinite(loss):
                raise SolverError(
                    f"CNFDensity training diverged at iteration {it} (loss {loss.item():.4g}): "
                    "lower lr, tighten tol or add kinetic/jacobian regularization"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            if len(x_val) and (it % cfg.eval_every == 0 or it == cfg.iters):
                nll = evaluate(model, x_val).nll
                self.validation_scores_.append(-nll)
                bar.set_postfix(val_nll=f"{nll:.4f}", refresh=False)
                stale = 0 if nll < best else stale + 1
                if nll < best:
                    best, best_state = nll, copy.deepcopy(model.state_dict())
                if cfg.patience and stale >= cfg.patience:
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
        self.best_validation_score_ = -best if best_state is not None else None
        return model.eval()

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.tensor(x, dtype=DTYPES[self.dtype], device=torch.device(self.device))

    # --- densities and samples -----------------------------------------------------------------

    @torch.no_grad()
    def score_samples(self, X: Any) -> np.ndarray:
        """Log-density of each row of ``X`` in the units of ``X`` (of the kept columns).

        Returns:
            An array of shape ``(n_samples,)``.
        """
        check_is_fitted(self, "model_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        x = self._tensor(self.columns_.apply(X))
        gen = torch.Generator(device=x.device).manual_seed(0)  # Hutchinson probes above 64 dims
        logp = [self.model_.log_prob(batch, generator=gen) for batch in x.split(4096)]
        return torch.cat(logp).double().cpu().numpy()

    def score(self, X: Any, y: Any = None) -> float:
        """Total log-likelihood of ``X`` (as :meth:`KernelDensity.score`; ``y`` is ignored)."""
        return float(np.sum(self.score_samples(X)))

    @torch.no_grad()
    def sample(self, n_samples: int = 1, random_state: Any = None) -> np.ndarray:
        """Draw ``n_samples`` rows in the units of the training data.

        Returns:
            An array of shape ``(n_samples, n_features_in_)``; dropped columns are filled back
            in (constants, copies of the columns they repeated).
        """
        check_is_fitted(self, "model_")
        if not isinstance(n_samples, int | np.integer) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        seed = int(check_random_state(random_state).randint(2**31 - 1))
        gen = torch.Generator(device=torch.device(self.device)).manual_seed(seed)
        x = self.model_.sample(int(n_samples), generator=gen)
        return self.columns_.restore(x.double().cpu().numpy())
