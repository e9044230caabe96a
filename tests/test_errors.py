"""Bad input gets an error naming the argument, the value and the fix."""

import numpy as np
import pytest
import torch

from cnf import CNF, ODEBlock


@pytest.fixture
def flow() -> CNF:
    return CNF(2, hidden=(8,))


def test_wrong_trailing_dimension(flow: CNF) -> None:
    with pytest.raises(ValueError, match=r"expected x of shape \(n, 2\), got \(5, 3\)"):
        flow.log_prob(torch.randn(5, 3))


def test_wrong_rank(flow: CNF) -> None:
    with pytest.raises(ValueError, match=r"expected x of shape \(n, 2\), got \(2,\)"):
        flow.log_prob(torch.randn(2))


def test_an_empty_batch_has_an_empty_answer(flow: CNF) -> None:
    assert flow.log_prob(torch.randn(0, 2)).shape == (0,)
    out = flow.to_data(torch.randn(0, 2))
    assert out.value.shape == (0, 2) and out.logdet.shape == (0,)
    assert flow.to_latent(torch.randn(0, 2), regularize=True).kinetic.shape == (0,)


def test_integer_data_is_told_to_become_floating_point(flow: CNF) -> None:
    with pytest.raises(TypeError, match=r"floating-point data: call x.to\(torch.float32\)") as info:
        flow.log_prob(torch.zeros(3, 2, dtype=torch.int64))
    assert "flow.to(torch.int64)" not in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input(flow: CNF, bad: float) -> None:
    x = torch.randn(6, 2)
    x[4, 1] = bad
    with pytest.raises(ValueError, match=r"x has NaN or inf values in 1 rows \(first: \[4\]\)"):
        flow.log_prob(x)
    with pytest.raises(ValueError, match="z has NaN or inf"):
        flow.to_data(x)


def test_wrong_dtype(flow: CNF) -> None:
    with pytest.raises(
        TypeError,
        match=r"x has dtype torch.float64 but the flow's parameters are "
        r"torch.float32: call x.to\(torch.float32\)",
    ):
        flow.log_prob(torch.randn(3, 2, dtype=torch.float64))


def test_not_a_tensor(flow: CNF) -> None:
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor, got ndarray"):
        flow.log_prob(np.zeros((3, 2)))


def test_device_mix(flow: CNF) -> None:
    x = torch.randn(3, 2, device="meta")
    with pytest.raises(ValueError, match=r"x is on meta but the flow is on cpu"):
        flow.log_prob(x)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (
            dict(trace="exakt"),
            ValueError,
            r"unknown trace 'exakt'; valid choices: \['auto', 'exact', 'hutchinson'\]",
        ),
        (
            dict(noise="uniform"),
            ValueError,
            r"unknown noise 'uniform'; valid choices: \['rademacher', 'gaussian'\]",
        ),
        (dict(solver=dict(method="rk45")), ValueError, r"method 'rk45' is unknown; valid choices"),
        (dict(solver="rk4"), TypeError, r"expected a cnf.Solver or a dict of its fields, got str"),
        (dict(activation="gelu"), ValueError, r"unknown activation 'gelu'; valid choices"),
        (dict(T=0.0), ValueError, r"T must be a positive finite number, got 0.0"),
        (
            dict(eval_solver="rk4"),
            TypeError,
            r"expected a cnf.Solver or a dict of its fields, got str",
        ),
    ],
)
def test_bad_options(kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        CNF(2, **kwargs)


def test_bad_dim_and_field() -> None:
    for dim in (0, 2.5, "2", None):
        with pytest.raises(ValueError, match=r"dim must be a positive integer or a shape of them"):
            CNF(dim)
    with pytest.raises(ValueError, match="default vector field is for vector data"):
        CNF((1, 8, 8))
    with pytest.raises(
        TypeError, match=r"vector_field must be an nn\.Module called as f\(t, z\), got function"
    ):
        ODEBlock(lambda t, z: z)


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_bad_sample_count(flow: CNF, n) -> None:
    with pytest.raises(ValueError, match="n must be a positive integer"):
        flow.sample(n)
