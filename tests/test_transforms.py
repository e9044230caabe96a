"""The image flow's fixed bijections against autograd Jacobians and their inverses, in float64."""

import math

import pytest
import torch

from cnf.transforms import Center, Dequantization, Logit, Squeeze, squeeze, unsqueeze


def _jacobians(fn, x: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians ``(n, D, D)`` of ``fn`` (a batch map) by autograd."""
    shape = x.shape[1:]

    def flat(v: torch.Tensor) -> torch.Tensor:
        return fn(v.reshape(1, *shape))[0].flatten()

    return torch.stack([torch.autograd.functional.jacobian(flat, xi.flatten()) for xi in x])


def _check_logdets(transform, x: torch.Tensor) -> None:
    """forward's log-det equals log|det J| of forward, inverse's that of inverse, and they
    undo each other."""
    y, logdet = transform(x)
    torch.testing.assert_close(logdet, torch.linalg.slogdet(_jacobians(transform, x))[1])
    x_back, logdet_inv = transform.inverse(y)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(logdet_inv, -logdet)
    inverse_jac = _jacobians(transform.inverse, y)
    torch.testing.assert_close(logdet_inv, torch.linalg.slogdet(inverse_jac)[1])


@pytest.mark.parametrize("alpha", [1e-6, 0.05])
def test_logit_log_det_against_autograd(float64, alpha: float) -> None:
    x = torch.rand(4, 2, 3, 3)
    x[0, 0, 0, 0], x[1, 1, 2, 2] = 0.0, 1.0  # the edges of [0, 1] included
    _check_logdets(Logit(alpha), x)
    y, _ = Logit(alpha)(x)
    s = alpha + (1 - 2 * alpha) * x
    torch.testing.assert_close(y, torch.log(s / (1 - s)))  # the transform itself
    assert y.min() >= math.log(alpha / (1 - alpha)) - 1e-9


def test_dequantization_log_det_against_autograd(float64) -> None:
    pixels = torch.randint(0, 17, (3, 1, 4, 4))
    x = Dequantization.noise(pixels).double()
    _check_logdets(Dequantization(17), x)
    assert float(Dequantization(17)(x)[1][0]) == pytest.approx(-16 * math.log(17))


def test_dequantization_noise_and_quantize() -> None:
    pixels = torch.randint(0, 256, (500, 3, 2, 2))
    x = Dequantization.noise(pixels, generator=torch.Generator().manual_seed(0))
    u = x - pixels
    assert x.dtype == torch.float32 and (u >= 0).all() and (u < 1).all()
    assert 0.45 < float(u.mean()) < 0.55  # uniform on [0, 1): mean 1/2
    torch.testing.assert_close(Dequantization(256).quantize(x), pixels.float())
    assert Dequantization(17).quantize(torch.tensor([-0.5, 16.99, 17.2])).tolist() == [0, 16, 16]


def test_center_is_a_shift(float64) -> None:
    _check_logdets(Center(), torch.rand(2, 1, 2, 2))


def test_squeeze_is_a_permutation_with_log_det_zero(float64) -> None:
    x = torch.randn(2, 3, 4, 6)
    y, logdet = Squeeze()(x)
    assert y.shape == (2, 12, 2, 3)
    assert (logdet == 0).all()
    jac = _jacobians(Squeeze(), x)
    # a permutation matrix: 0/1 entries, one 1 in every row and column, so |det| = 1
    assert set(jac.unique().tolist()) == {0.0, 1.0}
    assert (jac.sum(1) == 1).all() and (jac.sum(2) == 1).all()
    _check_logdets(Squeeze(), x)
    torch.testing.assert_close(unsqueeze(squeeze(x)), x, rtol=0, atol=0)


def test_squeeze_moves_each_2x2_patch_into_channels() -> None:
    x = torch.arange(2 * 4 * 4.0).reshape(1, 2, 4, 4)
    y = squeeze(x)
    # channel c's patch at (i, j) lands in channels 4c..4c+3 at (i/2, j/2), row-major
    assert y[0, :4, 0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]
    assert y[0, 4:, 1, 0].tolist() == [24.0, 25.0, 28.0, 29.0]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Logit(0.5), r"alpha must be in \(0, 0.5\), got 0.5"),
        (lambda: Logit(-1e-3), "alpha must be in"),
        (lambda: Dequantization(1), "levels must be an integer >= 2"),
        (lambda: squeeze(torch.zeros(1, 1, 3, 4)), r"even H and W, got \(1, 1, 3, 4\)"),
        (lambda: unsqueeze(torch.zeros(1, 3, 2, 2)), "C a multiple of 4"),
    ],
)
def test_bad_arguments(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()
