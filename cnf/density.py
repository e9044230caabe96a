"""``cnf.CNFDensity``: a continuous normalizing flow as a scikit-learn density estimator.

It follows :class:`sklearn.neighbors.KernelDensity` and :class:`sklearn.mixture.GaussianMixture`:
``fit(X)``, ``score_samples(X)`` (log-density per row), ``score(X)`` (total log-likelihood, as
KernelDensity), ``sample(n_samples, random_state)``; plain constructor arguments, so ``clone``,
``Pipeline`` and ``GridSearchCV`` work. It runs the same code as ``cnf train`` on a table: the
column rules and dequantization of :mod:`cnf.data.tabular`, the model of :mod:`cnf.table_flow` (a
fixed standardization layer whose log-det is included, so densities are in the units of ``X``)
and the training loop of :mod:`cnf.training` (the same loss, optimizer, schedule, seeding and
solver-step adaptation), with early stopping on a held-out part of ``X``. The parameters and
that training are :class:`FlowEstimator`'s, shared with :class:`cnf.regressor.CNFRegressor`.

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

import sys
import warnings
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from cnf.data.base import Dataset
from cnf.data.columns import ColumnPlan
from cnf.data.tabular import Splits, TabularData
from cnf.model_config import DTYPES, ModelConfig
from cnf.runtime import SAMPLE_CHUNK, check_memory, chosen_threads, thread_rule
from cnf.solvers import SolverError
from cnf.table_flow import TabularCNF
from cnf.training import PRESETS, Diverged, KeepBest, TrainConfig, fit, setup
from cnf.training.choice import choose_log_columns

# The estimator's parameters that keep scikit-learn's spelling, and the setting each is in cnf's
# configs (cnf train's flags); every other parameter has the config's own name.
SKLEARN_NAMES = {
    "max_iter": "iters",
    "finetune_iter": "finetune_iters",
    "validation_fraction": "val_fraction",
    "tol": "atol",  # and rtol: one tolerance for both
    "eval_tol": "eval_atol",  # and eval_rtol
    "random_state": "seed",
}

# cnf train's recipe for a table (PRESETS["tabular"], chosen by bench/bench_tabular.py's
# methods): the estimators' defaults are read from it, so the two cannot drift apart
TABLE = PRESETS["tabular"]


class FlowEstimator(BaseEstimator):
    """The parameters and the training that cnf's scikit-learn estimators share
    (:class:`CNFDensity`, :class:`cnf.regressor.CNFRegressor`): one recipe, ``cnf train``'s on a
    table, run by the one training loop with early stopping on a held-out part of the rows. The
    parameters are documented on :class:`CNFDensity`.
    """

    def __init__(
        self,
        *,
        hidden: tuple[int, ...] = TABLE["hidden"],
        activation: str = "tanh",
        preprocess: str = TABLE["preprocess"],
        log_columns: str = TABLE["log_columns"],
        dequantize: bool = False,
        max_iter: int = TABLE["iters"],
        batch_size: int = TABLE["batch_size"],
        lr: float = TABLE["lr"],
        weight_decay: float = TABLE["weight_decay"],
        ema: float = TABLE["ema"],
        kinetic: float = TABLE["kinetic"],
        objective: str = TABLE["objective"],
        coupling: str = "independent",
        finetune_iter: int = TABLE["finetune_iters"],
        finetune_lr: float = TABLE["finetune_lr"],
        jacobian: float = TABLE["jacobian"],
        validation_fraction: float = 0.1,
        patience: int = TABLE["patience"],
        eval_every: int = TABLE["eval_every"],
        trace: str = "auto",
        method: str = "rk4",
        tol: float = 1e-5,
        step_size: float | None = None,
        eval_tol: float = TABLE["eval_atol"],
        dtype: str = "float32",
        device: str = "cpu",
        random_state: int | np.random.RandomState | None = None,
        verbose: bool = False,
    ) -> None:
        self.hidden = hidden
        self.activation = activation
        self.preprocess = preprocess
        self.log_columns = log_columns
        self.dequantize = dequantize
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.ema = ema
        self.kinetic = kinetic
        self.objective = objective
        self.coupling = coupling
        self.finetune_iter = finetune_iter
        self.finetune_lr = finetune_lr
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
        fm = self.objective == "fm"
        model = ModelConfig.for_kind("tabular").replace(
            dtype=self.dtype,
            hidden=tuple(self.hidden),
            activation=self.activation,
            trace=self.trace,
            method=self.method,
            atol=self.tol,
            rtol=self.tol,
            step_size=self.step_size,
            # a fixed-step method with a given step evaluates with it too (a row's density then
            # does not depend on its batch-mates); otherwise dopri5 at eval_tol
            eval_method=self.method if self.step_size is not None else "dopri5",
            eval_atol=self.eval_tol,
            eval_rtol=self.eval_tol,
            eval_step_size=self.step_size,
            preprocess=self.preprocess,
            log_columns=self.log_columns,
        )
        return TrainConfig(data="array", model=model).replace(
            iters=self.max_iter,
            batch_size=min(self.batch_size, n_train),
            lr=self.lr,
            weight_decay=self.weight_decay,
            ema=self.ema,
            eval_every=self.eval_every,
            seed=seed,
            device=self.device,
            threads=chosen_threads(),  # 0: cnf train's rule (restored after fit)
            kinetic=self.kinetic,
            objective=self.objective,
            coupling=self.coupling,
            finetune_iters=self.finetune_iter if fm else 0,
            finetune_lr=self.finetune_lr if fm else None,
            jacobian=self.jacobian,
            patience=self.patience,
            adapt_size=TABLE["adapt_size"],
            adapt_every=TABLE["adapt_every"],
        )

    def _split(self, n: int) -> tuple[int, np.ndarray, np.ndarray]:
        """The run's seed (from ``random_state``), and the training and validation rows of ``n``
        (a seeded permutation; no validation rows below 10)."""
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction!r}"
            )
        seed = int(check_random_state(self.random_state).randint(2**31 - 1))
        n_val = int(self.validation_fraction * n) if n >= 10 else 0
        order = np.random.default_rng([seed, 7]).permutation(n)
        return seed, order[n_val:], order[:n_val]

    def _train(self, cfg: TrainConfig, data: Dataset) -> TabularCNF:
        threads = torch.get_num_threads()
        try:
            return self._fit_model(cfg, data)
        finally:
            torch.set_num_threads(threads)

    def _fit_model(self, cfg: TrainConfig, data: Dataset) -> TabularCNF:
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the global RNG
            say = (lambda text: print(text, file=sys.stderr)) if self.verbose else None
            cfg = choose_log_columns(cfg, data, say=say)  # "auto": none or positive
            self.log_columns_ = cfg.model.table.log_columns
            run = setup(cfg, data=data)
            best = KeepBest()
            try:
                result = fit(
                    run.state,
                    data,
                    run.objective,
                    cfg,
                    hooks=best,
                    progress=self.verbose,
                    quiet=not self.verbose,
                )
            except Diverged as err:
                raise SolverError(
                    f"{type(self).__name__} {err}: lower lr, tighten tol or add kinetic/jacobian "
                    "regularization"
                ) from err
        self.n_iter_ = result.iteration
        self.validation_scores_ = best.scores
        best.restore(run.state)
        self.best_validation_score_ = -run.state.best if best.weights is not None else None
        return run.model.eval()

    def _threads(self) -> AbstractContextManager[None]:
        """Training's rule for threads (one on a CPU for a small model: a second mostly
        contends), unless the caller set a count of their own; theirs restored after."""
        return thread_rule(torch.device(self.device), self.model_.dim)

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.tensor(x, dtype=DTYPES[self.dtype], device=torch.device(self.device))

    def _generator(self, random_state: Any) -> torch.Generator:
        """A torch generator seeded from ``random_state`` (int, ``RandomState`` or None)."""
        seed = int(check_random_state(random_state).randint(2**31 - 1))
        return torch.Generator(device=torch.device(self.device)).manual_seed(seed)


class CNFDensity(DensityMixin, FlowEstimator):
    """Density estimation with a continuous normalizing flow, in the manner of KernelDensity.

    Arguments:
        hidden: hidden widths of the vector field (ConcatSquash MLP).
        activation: its activation (``tanh``, ``softplus``, ...).
        preprocess: the fixed affine layer fitted on the training rows: ``"standardize"``,
            ``"whiten"`` (inverse Cholesky of the covariance; the flow starts at the identity,
            so the untrained model is then the full-covariance Gaussian fit) or ``"none"``.
            Its log-det is part of every density.
        log_columns: ``"positive"``: the log of every column positive on the training rows is
            taken before ``preprocess`` (for skewed positive measurements: sizes, areas,
            concentrations), its Jacobian part of every density; rows at or below zero in such
            a column lie outside the support (``score_samples`` gives them ``-inf``).
            ``"none"``: no log. ``"auto"`` (the default): whichever of the two has the lower
            NLL on the training and validation rows after a short flow matching
            (:mod:`cnf.training.choice`).
        dequantize: add ``U[0, 1)`` noise to integer-valued columns while training (the density is
            then that of the dequantized data; evaluate it at ``X + U`` for the bound on the
            discrete likelihood).
        max_iter: training iterations (AdamW steps): of flow matching with the default
            ``objective="fm"``, which ``finetune_iter`` maximum-likelihood iterations follow.
        batch_size: rows per step (at most the number of training rows).
        lr: AdamW's learning rate (a cosine schedule down to 1% of it).
        weight_decay: AdamW's decoupled weight decay.
        ema: the decay of an exponential moving average of the weights, which validation
            scores and the fitted model keeps (0: off).
        kinetic: RNODE's kinetic-energy weight (arXiv:2002.02798), for maximum likelihood.
        jacobian: RNODE's Jacobian weight, for maximum likelihood.
        objective: ``"fm"`` (the default: flow matching, :class:`cnf.training.FlowMatching`,
            for ``max_iter`` steps, then maximum likelihood for up to ``finetune_iter`` more,
            stopped early on the validation NLL) or ``"mle"`` (maximum likelihood throughout).
            The defaults are ``cnf train``'s tabular recipe, read from
            ``cnf.training.PRESETS["tabular"]``, chosen on tables of 120 to 455 training rows
            (bench/bench_tabular.py); for other tables ``GridSearchCV`` chooses.
        coupling: flow matching's pairing of data and noise, ``"independent"`` or ``"ot"``.
        finetune_iter: iterations of the maximum-likelihood phase after flow matching.
        finetune_lr: the peak learning rate of that phase's own cosine schedule.
        validation_fraction: part of ``X`` held out for early stopping (0, or fewer than 10
            rows: none, train ``max_iter`` steps).
        patience: stop after this many evaluations without a better validation NLL (0: never);
            the best parameters are kept.
        eval_every: iterations between validation evaluations.
        trace: ``"auto"`` (exact up to 8 dimensions, Hutchinson above), ``"exact"`` or
            ``"hutchinson"`` for training; ``score_samples`` uses the exact trace up to
            :data:`cnf.table_flow.EXACT_EVAL_MAX_DIM` (64) dimensions.
        method: the training solver: rk4 by default, from Hairer's step and adapted so that a
            finer solver agrees (Ott et al. 2021).
        tol: its tolerances, ``atol = rtol = tol``.
        step_size: the step of fixed-step methods; with a ``step_size`` the same solver
            scores rows.
        eval_tol: tolerance of the solver used by ``score_samples`` and ``sample``.
        dtype: ``"float32"`` or ``"float64"``.
        device: torch device (``"cpu"``, ``"cuda"``).
        random_state: seed (int), ``RandomState`` or None: split, initialization, batches.
        verbose: show a progress bar with the validation NLL.

    Attributes:
        model_: the fitted :class:`~cnf.table_flow.TabularCNF` (eval mode).
        columns_: the :class:`~cnf.data.columns.ColumnPlan`: constant and exactly duplicated
            columns (on the training rows) are dropped, with a logged warning; ``score_samples``
            is the density of the kept columns and ``sample`` fills the dropped ones back in.
        n_features_in_: as in scikit-learn.
        feature_names_in_: as in scikit-learn.
        log_columns_: ``"none"`` or ``"positive"``, what ``log_columns`` became (``"auto"``
            chooses by a short pilot of each: :mod:`cnf.training.choice`).
        n_iter_: iterations run; ``validation_scores_``: mean validation log-likelihood at each
            evaluation; ``best_validation_score_``: the best of them.

    Example:
        >>> import numpy as np
        >>> X = np.random.default_rng(0).normal(size=(200, 2)) * [1.0, 100.0]
        >>> est = CNFDensity(hidden=(16,), max_iter=20, finetune_iter=10, random_state=0).fit(X)
        >>> est.score_samples(X[:3]).shape
        (3,)
        >>> est.sample(5, random_state=0).shape
        (5, 2)
    """

    def fit(self, X: Any, y: Any = None) -> CNFDensity:
        """Fit the flow to the rows of ``X`` (``y`` is ignored).

        Returns:
            ``self``.
        """
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        seed, train, val = self._split(len(X))
        names = [str(c) for c in getattr(self, "feature_names_in_", range(X.shape[1]))]
        self.columns_ = ColumnPlan.fit(X[train], names, "CNFDensity.fit", note=_warn)
        x = self.columns_.apply(X)
        splits = Splits(x[train], x[val], x[:0])
        cfg = self._config(seed, len(splits.train))
        kept = [names[j] for j in self.columns_.keep]
        data = TabularData("X", splits, kept, seed=seed, dequantize=self.dequantize, note=_warn,
                           dequantize_hint="dequantize=True")  # fmt: skip
        self.model_ = self._train(cfg, data)
        return self

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
        with self._threads():
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
        n = _count(n_samples)
        check_memory(n * self.columns_.width * 8 * 2, f"{n} samples",
                     "draw fewer at a time (n_samples)")  # fmt: skip
        gen = self._generator(random_state)
        out = np.empty((n, self.columns_.width))
        with self._threads():
            for start in range(0, n, SAMPLE_CHUNK):  # memory per solve stays bounded
                x = self.model_.sample(min(SAMPLE_CHUNK, n - start), generator=gen)
                out[start : start + len(x)] = self.columns_.restore(x.double().cpu().numpy())
        return out


class CNFDensityWarning(UserWarning):
    """What ``CNFDensity.fit`` (or ``CNFRegressor.fit``, of ``y``) noticed about the data
    (dropped or integer columns)."""


def _count(n_samples: Any, name: str = "n_samples") -> int:
    if not isinstance(n_samples, int | np.integer) or n_samples < 1:
        raise ValueError(f"{name} must be a positive integer, got {n_samples!r}")
    return int(n_samples)


_WARNED: set[str] = set()  # what this process has been told: a grid search is told once


def _warn(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, CNFDensityWarning, stacklevel=4)
