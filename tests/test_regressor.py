"""cnf.CNFRegressor against closed-form conditionals: a linear-Gaussian regression (its
log-likelihood, mean, intervals and spread), a heteroscedastic one, two correlated outputs;
scikit-learn's estimator checks; refusals."""

import math

import numpy as np
import pytest
from scipy.stats import multivariate_normal, norm
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.utils.estimator_checks import parametrize_with_checks

import cnf
from cnf.density import _WARNED
from cnf.regressor import EXPECTED_FAILED_CHECKS

# Trained just enough for check_regressors_train's R^2 > 0.5 on its data (0.8 here), in about
# 0.1 s a fit; fixed-step float64, so a row's results do not depend on its batch-mates.
CHECKED = cnf.CNFRegressor(hidden=(8,), max_iter=50, finetune_iter=2, lr=5e-2, batch_size=64,
                           eval_every=25, method="rk4", step_size=0.5, dtype="float64",
                           random_state=0)  # fmt: skip


@parametrize_with_checks([CHECKED], expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS)
def test_sklearn_estimator_checks(estimator, check) -> None:
    check(estimator)


# Flow matching alone, every step (no validation split: on 200 held-out rows the validation
# NLL is too noisy to stop on); fixed-step rk4 in float64 for training, densities and draws.
RECIPE = dict(hidden=(32, 32), max_iter=1500, finetune_iter=0, lr=1e-2, weight_decay=1e-2,
              batch_size=512, validation_fraction=0.0, method="rk4", step_size=0.25,
              dtype="float64", random_state=0)  # fmt: skip
A, B, SIGMA = np.array([1.0, -0.5]), 0.5, 0.4  # y = A.X + B + SIGMA eps, X ~ U(-1, 1)^2


def _linear(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, 2))
    return X, X @ A + B + SIGMA * rng.normal(size=n)


@pytest.fixture(scope="module")
def linear() -> cnf.CNFRegressor:
    return cnf.CNFRegressor(**RECIPE).fit(*_linear(2000, 0))


def test_the_log_likelihood_is_the_closed_form_one(linear) -> None:
    X, y = _linear(1000, 1)
    model = linear.score_samples(X, y)
    truth = norm.logpdf(y, X @ A + B, SIGMA)
    kl = truth - model  # E[log p - log q]: the KL divergence, estimated on paired rows
    assert kl.mean() < 0.03 + 3 * kl.std() / math.sqrt(len(y))
    closed = -0.5 * math.log(2 * math.pi * SIGMA**2) - 0.5  # E log N(y; mean, sigma^2)
    se = truth.std() / math.sqrt(len(y))
    assert linear.log_likelihood(X, y) == pytest.approx(closed, abs=0.03 + 3 * se)
    assert linear.log_likelihood(X, y) == pytest.approx(model.mean(), rel=1e-12)


def test_predict_is_the_conditional_mean_and_score_its_r2(linear) -> None:
    X, y = _linear(300, 2)
    pred = linear.predict(X)
    assert pred.shape == (300,)
    assert np.sqrt(np.mean((pred - X @ A - B) ** 2)) < 0.25 * SIGMA
    best = 1 - SIGMA**2 / y.var()  # the R^2 of the true mean
    assert linear.score(X, y) == pytest.approx(best, abs=0.03)
    # predictions are a function of X: the same at every call, row by row, in any order
    np.testing.assert_array_equal(pred, linear.predict(X))
    np.testing.assert_allclose(linear.predict(X[:7]), pred[:7], rtol=1e-10)
    np.testing.assert_allclose(linear.predict(X[::-1]), pred[::-1], rtol=1e-10)


def test_a_90_percent_interval_covers_90_percent_of_new_points(linear) -> None:
    X, y = _linear(2000, 3)
    lower, upper = linear.predict_interval(X, coverage=0.9).T
    covered = np.mean((lower <= y) & (y <= upper))
    # 4 binomial standard deviations, and 0.02 for the model: after this short training its
    # intervals are up to 2% narrow (0.887-0.893 on these rows for three seeds; the true 0.899)
    assert abs(covered - 0.9) < 0.02 + 4 * math.sqrt(0.9 * 0.1 / len(y))
    width = 2 * norm.ppf(0.95) * SIGMA
    assert np.mean(upper - lower) == pytest.approx(width, rel=0.12)
    nested = linear.predict_interval(X[:5], coverage=[0.5, 0.9])
    assert nested.shape == (5, 2, 2)  # rows, coverages, (lower, upper)
    assert (nested[:, 1, 0] < nested[:, 0, 0]).all() and (nested[:, 0, 1] < nested[:, 1, 1]).all()
    q = linear.predict_quantiles(X[:5], alpha=[0.05, 0.5, 0.95])
    np.testing.assert_allclose(q[:, [0, 2]], nested[:, 1], rtol=1e-12)  # 0.5 -+ 0.9 / 2


