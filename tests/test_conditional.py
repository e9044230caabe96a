"""Conditional densities p(x | c) against closed forms, autograd and themselves, in float64."""

import itertools
import math

import pytest
import torch
from torch import nn

from cnf import CNF, ConcatSquashMLP, Solver
from cnf.context import FeatureContext, LabelContext
from cnf.fields import ACTIVATIONS
from cnf.trace import ExactTrace, HutchinsonTrace

TIGHT = Solver("dopri5", atol=1e-10, rtol=1e-10)


class ShiftedLinear(nn.Module):
    """f(t, z, c) = A z + B c: z(T) = e^{AT} x + A^{-1}(e^{AT} - I) B c, log-det T tr A."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.A, self.B = A.clone(), B.clone()

    def forward(self, t: torch.Tensor, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return z @ self.A.T + context @ self.B.T


def _shifted(dim: int = 3, K: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    A = torch.randn(dim, dim) * 0.4 - 0.3 * torch.eye(dim)  # invertible
    return A, torch.randn(dim, K)


def _latent(A: torch.Tensor, B: torch.Tensor, T: float, x: torch.Tensor, c: torch.Tensor):
    E = torch.linalg.matrix_exp(A * T)
    shift = torch.linalg.solve(A, (E - torch.eye(len(A))) @ B)  # A^{-1}(e^{AT} - I) B
    return x @ E.T + c @ shift.T


def _base(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z.square().sum(1) + z.shape[1] * math.log(2 * math.pi))


def _jacobians(field: nn.Module, t: torch.Tensor, z: torch.Tensor, c: torch.Tensor):
    """Each row's Jacobian, by autograd, under that row's own context."""
    rows = c.expand(len(z), -1)

    def one(zi: torch.Tensor, ci: torch.Tensor) -> torch.Tensor:
        return field(t, zi[None], context=ci[None])[0]

    jac = torch.autograd.functional.jacobian
    return torch.stack(
        [jac(lambda zz, ci=ci: one(zz, ci), zi) for zi, ci in zip(z, rows, strict=True)]
    )


# --- closed forms ----------------------------------------------------------------------------


@pytest.mark.parametrize("per_row", [True, False])
def test_linear_field_log_prob_matches_closed_form(float64, per_row: bool) -> None:
    A, B = _shifted()
    T = 0.8
    flow = CNF(3, ShiftedLinear(A, B), context=2, T=T, trace="exact", solver=TIGHT)
    x = torch.randn(12, 3)
    c = torch.randn(12, 2) * 2 if per_row else torch.tensor([1.5, -2.0])
    truth = _base(_latent(A, B, T, x, c.expand(12, 2))) + T * torch.trace(A)
    torch.testing.assert_close(flow.log_prob(x, context=c), truth, rtol=0, atol=1e-7)
    out = flow.to_latent(x, context=c)
    torch.testing.assert_close(out.value, _latent(A, B, T, x, c.expand(12, 2)), rtol=0, atol=1e-7)


def test_linear_field_hutchinson_is_its_probes_quadratic_form(float64) -> None:
    """For a linear field the Hutchinson log-det is exactly T e^T A e for the solve's probe e, and
    its mean over probes is T tr A; the context only shifts the state."""
    A, B = _shifted()
    T = 0.6
    flow = CNF(3, ShiftedLinear(A, B), context=2, T=T, trace="hutchinson", noise="gaussian",
               solver=TIGHT)  # fmt: skip
    x, c = torch.randn(2000, 3), torch.randn(2000, 2)
    out = flow.to_latent(x, context=c, generator=torch.Generator().manual_seed(1))
    probe = HutchinsonTrace("gaussian").probe(x, torch.Generator().manual_seed(1))
    quadratic = T * torch.einsum("ni,ij,nj->n", probe, A, probe)
    torch.testing.assert_close(out.logdet, quadratic, rtol=0, atol=1e-7)
    torch.testing.assert_close(out.value, _latent(A, B, T, x, c), rtol=0, atol=1e-7)
    se = out.logdet.std() / math.sqrt(len(x))
    assert abs(out.logdet.mean() - T * torch.trace(A)) < 5 * se


def test_context_gradient_matches_closed_form(float64) -> None:
    """d log p(x|c)/dc = -(A^{-1}(e^{AT} - I) B)^T z(T)."""
    A, B = _shifted()
    T = 0.7
    flow = CNF(3, ShiftedLinear(A, B), context=2, T=T, trace="exact", solver=TIGHT)
    x, c = torch.randn(6, 3), torch.randn(6, 2, requires_grad=True)
    (grad,) = torch.autograd.grad(flow.log_prob(x, context=c).sum(), [c])
    E = torch.linalg.matrix_exp(A * T)
    shift = torch.linalg.solve(A, (E - torch.eye(3)) @ B)
    z = _latent(A, B, T, x, c.detach())
    torch.testing.assert_close(grad, -z @ shift, rtol=0, atol=1e-7)


# --- the field and the trace against autograd --------------------------------------------------


@pytest.mark.parametrize("activation", ["tanh", "softplus", "silu"])
@pytest.mark.parametrize("rows", ["per-row", "shared"])
def test_value_and_jacobian_with_context_equals_autograd(float64, activation, rows) -> None:
    field = ConcatSquashMLP(3, (16, 16), activation=activation, context=4)
    t, z = torch.tensor(0.3), torch.randn(7, 3) * 2
    c = torch.randn(7, 4) if rows == "per-row" else torch.randn(1, 4)
    value, jac = field.value_and_jacobian(t, z, context=c)
    torch.testing.assert_close(value, field(t, z, context=c), rtol=0, atol=1e-12)
    torch.testing.assert_close(jac, _jacobians(field, t, z, c), rtol=0, atol=1e-12)


class _Generic(nn.Module):
    """A conditional field without ``value_and_jacobian``: the exact trace takes torch.func."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ConcatSquashMLP(3, (16, 16), activation="softplus", context=4)

    def forward(self, t, z, context):
        return self.net(t, z, context=context)


