"""Conditional tasks against mathematics, in float64: each p(x | c) integrates to one, the
samplers agree with the closed forms, the Gaussian-linear posterior with a brute-force conjugate
computation, and the Monte-Carlo KL with the closed-form Gaussian KL."""

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from cnf.data.conditional import (
    GaussianLinear,
    GaussiansGivenComponent,
    RotatingGaussian,
    conditional_kl,
)
from cnf.data.toy import TOY

TASKS = {
    "8gaussians": (GaussiansGivenComponent(), np.arange(8)),
    "rotating": (RotatingGaussian(), np.array([[-1.0], [-0.3], [0.4], [1.0]])),
    "linear": (GaussianLinear(2, prior_cov=[[0.5, 0.2], [0.2, 0.3]], noise_cov=[0.2, 0.1]), None),
}


def _contexts(name: str) -> Any:
    task, contexts = TASKS[name]
    return task.observations(4) if contexts is None else contexts


def _grid(lim: float, m: int, centre: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Midpoints of an m x m grid on [-lim, lim]^2 (shifted to ``centre``) and a cell's area."""
    g = -lim + (np.arange(m) + 0.5) * (2 * lim / m)
    xx, yy = np.meshgrid(g, g, indexing="ij")
    pts = np.stack([xx.ravel(), yy.ravel()], 1)
    return pts + (0 if centre is None else centre), (g[1] - g[0]) ** 2


def _sample_log_prob(task: Any, x: np.ndarray, c: Any) -> np.ndarray:
    return task.log_prob(x, np.repeat(np.asarray(c)[None], len(x), axis=0))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_conditional_density_integrates_to_one(name: str) -> None:
    task = TASKS[name][0]
    for c in _contexts(name):
        centre = task.posterior_mean(c[None])[0] if name == "linear" else None
        pts, area = _grid({"8gaussians": 5.5, "rotating": 7.0, "linear": 2.5}[name], 700, centre)
        p = np.exp(_sample_log_prob(task, pts, c))
        assert p.sum() * area == pytest.approx(1.0, abs=1e-6), c


@pytest.mark.parametrize("name", sorted(TASKS))
def test_samples_agree_with_the_density(name: str) -> None:
    """-E[log p(x | c)] over the sampler's draws is the conditional entropy of a Gaussian,
    1 + log 2 pi + log det(Sigma) / 2 in 2-D: a wrong scale or rotation in either fails."""
    task = TASKS[name][0]
    for c in _contexts(name)[:2]:
        rep = np.repeat(np.asarray(c)[None], 50_000, axis=0)
        logp = task.log_prob(task.sample_x(rep, 1), rep)
        if name == "rotating":
            entropy = task.entropy(c[None])[0]
        else:
            cov = task.posterior_cov if name == "linear" else task.std**2 * np.eye(2)
            entropy = 1 + math.log(2 * math.pi) + 0.5 * math.log(np.linalg.det(cov))
        se = logp.std() / math.sqrt(len(logp))
        assert abs(-logp.mean() - entropy) < 4 * se


def test_rotating_gaussian_moments_match_its_mean_and_covariance() -> None:
    task = RotatingGaussian()
    c = np.full((200_000, 1), 0.3)
    x = task.sample_x(c, 3)
    mean, cov = task.frame(c[:1])[0][0], task.covariance(c[:1])[0]
    se = np.sqrt(np.diag(cov) / len(x))
    assert (np.abs(x.mean(0) - mean) < 4 * se).all()
    np.testing.assert_allclose(np.cov(x.T), cov, atol=4 * cov.max() * math.sqrt(2 / len(x)))
    assert not np.allclose(cov, np.diag(np.diag(cov)))  # turned: the test sees the rotation


def test_rotating_gaussian_joint_entropy_is_the_mean_conditional_entropy() -> None:
    task = RotatingGaussian()
    x, c = task.sample(200_000, 5)
    assert c.shape == (200_000, 1) and (np.abs(c) <= 1).all()
    logp = task.log_prob(x, c)
    se = logp.std() / math.sqrt(len(logp))
    assert abs(-logp.mean() - task.conditional_entropy) < 4 * se
    assert task.conditional_entropy == pytest.approx(task.entropy(np.zeros((1, 1)))[0])


def test_8gaussians_given_component_is_the_toy_given_its_label() -> None:
    task = GaussiansGivenComponent()
    x, c = task.sample(10_000, 4)
    np.testing.assert_allclose(x, TOY["8gaussians"].sample(10_000, 4), rtol=0, atol=1e-12)
    np.testing.assert_allclose(task.log_prob_marginal(x), TOY["8gaussians"].log_prob(x), atol=1e-12)
    np.testing.assert_array_equal(np.bincount(c, minlength=8) > 1_100, True)
    for label in range(8):  # each component's samples sit at its centre
        mean = x[c == label].mean(0)
        assert np.linalg.norm(mean - task.centres[label]) < 4 * task.std / math.sqrt(
            (c == label).sum()
        )
    assert task.context.kind == "categorical" and task.context.classes == 8
    np.testing.assert_allclose(task.context_log_prob([0, 7]), -math.log(8))


def test_bayes_accuracy_is_the_mean_largest_posterior() -> None:
    """The Bayes classifier's accuracy is E_x[max_c p(c | x)]: two estimates of one number."""
    task = GaussiansGivenComponent()
    acc = task.bayes_accuracy(200_000, 0)
    assert 0.99 < acc.value < 1 and acc.n == 200_000 and acc.stderr > 0
    joint = task.log_joint(task.sample(200_000, 1).x)
    best = np.exp(joint.max(1) - np.logaddexp.reduce(joint, axis=1))
    assert abs(acc.value - best.mean()) < 4 * math.hypot(acc.stderr, best.std() / 447)


def _brute_force_posterior(task: GaussianLinear, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The posterior's mean and covariance from prior x likelihood on a grid, normalised."""
    pts, _ = _grid(4.0, 800)
    log_post = multivariate_normal(np.zeros(2), task.prior_cov).logpdf(pts)
    log_post = log_post + multivariate_normal(np.zeros(2), task.noise_cov).logpdf(x - pts)
    w = np.exp(log_post - log_post.max())
    w /= w.sum()
    mean = w @ pts
    return mean, (pts - mean).T @ ((pts - mean) * w[:, None])


def test_gaussian_linear_posterior_against_a_brute_force_conjugate_computation() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 2)), rng.standard_normal((2, 2))
    task = GaussianLinear(
        2, prior_cov=a @ a.T + 0.1 * np.eye(2), noise_cov=b @ b.T + 0.1 * np.eye(2)
    )
    x = np.array([0.7, -0.4])
    mean, cov = _brute_force_posterior(task, x)
    np.testing.assert_allclose(task.posterior_mean(x[None])[0], mean, atol=1e-8)
    np.testing.assert_allclose(task.posterior_cov, cov, atol=1e-8)
    gain = task.prior_cov @ np.linalg.inv(task.prior_cov + task.noise_cov)  # Schur complement
    np.testing.assert_allclose(
        task.posterior_cov, task.prior_cov - gain @ task.prior_cov, atol=1e-12
    )
    theta = rng.standard_normal((5, 2))
    want = multivariate_normal(mean, cov).logpdf(theta)
    np.testing.assert_allclose(task.posterior_log_prob(theta, np.tile(x, (5, 1))), want, atol=1e-6)


