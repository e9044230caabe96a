"""cnf.CNFDensity: scikit-learn's estimator checks, densities that match the model, pipelines."""

import numpy as np
import pytest
import torch
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.estimator_checks import parametrize_with_checks

import cnf
from cnf.flow import CNF

# Every scikit-learn check runs, none skipped or expected to fail (check_array_api_input skips
# itself unless SCIPY_ARRAY_API is set). The instance is fixed-step float64: with an adaptive
# solver a row's log-density depends on its batch-mates within the solver tolerance (see below),
# which the subset-invariance check (rtol 1e-7) would flag.
FIXED = cnf.CNFDensity(hidden=(4,), max_iter=2, finetune_iter=2, batch_size=16, eval_every=2,
                       method="rk4", step_size=0.5, dtype="float64", random_state=0)  # fmt: skip


@parametrize_with_checks([FIXED])
def test_sklearn_estimator_checks(estimator, check) -> None:
    check(estimator)


def test_adaptive_solver_scores_a_subset_within_its_tolerance() -> None:
    x = np.random.default_rng(3).normal(size=(50, 3))
    est = cnf.CNFDensity(hidden=(8,), max_iter=5, finetune_iter=3, eval_tol=1e-7,
                         random_state=0).fit(x)  # fmt: skip
    full, part = est.score_samples(x), est.score_samples(x[:7])
    np.testing.assert_allclose(part, full[:7], rtol=1e-5)


@pytest.fixture(scope="module")
def fitted() -> tuple[cnf.CNFDensity, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 3)) * [1.0, 50.0, 0.1] + [0.0, 1000.0, -5.0]
    x = np.column_stack([x, np.full(120, 2.5), x[:, 0]])  # a constant and a duplicate column
    est = cnf.CNFDensity(hidden=(16,), max_iter=10, eval_every=5, method="rk4", step_size=0.25,
                         dtype="float64", preprocess="standardize", log_columns="none",
                         objective="mle", random_state=0)  # fmt: skip
    return est.fit(x), x


def test_score_samples_is_the_model_log_prob_with_preprocessing(fitted) -> None:
    est, x = fitted
    kept = x[:10, :3]
    assert est.columns_.keep == (0, 1, 2)
    model = est.model_
    with torch.no_grad():
        xt = torch.tensor(kept)
        u = (xt - model.normalizer.loc) @ model.normalizer.weight.T
        out = CNF.to_latent(model, u, trace="exact")  # the bare flow on standardized data
        log_det_w = model.normalizer.weight.diagonal().log().sum()  # W = diag(1 / sigma)
        logp = model.base_log_prob(out.value) + out.logdet + log_det_w
    np.testing.assert_allclose(est.score_samples(x[:10]), logp.numpy(), rtol=1e-10)
    assert est.score(x[:10]) == pytest.approx(est.score_samples(x[:10]).sum())


def test_standardization_uses_the_training_rows_only(fitted) -> None:
    est, x = fitted
    seed = np.random.RandomState(0).randint(2**31 - 1)  # random_state=0, as fit derives it
    train = x[np.random.default_rng([seed, 7]).permutation(120)[12:], :3]  # 10% held out
    norm = est.model_.normalizer
    np.testing.assert_allclose(norm.loc.numpy(), train.mean(0), rtol=1e-12)
    np.testing.assert_allclose(1 / norm.weight.diagonal().numpy(), train.std(0), rtol=1e-12)
    assert est.n_features_in_ == 5 and est.n_iter_ == 10 and len(est.validation_scores_) == 2


def test_samples_restore_dropped_columns(fitted) -> None:
    est, _ = fitted
    s = est.sample(400, random_state=1)
    assert s.shape == (400, 5)
    assert (s[:, 3] == 2.5).all() and np.array_equal(s[:, 4], s[:, 0])
    assert abs(s[:, 1].mean() - 1000) < 20 and 25 < s[:, 1].std() < 100  # original units
    np.testing.assert_array_equal(s, est.sample(400, random_state=1))
    with pytest.raises(ValueError, match="n_samples must be a positive integer, got 0"):
        est.sample(0)