def test_one_outputs_quantiles_are_those_of_its_draws(linear) -> None:
    """The flow of a scalar is increasing: quantile a of p(y | x) is T_x(Phi^-1(a)), exactly
    what the empirical quantiles of many draws approach."""
    X, alpha = _linear(4, 4)[0], [0.1, 0.3, 0.5, 0.8]
    draws = linear.sample(X, n_samples=20_000, random_state=1)
    empirical = np.quantile(draws, alpha, axis=1).T
    np.testing.assert_allclose(linear.predict_quantiles(X, alpha), empirical, atol=0.03 * SIGMA)


def test_draws_have_each_rows_mean_and_spread(linear) -> None:
    X = np.array([[-0.5, 0.5], [0.0, 0.0], [0.5, -0.5], [0.5, 0.5], [-0.5, -0.5]])
    draws = linear.sample(X, n_samples=4000, random_state=0)
    assert draws.shape == (5, 4000)
    np.testing.assert_allclose(draws.mean(1), X @ A + B, atol=0.25 * SIGMA)
    np.testing.assert_allclose(draws.std(1), SIGMA, rtol=0.12)
    np.testing.assert_array_equal(draws[1:3], linear.sample(X[1:3], 4000, random_state=0))


def test_intervals_widen_where_the_noise_does() -> None:
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, (2000, 1))
    sigma = lambda x: 0.1 + 0.2 * (x[:, 0] + 1)  # noqa: E731  from 0.1 to 0.5
    y = x[:, 0] + sigma(x) * rng.normal(size=2000)
    est = cnf.CNFRegressor(**{**RECIPE, "hidden": (32,)}).fit(x, y)
    grid = np.linspace(-0.8, 0.8, 5)[:, None]
    lower, upper = est.predict_interval(grid, coverage=0.9).T
    width = upper - lower
    assert (np.diff(width) > 0).all()
    np.testing.assert_allclose(width, 2 * norm.ppf(0.95) * sigma(grid), rtol=0.25)
    assert width[-1] > 2.5 * width[0]  # the truth: 0.46 / 0.14


def test_two_correlated_outputs() -> None:
    cov = np.array([[0.3**2, 0.6 * 0.3 * 0.5], [0.6 * 0.3 * 0.5, 0.5**2]])
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (2500, 1))
    mean = lambda x: np.column_stack([x[:, 0], 1 - x[:, 0]])  # noqa: E731
    y = mean(x) + rng.multivariate_normal([0, 0], cov, size=2500)
    est = cnf.CNFRegressor(**{**RECIPE, "max_iter": 1000}).fit(x[:2000], y[:2000])
    xt, yt = x[2000:], y[2000:]
    truth = np.array(
        [multivariate_normal.logpdf(b, a, cov) for a, b in zip(mean(xt), yt, strict=True)]
    )
    assert (truth - est.score_samples(xt, yt)).mean() < 0.05
    assert est.n_outputs_ == 2 and est.predict(xt).shape == (500, 2)
    assert np.sqrt(np.mean((est.predict(xt) - mean(xt)) ** 2)) < 0.1
    draws = est.sample(np.array([[0.0]]), n_samples=4000, random_state=0)[0]
    assert draws.shape == (4000, 2)
    assert np.corrcoef(draws.T)[0, 1] == pytest.approx(0.6, abs=0.1)
    assert est.predict_interval(xt[:3]).shape == (3, 2, 2)  # rows, outputs, (lower, upper)
    assert est.predict_interval(xt[:3], coverage=[0.5, 0.9]).shape == (3, 2, 2, 2)
    assert est.predict_quantiles(xt[:3], alpha=0.5).shape == (3, 2)


# --- shapes, the shared machinery, refusals ------------------------------------------------

TINY = dict(hidden=(4,), max_iter=4, finetune_iter=2, batch_size=16, eval_every=2,
            method="rk4", step_size=0.5, dtype="float64", random_state=0)  # fmt: skip


@pytest.fixture(scope="module")
def tiny() -> tuple[cnf.CNFRegressor, np.ndarray, np.ndarray]:
    X, y = _linear(60, 6)
    return cnf.CNFRegressor(**TINY).fit(X, y), X, y


def test_it_trains_a_conditional_flow_through_the_one_loop(tiny) -> None:
    est, X, _ = tiny
    assert est.model_.context_features == 2 and est.model_.dim == 1
    # 6 iterations (4 of flow matching, 2 of maximum likelihood) evaluated every 2
    assert est.n_iter_ == 6 and len(est.validation_scores_) == 3
    assert est.n_features_in_ == 2 and est.features_.tolist() == [0, 1]
    assert est.predict(X).shape == est.sample(X, 3).shape[:1] == (60,)
    assert est.predict_quantiles(X[:4], alpha=0.1).shape == (4,)


def test_draws_in_chunks_are_the_draws_at_once(tiny, monkeypatch) -> None:
    est, X, _ = tiny
    whole = est.sample(X[:5], n_samples=25, random_state=0)
    monkeypatch.setattr("cnf.regressor.SAMPLE_CHUNK", 10)  # one row a solve, 10 points a solve
    np.testing.assert_array_equal(est.sample(X[:5], n_samples=25, random_state=0), whole)