@pytest.mark.parametrize("path", ["forward-mode", "vmap-jacrev", "looped"])
@pytest.mark.parametrize("rows", ["per-row", "shared"])
def test_exact_trace_with_context_equals_autograd(float64, path: str, rows: str) -> None:
    field = _Generic() if path != "forward-mode" else _Generic().net
    t, z = torch.tensor(0.6), torch.randn(5, 3)
    c = torch.randn(5, 4) if rows == "per-row" else torch.randn(1, 4)
    jac = _jacobians(field, t, z, c)
    if path == "looped":
        ev = ExactTrace._looped(field, t, z, True, c)
    else:
        ev = ExactTrace()(field, t, z, None, frobenius=True, context=c)
    torch.testing.assert_close(ev.value, field(t, z, context=c), rtol=0, atol=1e-12)
    torch.testing.assert_close(ev.trace, jac.diagonal(dim1=1, dim2=2).sum(1), rtol=0, atol=1e-10)
    torch.testing.assert_close(ev.frobenius, jac.square().sum((1, 2)), rtol=0, atol=1e-10)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_with_context_is_each_probes_quadratic_form(float64, noise: str) -> None:
    """Per row, the estimate is e^T J e and the Frobenius one ||J e||^2, J the row's Jacobian
    under its own context: the context is held fixed, not differentiated."""
    field = ConcatSquashMLP(3, (16, 16), activation="softplus", context=4)
    t, z, c = torch.tensor(0.6), torch.randn(6, 3), torch.randn(6, 4)
    estimator = HutchinsonTrace(noise)
    probe = estimator.probe(z, torch.Generator().manual_seed(3))
    ev = estimator(field, t, z, probe, frobenius=True, context=c)
    j_e = torch.einsum("nij,nj->ni", _jacobians(field, t, z, c), probe)
    torch.testing.assert_close(ev.value, field(t, z, context=c), rtol=0, atol=1e-12)
    torch.testing.assert_close(ev.trace, (j_e * probe).sum(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(ev.frobenius, j_e.square().sum(1), rtol=0, atol=1e-12)


def test_the_layer_is_an_affine_map_of_time_and_context(float64) -> None:
    """y = (W x + b) * sigmoid(G [t, c] + g) + S [t, c], written out from the parameters."""
    field = ConcatSquashMLP(2, (5,), context=3)
    layer = field.layers[0]
    t, x, c = torch.tensor(0.4), torch.randn(4, 2), torch.randn(4, 3)
    tc = torch.cat([t.expand(4, 1), c], 1)
    G = torch.cat([layer.gate.weight, layer.context_gate.weight], 1)
    S = torch.cat([layer.shift.weight, layer.context_shift.weight], 1)
    expected = (x @ layer.linear.weight.T + layer.linear.bias) * torch.sigmoid(
        tc @ G.T + layer.gate.bias
    ) + tc @ S.T
    torch.testing.assert_close(layer(t, x, c), expected, rtol=0, atol=1e-14)


# --- the flow: round trips, densities, samples ---------------------------------------------------


def _label_flow(trace: str = "exact", **kw) -> CNF:
    return CNF(2, hidden=(16, 16), num_classes=3, embed=4, trace=trace, **kw)


def _feature_flow(trace: str = "exact", **kw) -> CNF:
    return CNF(2, hidden=(16, 16), context=2, trace=trace, **kw)


@pytest.mark.parametrize("kind", ["labels", "features"])
def test_round_trip_with_a_context_per_row(float64, kind: str) -> None:
    flow = (_label_flow if kind == "labels" else _feature_flow)(solver=TIGHT)
    x = torch.randn(9, 2)
    c = torch.arange(9) % 3 if kind == "labels" else torch.randn(9, 2)
    with torch.no_grad():
        fwd = flow.to_latent(x, context=c)
        back = flow.to_data(fwd.value, context=c)
        other = flow.to_latent(x, context=c.flip(0))
    torch.testing.assert_close(back.value, x, rtol=0, atol=1e-7)
    torch.testing.assert_close(fwd.logdet + back.logdet, torch.zeros(9), rtol=0, atol=1e-7)
    assert (other.value - fwd.value).abs().max() > 1e-3  # the context moves the map


@pytest.mark.parametrize("kind", ["labels", "features"])
def test_density_integrates_to_one_for_two_contexts(float64, kind: str) -> None:
    flow = (_label_flow if kind == "labels" else _feature_flow)(solver=Solver(atol=1e-6, rtol=1e-6))
    with torch.no_grad():  # a strong field: log-dets of order one, not a near-identity map
        for layer in flow.field.layers:
            layer.linear.weight.mul_(4)
            layer.context_gate.weight.mul_(3)
    g = torch.linspace(-8, 8, 81)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    grid = torch.stack([xx.flatten(), yy.flatten()], 1)
    m = len(grid)
    if kind == "labels":
        contexts = torch.cat([torch.zeros(m, dtype=torch.long), torch.full((m,), 2)])
    else:
        contexts = torch.tensor([[1.0, -1.0], [-2.0, 0.5]]).repeat_interleave(m, 0)
    with torch.no_grad():  # both contexts in one solve, one per row
        out = flow.eval().to_latent(grid.repeat(2, 1), context=contexts)
    logp = (flow.base_log_prob(out.value) + out.logdet).reshape(2, m)
    mass = logp.exp().sum(1) * (g[1] - g[0]) ** 2
    torch.testing.assert_close(mass, torch.ones(2), rtol=0, atol=2e-3)
    assert out.logdet.max() - out.logdet.min() > 2
    assert (logp[0] - logp[1]).abs().max() > 1  # two different densities


@pytest.mark.parametrize("kind", ["labels", "features"])
def test_sample_shapes_and_sample_and_log_prob_consistency(float64, kind: str) -> None:
    flow = (_label_flow if kind == "labels" else _feature_flow)(solver=TIGHT).eval()
    one = 1 if kind == "labels" else torch.tensor([0.5, -1.0])
    per_row = torch.tensor([0, 1, 2, 2, 1]) if kind == "labels" else torch.randn(5, 2)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        assert flow.sample(7, context=one).shape == (7, 2)
        assert flow.sample(5, context=per_row, generator=gen).shape == (5, 2)
        for c, n in ((one, 6), (per_row, 5)):
            gen.manual_seed(2)
            x, logp = flow.sample_and_log_prob(n, context=c, generator=gen)
            torch.testing.assert_close(flow.log_prob(x, context=c), logp, rtol=0, atol=1e-7)
            gen.manual_seed(2)
            torch.testing.assert_close(flow.sample(n, context=c, generator=gen), x)


def test_trajectory_and_velocity_take_the_context(float64) -> None:
    flow = _label_flow(solver=TIGHT)
    x, labels = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    traj = flow.trajectory(x, torch.linspace(0, 1, 3), context=labels)
    torch.testing.assert_close(traj.value[-1], flow.to_latent(x, context=labels).value)
    t = torch.rand(4)  # one time per row, as flow matching evaluates the field
    v = flow.velocity(t, x, context=labels)
    for i in range(4):
        row = flow.velocity(t[i], x[i : i + 1], context=labels[i])
        torch.testing.assert_close(v[i : i + 1], row, rtol=0, atol=1e-14)


# --- the null condition ------------------------------------------------------------------------


def test_dropped_rows_take_the_null_condition(float64) -> None:
    flow = _label_flow(solver=TIGHT)
    x = torch.randn(4, 2)
    drop = torch.tensor([True, False, True, False])
    null = flow.context_encoder.null(4)
    torch.testing.assert_close(null, flow.context_encoder.embedding.weight[3].expand(4, -1))
    t = torch.tensor(0.5)
    v = flow.velocity(t, x, context=torch.tensor([0, 1, 2, 0]), drop=drop)
    torch.testing.assert_close(v[drop], flow.field(t, x, context=null)[drop])
    all_null = torch.ones(4, dtype=torch.bool)
    a = flow.log_prob(x, context=torch.zeros(4, dtype=torch.long), drop=all_null)
    b = flow.log_prob(x, context=2, drop=all_null)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)  # the condition is ignored


def test_the_null_feature_vector_is_learned_and_dropped_in(float64) -> None:
    encoder = FeatureContext(2)
    assert isinstance(encoder.null_features, nn.Parameter)
    c = torch.randn(3, 2)
    out = encoder(c, 3, torch.tensor([False, True, False]))
    torch.testing.assert_close(out, torch.stack([c[0], torch.zeros(2), c[2]]))


# --- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "trace"), [("labels", "exact"), ("features", "hutchinson")])
def test_adjoint_gradients_equal_direct_with_context(float64, kind: str, trace: str) -> None:
    make = _label_flow if kind == "labels" else _feature_flow
    direct = make(trace, solver=TIGHT, learn_T=True)
    adjoint = make(trace, solver=TIGHT.replace(adjoint=True), learn_T=True)
    adjoint.load_state_dict(direct.state_dict())
    x, drop = torch.randn(16, 2), torch.arange(16) % 4 == 0
    c = torch.arange(16) % 3 if kind == "labels" else torch.randn(16, 2, requires_grad=True)
    grads = []
    for flow in (direct, adjoint):
        logp = flow.log_prob(x, context=c, drop=drop, generator=torch.Generator().manual_seed(0))
        inputs = list(flow.parameters()) + ([c] if kind == "features" else [])
        grads.append(torch.autograd.grad(-logp.mean(), inputs))
    names = [n for n, _ in direct.named_parameters()] + (["c"] if kind == "features" else [])
    assert any(n.startswith("context_encoder.") for n in names)
    for name, g_direct, g_adjoint in zip(names, *grads, strict=True):
        assert g_direct.abs().max() > 0, name  # every parameter, the encoder's included
        torch.testing.assert_close(g_adjoint, g_direct, rtol=0, atol=1e-6, msg=name)


def test_gradients_reach_the_label_embedding_rows_used(float64) -> None:
    flow = _label_flow(solver=Solver("rk4", step_size=0.25))
    loss = -flow.log_prob(torch.randn(6, 2), context=torch.tensor([0, 0, 2, 2, 0, 2])).mean()
    loss.backward()
    per_row = flow.context_encoder.embedding.weight.grad.abs().sum(1)
    assert per_row[0] > 0 and per_row[2] > 0 and per_row[1] == 0 and per_row[3] == 0


# --- the unconditional model is untouched ----------------------------------------------------


FFJORD_LAYER = {"linear.weight": "oi", "linear.bias": "o", "gate.weight": "o1", "gate.bias": "o",
                "shift.weight": "o1"}  # fmt: skip


def test_unconditional_parameters_are_ffjords_exactly() -> None:
    widths, expected = (2, 8, 8, 2), {"log_T": ()}
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        for name, dims in FFJORD_LAYER.items():
            sizes = {"o": b, "i": a, "1": 1}
            expected[f"field.layers.{i}.{name}"] = tuple(sizes[d] for d in dims)
    flow = CNF(2, hidden=(8, 8))
    assert {k: tuple(v.shape) for k, v in flow.state_dict().items()} == expected
    fresh = ConcatSquashMLP(2, (8, 8))
    assert ["field." + k for k in fresh.state_dict()] == list(expected)[1:]
    assert flow.context_encoder is None and flow.context_features is None
    assert flow.num_classes is None and "context" not in repr(flow)


def test_conditional_attributes_and_repr() -> None:
    labels, features = _label_flow(), _feature_flow()
    assert (labels.num_classes, labels.context_features) == (3, None)
    assert (features.num_classes, features.context_features) == (None, 2)
    assert isinstance(labels.context_encoder, LabelContext)
    assert "num_classes=3, embed=4" in repr(labels) and "context=2" in repr(features)
    assert labels.context_encoder.embedding.num_embeddings == 4  # the null label's row


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(context=2, num_classes=3), r"context= .* or num_classes= .*not both.*context=2"),
        (dict(context=0), r"context must be a positive integer, got 0"),
        (dict(context=True), r"context must be a positive integer, got True"),
        (dict(num_classes=-1), r"num_classes must be a positive integer, got -1"),
        (dict(num_classes=3, embed=0), r"embed must be a positive integer, got 0"),
        (dict(context=2, vector_field=ConcatSquashMLP(2, (4,), context=5)),
         r"vector_field was built with context=5 .* width 2"),
        (dict(vector_field=ConcatSquashMLP(2, (4,), context=5)), r"context=5 .* width 0"),
    ],
)  # fmt: skip
def test_construction_refusals(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CNF(2, **kwargs)


def test_a_custom_field_must_take_the_context() -> None:
    class Plain(nn.Module):
        def forward(self, t, z):
            return z

    with pytest.raises(TypeError, match=r"vector_field Plain takes no context"):
        CNF(2, Plain(), context=3)


x5 = torch.zeros(5, 2)
LABEL_REFUSALS = [
    (None, ValueError, r"context is missing: .*num_classes=3"),
    (torch.tensor([0, 1, 2]), ValueError, r"context of shape \(3,\) does not fit 5 rows"),
    (torch.zeros(5, 1, dtype=torch.long), ValueError, r"context of shape \(5, 1\)"),
    (torch.tensor([0, 1, 3, 0, 1]), ValueError, r"context holds labels outside \[0, 3\): \[3\]"),
    (-1, ValueError, r"context holds labels outside \[0, 3\): \[-1\]"),
    (torch.tensor([0.0, 1, 2, 0, 1]), TypeError, r"context must hold integer .* torch.float"),
    (1.0, TypeError, r"context must be an int class label .* got float"),
    (True, TypeError, r"context must be an int class label .* got bool"),
    (torch.ones(5, dtype=torch.bool), TypeError, r"context must hold integer .* torch.bool"),
]
FEATURE_REFUSALS = [
    (None, ValueError, r"context is missing: .*context=2.*shape \(2,\)"),
    (torch.zeros(3), ValueError, r"context of shape \(3,\) does not fit 5 rows"),
    (torch.zeros(4, 2), ValueError, r"context of shape \(4, 2\) does not fit 5 rows"),
    (torch.zeros(5, 2, 1), ValueError, r"context of shape \(5, 2, 1\)"),
    (torch.zeros(5, 2, dtype=torch.long), TypeError, r"context has dtype torch.int64.*\.to\("),
    (torch.zeros(5, 2, dtype=torch.float64), TypeError, r"context has dtype torch.float64"),
    ([0.0, 1.0], TypeError, r"context must be a torch.Tensor of 2 features, got list"),
    (torch.full((5, 2), math.nan), ValueError, r"context has NaN or inf"),
]


@pytest.mark.parametrize(("context", "error", "match"), LABEL_REFUSALS)
def test_label_context_refusals(context, error, match) -> None:
    flow = _label_flow()
    with pytest.raises(error, match=match):
        flow.log_prob(x5, context=context)


@pytest.mark.parametrize(("context", "error", "match"), FEATURE_REFUSALS)
def test_feature_context_refusals(context, error, match) -> None:
    flow = _feature_flow()
    with pytest.raises(error, match=match):
        flow.log_prob(x5, context=context)


@pytest.mark.parametrize(
    "call",
    [
        lambda f: f.sample(3),
        lambda f: f.sample_and_log_prob(3),
        lambda f: f.to_data(x5),
        lambda f: f.trajectory(x5, torch.linspace(0, 1, 2)),
        lambda f: f.velocity(torch.tensor(0.5), x5),
    ],
)
def test_every_entry_point_wants_the_context(call) -> None:
    with pytest.raises(ValueError, match="context is missing"):
        call(_label_flow())


def test_an_unconditional_flow_refuses_a_context_and_drop() -> None:
    flow = CNF(2, hidden=(4,))
    with pytest.raises(ValueError, match=r"context: this flow is unconditional .* shape \(5, 2\)"):
        flow.log_prob(x5, context=torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"unconditional but got context 1; leave"):
        flow.sample(2, context=1)
    with pytest.raises(ValueError, match=r"unconditional .* and drop"):
        flow.log_prob(x5, drop=torch.zeros(5, dtype=torch.bool))


@pytest.mark.parametrize(
    ("drop", "error", "match"),
    [
        (torch.zeros(5), TypeError, r"drop must be a boolean tensor of shape \(5,\), got torch"),
        ([True] * 5, TypeError, r"drop must be a boolean tensor .* got list"),
        (torch.zeros(4, dtype=torch.bool), ValueError, r"drop must have shape \(5,\).* \(4,\)"),
    ],
)
def test_drop_refusals(drop, error, match) -> None:
    with pytest.raises(error, match=match):
        _label_flow().log_prob(x5, context=1, drop=drop)


def test_the_field_refuses_a_context_it_was_not_built_for() -> None:
    t, z = torch.tensor(0.5), torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"context: this field was built with context=3 .* none"):
        ConcatSquashMLP(2, (4,), context=3)(t, z)
    with pytest.raises(ValueError, match=r"built with context=0 but was called with \(4, 3\)"):
        ConcatSquashMLP(2, (4,))(t, z, context=torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"context must have shape \(1, 3\) or \(4, 3\)"):
        ConcatSquashMLP(2, (4,), context=3).value_and_jacobian(t, z, context=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"context must be a width >= 0"):
        ConcatSquashMLP(2, (4,), context=-1)


def test_every_activation_keeps_the_context_path(float64) -> None:
    for activation in sorted(ACTIVATIONS):
        field = ConcatSquashMLP(2, (6,), activation=activation, context=2)
        t, z, c = torch.tensor(0.2), torch.randn(3, 2), torch.randn(3, 2)
        value, _ = field.value_and_jacobian(t, z, context=c)
        torch.testing.assert_close(value, field(t, z, context=c), rtol=0, atol=1e-12)