def test_gaussian_linear_posterior_mean_regresses_theta_on_x() -> None:
    """E[theta | x] is the regression of theta on x: over the joint, the residual has mean 0 and
    covariance Sigma_post (the sbibm task: dimension 10, variances 0.1)."""
    task = GaussianLinear()
    theta, x = task.simulate(100_000, 2)
    resid = theta - task.posterior_mean(x)
    se = np.sqrt(np.diag(task.posterior_cov) / len(x))
    assert (np.abs(resid.mean(0)) < 4 * se).all()
    np.testing.assert_allclose(np.cov(resid.T), task.posterior_cov, atol=4 * 0.05 * math.sqrt(2e-5))
    np.testing.assert_allclose(task.posterior_cov, 0.05 * np.eye(10), atol=1e-15)
    draws = task.posterior_sample(x[0], 100_000, 3)
    assert draws.shape == (100_000, 10)
    assert (np.abs(draws.mean(0) - task.posterior_mean(x[:1])[0]) < 4 * se).all()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_kl_of_a_model_against_itself_is_exactly_zero(name: str) -> None:
    task = TASKS[name][0]
    kl = conditional_kl(task, task.log_prob, _contexts(name), n=200, seed=0)
    assert kl.value == 0.0 and kl.stderr == 0.0 and kl.n == 200
    np.testing.assert_array_equal(kl.per_context, 0.0)