def test_a_column_vector_y_gives_column_vectors_back() -> None:
    X, y = _linear(40, 7)
    est = cnf.CNFRegressor(**TINY).fit(X, y[:, None])
    assert est.predict(X).shape == (40, 1) and est.sample(X, 3).shape == (40, 3, 1)
    assert est.predict_interval(X).shape == (40, 1, 2)
    assert est.score_samples(X, y[:, None]).shape == (40,)


def test_a_constant_output_is_dropped_with_a_warning_and_put_back() -> None:
    X, y = _linear(40, 8)
    _WARNED.clear()
    with pytest.warns(cnf.CNFDensityWarning, match="y: dropped 1 constant columns"):
        est = cnf.CNFRegressor(**TINY).fit(X, np.column_stack([y, np.full(40, 2.5)]))
    assert est.model_.dim == 1 and (est.predict(X)[:, 1] == 2.5).all()
    assert (est.sample(X[:2], 5)[..., 1] == 2.5).all()


def test_a_grid_search_by_log_likelihood() -> None:
    X, y = _linear(60, 9)
    search = GridSearchCV(cnf.CNFRegressor(**TINY), {"hidden": [(4,), (8,)]}, cv=2,
                          scoring=lambda est, X, y: est.log_likelihood(X, y)).fit(X, y)  # fmt: skip
    assert search.best_params_["hidden"] in [(4,), (8,)]
    assert np.isfinite(search.best_score_)


def test_nothing_before_fit() -> None:
    est, X = cnf.CNFRegressor(**TINY), np.zeros((3, 2))
    for call in (est.predict, est.predict_interval, est.predict_quantiles, est.sample):
        with pytest.raises(NotFittedError):
            call(X)
    with pytest.raises(NotFittedError):
        est.score_samples(X, np.zeros(3))


NOISE = np.random.default_rng(0).normal(size=(10, 2))


@pytest.mark.parametrize(
    ("X", "y", "error"),
    [
        (np.zeros((10, 2)), np.zeros(9), "inconsistent numbers of samples"),
        (np.full((10, 2), np.nan), np.zeros(10), "Input X contains NaN"),
        (NOISE, np.full(10, np.nan), "Input y contains NaN"),
        (np.ones((10, 2)), np.arange(10.0), "every feature of X is constant on the"),
        (NOISE, np.ones(10), "every column of y is constant"),
    ],
)  # fmt: skip
def test_fit_refuses(X, y, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        cnf.CNFRegressor(**TINY).fit(X, y)


def test_minibatch_optimal_transport_is_refused() -> None:
    # it couples noise and y across rows of different X: p(y | X) came out 0.58 nats off
    with pytest.raises(ValueError, match="coupling='ot' pairs each y with the noise nearest"):
        cnf.CNFRegressor(**TINY, coupling="ot").fit(*_linear(20, 0))


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda e, X, y: e.predict(X[:, :1]), "X has 1 features, but CNFRegressor is expecting 2"),
        (lambda e, X, y: e.score_samples(X, y[:-1]), "X has 60 rows but y has 59: give one y"),
        (lambda e, X, y: e.score_samples(X, np.c_[y, y]), r"expected y of 1 column\(s\), as in"),
        (lambda e, X, y: e.predict(np.c_[X[:, :1], X[:, :1] * np.nan]), "Input X contains NaN"),
        (lambda e, X, y: e.predict_interval(X, coverage=1.0), r"coverage must be a number in \(0"),
        (lambda e, X, y: e.predict_quantiles(X, alpha=[0.5, 0]), r"alpha must be a number in \(0"),
        (lambda e, X, y: e.sample(X, n_samples=0), "n_samples must be a positive integer, got 0"),
        (lambda e, X, y: e.predict(X, n_samples=1.5), "n_samples must be a positive integer"),
    ],
)  # fmt: skip
def test_predictions_refuse(tiny, call, error: str) -> None:
    est, X, y = tiny
    with pytest.raises(ValueError, match=error):
        call(est, X, y)


@pytest.mark.slow
def test_the_default_recipe_learns_the_linear_gaussian() -> None:
    """cnf train's tabular recipe, every default (flow matching, then maximum likelihood
    stopped early on 10% of the rows; float32)."""
    est = cnf.CNFRegressor(random_state=0).fit(*_linear(4000, 10))
    X, y = _linear(2000, 11)
    kl = norm.logpdf(y, X @ A + B, SIGMA) - est.score_samples(X, y)
    assert kl.mean() < 0.02 + 3 * kl.std() / math.sqrt(len(y))
    lower, upper = est.predict_interval(X[:1000], n_samples=500).T
    assert abs(np.mean((lower <= y[:1000]) & (y[:1000] <= upper)) - 0.9) < 4 * math.sqrt(
        0.09 / 1000
    )
