"""Trace estimators against autograd Jacobians, in float64."""

import pytest
import torch
from torch import nn

from cnf import ConcatSquashMLP
from cnf.fields import ACTIVATIONS, ConcatMLP
from cnf.trace import (
    AUTO_EXACT_MAX_DIM,
    ExactTrace,
    HutchinsonTrace,
    TangentField,
    make_trace,
)


def _autograd_jacobians(field: nn.Module, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    def one(zi: torch.Tensor) -> torch.Tensor:
        return field(t, zi.unsqueeze(0)).squeeze(0)

    return torch.stack([torch.autograd.functional.jacobian(one, zi) for zi in z])


class _Generic(nn.Module):
    """A field without ``value_and_jacobian``: the exact trace takes the torch.func path."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = ConcatSquashMLP(dim, (32, 32), activation="softplus")

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(t, z)


@pytest.mark.parametrize("dim", [2, 5, 10])
@pytest.mark.parametrize("path", ["forward-mode", "vmap-jacrev"])
def test_exact_trace_equals_autograd_jacobian(float64, dim: int, path: str) -> None:
    field = ConcatSquashMLP(dim, (32, 32), activation="softplus")
    if path == "vmap-jacrev":
        field = _Generic(dim)
    t, z = torch.tensor(0.37), torch.randn(7, dim)
    jac = _autograd_jacobians(field, t, z)
    ev = ExactTrace()(field, t, z, None, frobenius=True)
    torch.testing.assert_close(ev.value, field(t, z))
    torch.testing.assert_close(ev.trace, jac.diagonal(dim1=1, dim2=2).sum(1), rtol=0, atol=1e-10)
    torch.testing.assert_close(ev.frobenius, jac.square().sum((1, 2)), rtol=0, atol=1e-10)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_forward_mode_jacobian_for_every_activation(float64, activation: str) -> None:
    field = ConcatSquashMLP(3, (16, 16), activation=activation)
    t, z = torch.tensor(0.8), torch.randn(9, 3) * 2
    value, jac = field.value_and_jacobian(t, z)
    torch.testing.assert_close(value, field(t, z))
    torch.testing.assert_close(jac, _autograd_jacobians(field, t, z))


class _NotVmappable(nn.Module):
    """A field with data-dependent Python control flow, which torch.func.vmap cannot trace."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = ConcatSquashMLP(dim, (16,))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        scale = 2.0 if float(z.detach().abs().max()) > -1 else 1.0  # .item()-like: breaks vmap
        return scale * self.net(t, z)


def test_exact_trace_falls_back_when_vmap_fails(float64) -> None:
    field, t, z = _NotVmappable(3), torch.tensor(0.2), torch.randn(4, 3)
    estimator = ExactTrace()
    with pytest.warns(RuntimeWarning, match="vmap failed"):
        ev = estimator(field, t, z, None, frobenius=True)
    jac = _autograd_jacobians(field, t, z)
    assert estimator._vmap_failed
    torch.testing.assert_close(ev.trace, jac.diagonal(dim1=1, dim2=2).sum(1))
    torch.testing.assert_close(ev.frobenius, jac.square().sum((1, 2)))


def test_exact_trace_gradients_reach_parameters(float64) -> None:
    """The trace must stay differentiable (create_graph) so the likelihood trains the field."""
    field = ConcatSquashMLP(3, (8,))
    ev = ExactTrace()(field, torch.tensor(0.1), torch.randn(5, 3), None)
    ev.trace.sum().backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in field.layers[0].linear.parameters()
    )


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(float64, noise: str) -> None:
    dim, n = 6, 40_000
    field = ConcatSquashMLP(dim, (32,), activation="tanh")
    t, z0 = torch.tensor(0.5), torch.randn(1, dim)
    z = z0.expand(n, dim)
    estimator = HutchinsonTrace(noise)
    gen = torch.Generator().manual_seed(1)
    probe = estimator.probe(z, gen)
    est = estimator(field, t, z, probe).trace
    exact = ExactTrace()(field, t, z0, None).trace
    se = est.std() / n**0.5
    assert abs(est.mean() - exact) < 3 * se
    assert est.std() > 0  # a probe-free shortcut would make this test vacuous