def _shifted(task: Any, shift: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    return lambda x, c: task.log_prob(x - shift, c)


@pytest.mark.parametrize("name", ["8gaussians", "rotating"])
def test_kl_against_a_shifted_model_is_the_gaussian_kl(name: str) -> None:
    """KL(N(m, S) || N(m + d, S)) = d^T S^-1 d / 2, context by context."""
    task, contexts = TASKS[name]
    shift = np.array([0.1, -0.05])
    kl = conditional_kl(task, _shifted(task, shift), contexts, n=20_000, seed=1)
    if name == "rotating":
        covs = task.covariance(contexts)
    else:
        covs = np.broadcast_to(task.std**2 * np.eye(2), (len(contexts), 2, 2))
    exact = np.array([shift @ np.linalg.solve(s, shift) / 2 for s in covs])
    assert abs(kl.value - exact.mean()) < 4 * kl.stderr
    assert kl.per_context.shape == (len(contexts),)


def test_posterior_kl_against_a_wider_shifted_gaussian_is_the_gaussian_kl() -> None:
    """KL(N0 || N1) = [tr(S1^-1 S0) + d^T S1^-1 d - k + log det S1 / det S0] / 2, with a model
    that returns a torch tensor."""
    task, shift, scale = GaussianLinear(), np.full(10, 0.05), 1.2
    x_o = task.observations(3)

    def log_q(theta: np.ndarray, x: np.ndarray) -> torch.Tensor:
        z = (theta - task.posterior_mean(x) - shift) / math.sqrt(0.05 * scale)
        return torch.as_tensor(-0.5 * (z**2).sum(1) - 5 * math.log(2 * math.pi * 0.05 * scale))

    exact = 0.5 * (10 / scale + shift @ shift / (0.05 * scale) - 10 + 10 * math.log(scale))
    kl = task.posterior_kl(log_q, x_o, n=20_000, seed=2)
    assert abs(kl.value - exact) < 4 * kl.stderr and kl.stderr < 0.01


@pytest.mark.parametrize("name", sorted(TASKS))
def test_same_seed_same_draw(name: str) -> None:
    task = TASKS[name][0]
    a, b, c = task.sample(50, 3), task.sample(50, 3), task.sample(50, 4)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.c, b.c)
    assert not np.array_equal(a.x, c.x) and a.x.dtype == np.float64
    one, two = task.sample_x(a.c, np.random.default_rng(9)), task.sample_x(a.c, 9)
    np.testing.assert_array_equal(one, two)


def test_gaussian_linear_observations_are_fixed() -> None:
    task = GaussianLinear()
    np.testing.assert_array_equal(task.observations(), task.observations())
    assert task.observations().shape == (10, 10) and task.context.features == 10
    np.testing.assert_array_equal(task.observations(3), task.observations()[:3])


G, R, L = GaussiansGivenComponent(), RotatingGaussian(), GaussianLinear()
BAD = [
    (lambda: G.sample(0), r"n must be an integer >= 1, got 0"),
    (lambda: G.sample(2.5), r"n must be an integer >= 1, got 2.5"),
    (lambda: G.sample_x([3, 8]), r"c must hold labels in 0..7, got \[8\]"),
    (lambda: G.sample_x([0.5]), r"c must hold labels in 0..7, got \[0.5\]"),
    (lambda: G.sample_x([[0, 1]]), r"expected c: labels of shape \(n,\), got \(1, 2\)"),
    (lambda: G.log_prob(np.zeros((3, 2)), [0, 1]), r"x has 3 rows, its contexts 2"),
    (lambda: G.log_prob(np.zeros((2, 3)), [0, 1]), r"expected x of shape \(n, 2\)"),
    (lambda: R.sample_x(np.zeros(3)), r"expected c of shape \(n, 1\), n >= 1, got \(3,\)"),
    (lambda: R.sample_x([[math.nan]]), r"c holds 1 NaN or infinite"),
    (lambda: RotatingGaussian(minor=0.0), r"minor must be finite \(a std: > 0\), got 0.0"),
    (lambda: GaussianLinear(0), r"dim must be an integer >= 1, got 0"),
    (lambda: GaussianLinear(2, prior_cov=[[1, 2], [2, 1]]), r"prior_cov must be .*definite"),
    (lambda: GaussianLinear(noise_cov=-1.0), r"noise_cov must be a variance > 0"),
    (lambda: GaussianLinear(noise_cov=[1.0, 2.0]), r"noise_cov must be .* \(10,\)"),
    (lambda: L.posterior_sample(np.zeros((2, 10)), 5), r"x must be one observation"),
    (lambda: L.posterior_sample(np.zeros(10), 0), r"n must be an integer >= 1"),
    (lambda: L.posterior_log_prob(np.zeros((3, 10)), np.zeros((2, 10))), r"theta has 3 rows"),
    (lambda: L.observations(0), r"k must be an integer >= 1, got 0"),
    (lambda: conditional_kl(R, R.log_prob, [[0.0]], n=1), r"n must be an integer >= 2, got 1"),
    (lambda: conditional_kl(R, R.log_prob, [0.0], n=5), r"expected contexts of shape \(n, 1\)"),
    (lambda: conditional_kl(R, lambda x, c: x, [[0.0]], n=5), r"log_q must return 5 log-dens"),
    (lambda: conditional_kl(R, lambda x, c: x[:, 0] * np.nan, [[0.0]]), r"log_q returned NaN"),
]


@pytest.mark.parametrize(("call", "match"), BAD, ids=[m for _, m in BAD])
def test_bad_inputs_are_refused_naming_the_argument(call: Callable[[], Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
