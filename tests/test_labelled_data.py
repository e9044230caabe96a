"""Conditions from the data themselves: the 2-D toys given their labels (``condition="label"``)
and a table's columns given as the condition (``condition="COLS"``), checked against the
toys' own closed forms and the table's own values."""

import math

import numpy as np
import pytest

from cnf.data import get_dataset, is_conditional
from cnf.data.toy import TOY

KNOWN = ("8gaussians", "checkerboard", "circles", "rings")  # p(x | label) in closed form
LABELLED = (*KNOWN, "moons", "2spirals", "pinwheel")


@pytest.mark.parametrize("name", LABELLED)
def test_labelled_toys_are_the_toys_own_points_with_equally_likely_labels(name: str) -> None:
    data = get_dataset(name, condition="label", seed=3)
    plain = get_dataset(name, seed=3)
    x, c = data.train_batch(4000, 7)
    np.testing.assert_array_equal(x, plain.train_batch(4000, 7))
    np.testing.assert_array_equal(data.test(500).x, plain.test(500))
    classes = TOY[name].classes
    assert data.meta()["context"] == {"kind": "categorical", "classes": classes}
    counts = np.bincount(c, minlength=classes)
    assert len(counts) == classes and (abs(counts / len(c) - 1 / classes) < 0.04).all()
    assert data.fingerprint() != plain.fingerprint()  # a labelled run resumes only as one
    assert is_conditional(name, {"condition": "label"}) and not is_conditional(name, {})


@pytest.mark.parametrize("name", KNOWN)
def test_the_conditionals_mix_to_the_toys_density_and_each_integrates_to_one(name: str) -> None:
    density = TOY[name]
    task = get_dataset(name, condition="label").task
    pts = np.random.default_rng(0).uniform(-density.support, density.support, (3000, 2))
    per_class = np.stack([task.log_prob(pts, np.full(len(pts), k))
                          for k in range(density.classes)])  # fmt: skip
    with np.errstate(divide="ignore"):
        mixture = np.log(np.exp(per_class).mean(0))  # equal priors
    inside = np.isfinite(density.log_prob(pts))
    np.testing.assert_allclose(mixture[inside], density.log_prob(pts)[inside], rtol=1e-9)
    edges = np.linspace(-6, 6, 961)
    g = (edges[1:] + edges[:-1]) / 2  # cell centres (the squares' sides are cell edges)
    xx, yy = np.meshgrid(g, g, indexing="ij")
    grid = np.stack([xx.ravel(), yy.ravel()], 1)
    for k in range(density.classes):
        mass = np.exp(task.log_prob(grid, np.full(len(grid), k))).sum() * (g[1] - g[0]) ** 2
        assert mass == pytest.approx(1.0, abs=0.01), (name, k)


def test_labelled_points_lie_where_their_label_puts_them() -> None:
    x, c = get_dataset("checkerboard", condition="label").test(4000)
    task = get_dataset("checkerboard", condition="label").task
    assert np.isfinite(task.log_prob(x, c)).all()  # each point in its own square
    assert np.isinf(task.log_prob(x, (c + 1) % 8)).all()  # and in no other
    x, c = get_dataset("circles", condition="label").test(4000)
    radius = np.linalg.norm(x, axis=1)
    assert radius[c == 0].mean() == pytest.approx(3.0, abs=0.05)
    assert radius[c == 1].mean() == pytest.approx(1.5, abs=0.05)


def test_conditional_entropies_match_their_closed_forms() -> None:
    sigma = 0.5 / 1.414
    gauss = get_dataset("8gaussians", condition="label").entropy
    assert gauss == pytest.approx(math.log(2 * math.pi * math.e * sigma**2), abs=1e-4)
    assert get_dataset("checkerboard", condition="label").entropy == pytest.approx(math.log(4))
    assert get_dataset("moons", condition="label").entropy is None  # no closed form


@pytest.mark.parametrize("name", ["moons", "pinwheel"])
def test_draws_given_a_label_are_the_points_of_that_label(name: str) -> None:
    task = get_dataset(name, condition="label").task
    c = np.array([0, 1, 1, 0, 1] * 200)
    x = task.sample_x(c, 0)
    pool, labels = TOY[name].sample_labelled(20_000, 1)
    for k in (0, 1):  # the means of each label's draws agree with the pool's
        np.testing.assert_allclose(x[c == k].mean(0), pool[labels == k].mean(0), atol=0.15)


def test_the_swissroll_has_no_labels_and_a_wrong_condition_is_named() -> None:
    with pytest.raises(ValueError, match=r"swissroll.*takes no option condition"):
        get_dataset("swissroll", condition="label")
    with pytest.raises(ValueError, match=r"condition must be 'label' for moons"):
        get_dataset("moons", condition="target")


def test_a_table_models_the_rest_given_its_condition_columns() -> None:
    from sklearn.datasets import load_wine

    data = get_dataset("wine", condition="target")
    x, c = data.test()
    assert x.shape[1] == 13 and c.shape[1] == 1
    assert data.meta()["context"] == {"kind": "continuous", "features": 1, "columns": ["target"]}
    assert data.meta()["columns"] == list(load_wine().feature_names)
    wine = load_wine()
    rows = {tuple(np.round(r, 6)): t for r, t in zip(wine.data, wine.target, strict=True)}
    assert all(rows[tuple(np.round(r, 6))] == t for r, t in zip(x, c[:, 0], strict=True))
    both = get_dataset("wine", condition="target", dequantize=True)
    assert set(np.unique(both.train_batch(64, 1).c)) <= {0.0, 1.0, 2.0}  # never dequantized


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(condition="target", target="alcohol"), "one of the two"),
        (dict(condition="nope"), "condition 'nope' is not a column of wine"),
        (
            dict(condition=",".join(map(str, range(14)))),
            "leave at least one column of wine to model",
        ),
    ],
)
def test_a_bad_table_condition_is_named(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_dataset("wine", **options)