class _Hidden(nn.Module):
    """``field`` without its forward-mode methods: Hutchinson's estimate takes torch.func.vjp."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field

    def forward(self, t: torch.Tensor, z: torch.Tensor, context=None) -> torch.Tensor:
        return self.field(t, z) if context is None else self.field(t, z, context=context)


@pytest.mark.parametrize("mlp", [ConcatSquashMLP, ConcatMLP])
@pytest.mark.parametrize("context", ["none", "shared", "per-row"])
def test_hutchinson_forward_mode_is_the_probe_quadratic_form(float64, mlp, context: str) -> None:
    """``e^T J e`` and ``||J e||^2`` from one forward-mode pass against the autograd Jacobian,
    and, for training, the same parameter gradients as the vector-Jacobian product's path."""
    dim, n, width = 11, 6, 0 if context == "none" else 3
    field = mlp(dim, (16, 16), activation="tanh", context=width)
    assert isinstance(field, TangentField) and not isinstance(_Hidden(field), TangentField)
    c = {"none": None, "shared": torch.randn(1, 3), "per-row": torch.randn(n, 3)}[context]
    extra = {} if c is None else {"context": c}
    t, z = torch.tensor(0.37), torch.randn(n, dim)
    estimator = HutchinsonTrace("gaussian")  # not +-1: e * e would hide a misplaced probe
    probe = estimator.probe(z, torch.Generator().manual_seed(3))
    ev = estimator(field, t, z, probe, frobenius=True, **extra)
    rows = [{} if c is None else {"context": c[i % len(c)][None]} for i in range(n)]
    jac = torch.stack([
        torch.autograd.functional.jacobian(lambda v, e=e: field(t, v[None], **e)[0], z[i])
        for i, e in enumerate(rows)
    ])  # fmt: skip
    j_e = torch.einsum("nij,nj->ni", jac, probe)
    torch.testing.assert_close(ev.value, field(t, z, **extra), rtol=0, atol=1e-12)
    torch.testing.assert_close(ev.trace, (probe * j_e).sum(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(ev.frobenius, j_e.square().sum(1), rtol=0, atol=1e-12)
    reverse = estimator(_Hidden(field), t, z, probe, **extra)
    torch.testing.assert_close(ev.trace, reverse.trace, rtol=0, atol=1e-12)
    params = list(field.parameters())
    forward_grads = torch.autograd.grad(ev.trace.square().sum(), params, materialize_grads=True)
    reverse_grads = torch.autograd.grad(
        reverse.trace.square().sum(), params, materialize_grads=True
    )
    for a, b in zip(forward_grads, reverse_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_jacobian_vector_product_for_every_activation(float64, activation: str) -> None:
    field = ConcatSquashMLP(3, (16, 16), activation=activation)
    t, z, v = torch.tensor(0.8), torch.randn(9, 3) * 2, torch.randn(9, 3)
    value, jv = field.value_and_jvp(t, z, v)
    torch.testing.assert_close(value, field(t, z))
    torch.testing.assert_close(jv, torch.einsum("nij,nj->ni", _autograd_jacobians(field, t, z), v))


def test_hutchinson_frobenius_is_unbiased(float64) -> None:
    """``||J e||^2`` averages to ``||J||_F^2`` (RNODE's penalty) over Rademacher probes."""
    dim, n = 5, 40_000
    field = ConcatSquashMLP(dim, (32,), activation="tanh")
    t, z0 = torch.tensor(0.5), torch.randn(1, dim)
    z = z0.expand(n, dim)
    estimator = HutchinsonTrace()
    est = estimator(field, t, z, estimator.probe(z, torch.Generator().manual_seed(2)),
                    frobenius=True).frobenius  # fmt: skip
    exact = ExactTrace()(field, t, z0, None, frobenius=True).frobenius
    assert abs(est.mean() - exact) < 3 * est.std() / n**0.5
    assert est.std() > 0


def test_rademacher_probe_values(float64) -> None:
    probe = HutchinsonTrace("rademacher").probe(torch.zeros(1000, 3))
    assert set(probe.unique().tolist()) == {-1.0, 1.0}


def test_make_trace_auto_and_errors() -> None:
    assert make_trace("auto", AUTO_EXACT_MAX_DIM).name == "exact"
    assert make_trace("auto", AUTO_EXACT_MAX_DIM + 1).name == "hutchinson"
    with pytest.raises(ValueError, match=r"unknown trace 'exakt'.*'exact'"):
        make_trace("exakt", 2)
    with pytest.raises(ValueError, match=r"unknown noise 'uniform'.*'rademacher'"):
        make_trace("hutchinson", 2, "uniform")