def test_pipeline_and_grid_search() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 2))
    base = cnf.CNFDensity(max_iter=4, finetune_iter=2, eval_every=2, method="rk4", step_size=0.5,
                          random_state=0)  # fmt: skip
    pipe = Pipeline([("identity", FunctionTransformer()), ("cnf", base)]).fit(x)
    assert pipe.score_samples(x).shape == (60,)
    search = GridSearchCV(base, {"hidden": [(4,), (8,)]}, cv=2).fit(x)
    assert search.best_params_["hidden"] in [(4,), (8,)]
    assert np.isfinite(search.best_estimator_.score(x))


def test_a_grid_search_warns_about_integer_and_constant_columns_once() -> None:
    import warnings

    rng = np.random.default_rng(1)
    x = np.column_stack([rng.integers(0, 5, 60), rng.normal(size=60), np.full(60, 2.0)])
    base = cnf.CNFDensity(max_iter=2, finetune_iter=2, eval_every=2, method="rk4", step_size=0.5,
                          random_state=0)  # fmt: skip
    from cnf.density import _WARNED

    _WARNED.clear()  # what earlier tests were told
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GridSearchCV(base, {"hidden": [(4,), (8,)]}, cv=2).fit(x)
    messages = [str(w.message) for w in caught if issubclass(w.category, cnf.CNFDensityWarning)]
    assert len(messages) == 2, messages  # 5 fits: the constant column and the integer column
    assert "dequantize=True" in messages[1] and "--dequantize" not in messages[1]


def test_early_stopping_keeps_the_best_parameters() -> None:
    x = np.random.default_rng(2).normal(size=(100, 2))
    est = cnf.CNFDensity(hidden=(8,), max_iter=200, eval_every=5, patience=2, lr=1e-12,
                         method="rk4", step_size=0.5, objective="mle",
                         random_state=0).fit(x)  # fmt: skip
    # a learning rate too small to change float32 weights: no evaluation improves on the first
    assert est.n_iter_ == 15 and len(est.validation_scores_) == 3
    assert est.best_validation_score_ == est.validation_scores_[0]


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"validation_fraction": 1.0}, "validation_fraction must be in"),
        ({"max_iter": 0}, "iters must be a positive integer"),
        ({"preprocess": "zscore"}, "preprocess 'zscore' is unknown"),
        ({"method": "rk5"}, "method 'rk5' is unknown"),
    ],
)
def test_bad_parameters_fail_at_fit(params: dict, error: str) -> None:
    est = cnf.CNFDensity(**params)  # scikit-learn: no validation in __init__
    with pytest.raises(ValueError, match=error):
        est.fit(np.random.default_rng(0).normal(size=(20, 2)))


def test_the_default_trains_by_flow_matching_then_maximum_likelihood() -> None:
    x = np.random.default_rng(4).normal(size=(200, 3)) @ np.array([[1, 0.5, 0], [0, 1, 0.3],
                                                                   [0, 0, 1.0]])  # fmt: skip
    est = cnf.CNFDensity(hidden=(16,), max_iter=60, finetune_iter=40, eval_every=20,
                         random_state=0).fit(x)  # fmt: skip
    assert 60 < est.n_iter_ <= 100 and len(est.validation_scores_) == est.n_iter_ // 20
    gaussian = cnf.CNFDensity(hidden=(16,), max_iter=1, finetune_iter=0, random_state=0).fit(x)
    # whitening starts the flow at the Gaussian fit; training must not make the density worse
    assert est.score(x) >= gaussian.score(x) - 1.0


def test_the_defaults_are_cnf_trains_tabular_recipe() -> None:
    # what CNFDensity() trains is what `cnf train --data wine` trains: every option the recipe
    # sets, from the config the estimator builds (not from its parameters' defaults alone)
    ours = cnf.CNFDensity()._config(seed=0, n_train=1000).flat_options()
    theirs = cnf.training.TrainConfig.for_data("wine").flat_options()
    recipe = set(cnf.training.PRESETS["tabular"]) - {"test_size"}  # no test split in a fit
    assert {k: ours[k] for k in recipe} == {k: theirs[k] for k in recipe}
    assert (ours["activation"], ours["mlp"]) == (theirs["activation"], theirs["mlp"])
