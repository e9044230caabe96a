"""The CNF against closed forms, autograd and itself (round trips), in float64."""

import math

import pytest
import torch
from conftest import LinearField

from cnf import CNF, Solver

TIGHT = Solver("dopri5", atol=1e-10, rtol=1e-10)


def _linear_flow(A: torch.Tensor, T: float, **kw) -> CNF:
    return CNF(A.shape[0], LinearField(A), T=T, trace="exact", **{"solver": TIGHT, **kw})


@pytest.mark.parametrize("learn_T", [False, True])
def test_linear_field_matches_closed_form(float64, learn_T: bool) -> None:
    A = torch.randn(3, 3) * 0.5
    T = 0.7
    flow = _linear_flow(A, T, learn_T=learn_T)
    x = torch.randn(16, 3)
    z_true = x @ torch.linalg.matrix_exp(A * T).T
    logp_true = flow.base_log_prob(z_true) + T * torch.trace(A)
    out = flow.to_latent(x)
    torch.testing.assert_close(out.value, z_true, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.logdet, (T * torch.trace(A)).expand(16), rtol=0, atol=1e-6)
    torch.testing.assert_close(flow.log_prob(x), logp_true, rtol=0, atol=1e-6)


def test_linear_field_sampling_direction(float64) -> None:
    """to_data integrates T -> 0: x = expm(-A T) z with log|det dx/dz| = -T tr A."""
    A, T = torch.randn(2, 2), 1.3
    flow = _linear_flow(A, T)
    z = torch.randn(8, 2)
    out = flow.to_data(z)
    torch.testing.assert_close(out.value, z @ torch.linalg.matrix_exp(-A * T).T, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.logdet, (-T * torch.trace(A)).expand(8), rtol=0, atol=1e-6)


def test_trajectory_hits_every_time(float64) -> None:
    A = torch.randn(2, 2)
    flow = _linear_flow(A, 1.0)
    x, t = torch.randn(5, 2), torch.linspace(0, 1, 6)
    traj = flow.trajectory(x, t)
    assert traj.value.shape == (6, 5, 2) and traj.logdet.shape == (6, 5)
    for k, tk in enumerate(t):
        torch.testing.assert_close(traj.value[k], x @ torch.linalg.matrix_exp(A * tk).T)
        torch.testing.assert_close(traj.logdet[k], (tk * torch.trace(A)).expand(5))


def test_density_integrates_to_one(float64) -> None:
    flow = CNF(2, hidden=(32, 32), trace="exact", solver=Solver(atol=1e-8, rtol=1e-8)).eval()
    with torch.no_grad():  # a strong random field: log-dets of order one, not a near-identity map
        for layer in flow.field.layers:
            layer.linear.weight.mul_(5)
    lim, n = 8.0, 161
    g = torch.linspace(-lim, lim, n)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    grid = torch.stack([xx.flatten(), yy.flatten()], 1)
    with torch.no_grad():
        out = flow.to_latent(grid)
    density = (flow.base_log_prob(out.value) + out.logdet).exp()
    assert out.logdet.max() - out.logdet.min() > 2
    assert abs(float(density.sum() * (g[1] - g[0]) ** 2) - 1.0) < 1e-2


def test_sample_and_log_prob_consistency_and_round_trip(float64) -> None:
    flow = CNF(2, hidden=(32, 32), trace="exact", solver=Solver(atol=1e-10, rtol=1e-10)).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        x, logp = flow.sample_and_log_prob(64, generator=gen)
        torch.testing.assert_close(flow.log_prob(x), logp, rtol=0, atol=1e-6)
        z = flow.to_latent(x).value
        x_back = flow.to_data(z).value
    assert (x_back - x).abs().max() < 1e-5
    gen.manual_seed(3)
    with torch.no_grad():
        torch.testing.assert_close(flow.sample(64, generator=gen), x, rtol=0, atol=1e-8)


def test_logdets_of_both_directions_cancel(float64) -> None:
    flow = CNF(3, hidden=(16,), trace="exact", solver=TIGHT)
    x = torch.randn(10, 3)
    fwd = flow.to_latent(x)
    bwd = flow.to_data(fwd.value)
    torch.testing.assert_close(fwd.logdet + bwd.logdet, torch.zeros(10), rtol=0, atol=1e-7)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_adjoint_gradients_equal_direct(float64, trace: str) -> None:
    kw = dict(hidden=(16, 16), trace=trace, learn_T=True, T=0.8)
    direct = CNF(2, **kw, solver=TIGHT)
    adjoint = CNF(2, **kw, solver=TIGHT.replace(adjoint=True))
    adjoint.load_state_dict(direct.state_dict())
    x = torch.randn(32, 2)
    grads = []
    for flow in (direct, adjoint):
        loss = -flow.log_prob(x, generator=torch.Generator().manual_seed(0)).mean()
        grads.append(torch.autograd.grad(loss, list(flow.parameters())))
    names = [n for n, _ in direct.named_parameters()]
    assert "log_T" in names
    for name, g_direct, g_adj in zip(names, *grads, strict=True):
        assert g_direct.abs().max() > 0, name
        torch.testing.assert_close(g_adj, g_direct, rtol=0, atol=1e-5, msg=name)


