"""Toy densities: seedable samplers whose samples agree with the closed-form truths."""

import math

import numpy as np
import pytest

from cnf.data import get_dataset, list_datasets
from cnf.data.toy import TOY

KNOWN = [name for name, d in TOY.items() if d.has_truth]


def test_ffjord_toy_set_is_complete() -> None:
    expected = {"8gaussians", "2spirals", "checkerboard", "moons", "circles", "pinwheel",
                "swissroll", "rings"}  # fmt: skip
    assert set(TOY) == expected
    assert {"8gaussians", "checkerboard", "circles", "rings"} <= set(KNOWN)


@pytest.mark.parametrize("name", sorted(TOY))
def test_samplers_are_seedable_and_inside_their_support(name: str) -> None:
    d = TOY[name]
    a, b, c = d.sample(5000, 1), d.sample(5000, 1), d.sample(5000, 2)
    assert a.shape == (5000, 2) and a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (np.abs(a) <= d.support).all(1).mean() > 0.999


@pytest.mark.parametrize("name", KNOWN)
def test_true_density_integrates_to_one(name: str) -> None:
    d = TOY[name]
    lim = 2 * math.ceil((d.support + 1) / 2)  # midpoint rule on cells that tile the checkerboard
    g = -lim + (np.arange(1200) + 0.5) * (2 * lim / 1200)
    xx, yy = np.meshgrid(g, g)
    p = np.exp(d.log_prob(np.stack([xx.ravel(), yy.ravel()], 1)))
    assert p.sum() * (g[1] - g[0]) ** 2 == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("name", KNOWN)
def test_samples_agree_with_true_density(name: str) -> None:
    """-E[log p(x)] over the sampler's draws is the entropy: this fails if the sampler and the
    closed form describe different distributions (a wrong scale, a missing component, ...)."""
    d = TOY[name]
    logp = d.log_prob(d.sample(200_000, 7))
    assert np.isfinite(logp).all()
    se = logp.std() / math.sqrt(len(logp))
    assert abs(-logp.mean() - d.entropy) < 4 * se + 1e-3


def test_known_entropies() -> None:
    assert TOY["8gaussians"].entropy == pytest.approx(2.831, abs=2e-3)
    assert TOY["checkerboard"].entropy == pytest.approx(math.log(32))


def test_8gaussians_geometry() -> None:
    x = TOY["8gaussians"].sample(80_000, 0)
    radius = np.linalg.norm(x, axis=1)
    assert np.median(radius) == pytest.approx(4 / 1.414, abs=0.02)
    angle = np.round(np.arctan2(x[:, 1], x[:, 0]) / (np.pi / 4)) % 8
    counts = np.bincount(angle.astype(int), minlength=8) / len(x)
    np.testing.assert_allclose(counts, 1 / 8, atol=0.01)


def test_toy_dataset_streams_are_deterministic_and_disjoint() -> None:
    data = get_dataset("moons", seed=3)
    np.testing.assert_array_equal(
        data.train_batch(64, 5), get_dataset("moons", seed=3).train_batch(64, 5)
    )
    assert not np.array_equal(data.train_batch(64, 5), data.train_batch(64, 6))
    assert not np.array_equal(data.validation()[:64], data.test(64))
    assert data.meta() == {"name": "moons", "kind": "toy", "event_shape": [2]}


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'gaussians'; valid names: .*8gaussians"):
        get_dataset("gaussians")


def test_list_datasets_reports_truth() -> None:
    info = {i.name: i for i in list_datasets()}
    assert info["checkerboard"].truth and not info["pinwheel"].truth
    assert info["8gaussians"].dim == 2