def test_learnable_T_gradient_matches_finite_difference(float64) -> None:
    flow = CNF(2, hidden=(8,), learn_T=True, T=0.9, trace="exact", solver=TIGHT)
    x = torch.randn(8, 2)
    loss = flow.log_prob(x).sum()
    (g,) = torch.autograd.grad(loss, [flow.log_T])
    eps = 1e-5
    with torch.no_grad():
        flow.log_T += eps
        up = flow.log_prob(x).sum()
        flow.log_T -= 2 * eps
        down = flow.log_prob(x).sum()
    assert abs(float(g) - float(up - down) / (2 * eps)) < 1e-5 * max(1.0, abs(float(g)))


def test_hutchinson_probe_fixed_for_the_whole_solve_including_adjoint(float64) -> None:
    flow = CNF(4, hidden=(8,), trace="hutchinson", solver=Solver(adjoint=True))
    seen: list[torch.Tensor] = []
    calls = {"jvp": 0}
    estimator = flow.estimator
    original = estimator.__call__

    def spy(field, t, z, probe, frobenius=False):
        seen.append(probe)
        return original(field, t, z, probe, frobenius)

    real_jvp = flow.field.value_and_jvp

    def counting_jvp(*a, **k):
        calls["jvp"] += 1
        return real_jvp(*a, **k)

    flow.estimator = type("Spy", (), {"probe": estimator.probe, "__call__": staticmethod(spy)})()
    flow.field.value_and_jvp = counting_jvp
    flow.log_prob(torch.randn(5, 4)).sum().backward()
    assert flow.nfe.forward > 0 and flow.nfe.backward > 0
    assert len(seen) == flow.nfe.total == calls["jvp"]  # one forward-mode JVP per evaluation
    assert all(p is seen[0] for p in seen)


def test_nfe_counts_forward_and_backward(float64) -> None:
    direct = CNF(2, hidden=(8,))
    direct.log_prob(torch.randn(4, 2)).sum().backward()
    assert direct.nfe.forward >= 6 and direct.nfe.backward == 0
    adj = CNF(2, hidden=(8,), solver=Solver(adjoint=True))
    loss = adj.log_prob(torch.randn(4, 2)).sum()
    assert adj.nfe.forward >= 6 and adj.nfe.backward == 0
    loss.backward()
    assert adj.nfe.backward >= 6


def test_eval_mode_uses_the_eval_solver(float64) -> None:
    flow = CNF(
        2,
        hidden=(8,),
        eval_solver=Solver("rk4", step_size=0.1),
        solver=Solver("euler", step_size=0.5),
    )
    x = torch.randn(3, 2)
    flow.log_prob(x)
    assert flow.nfe.forward == 2
    flow.eval()
    flow.log_prob(x)
    assert flow.nfe.forward == 40
    flow.log_prob(x, solver=Solver("midpoint", step_size=0.25))
    assert flow.nfe.forward == 8


def test_regularizers_match_their_definitions(float64) -> None:
    A, T = torch.randn(2, 2), 0.6
    flow = _linear_flow(A, T)
    x = torch.randn(4, 2)
    out = flow.to_latent(x, regularize=True)
    # int_0^T ||A expm(A t) x||^2 dt by Simpson's rule; ||A||_F^2 T for the Jacobian norm
    ts = torch.linspace(0, T, 2001)
    speed = torch.stack([(x @ (A @ torch.linalg.matrix_exp(A * t)).T).square().sum(1) for t in ts])
    h = ts[1] - ts[0]
    simpson = h / 3 * (speed[0] + 4 * speed[1:-1:2].sum(0) + 2 * speed[2:-1:2].sum(0) + speed[-1])
    torch.testing.assert_close(out.kinetic, simpson, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(out.jacobian, (A.square().sum() * T).expand(4))


def test_sampling_is_in_the_flows_dtype_and_logprob_is_finite() -> None:
    flow = CNF(2, hidden=(8,))
    x, logp = flow.sample_and_log_prob(10)
    assert x.dtype == torch.float32 and torch.isfinite(logp).all()
    assert math.isfinite(float(flow.log_prob(x).mean().detach()))
