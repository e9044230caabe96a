"""Classifier-free guidance and the Bayes classifier against closed forms, in float64."""

import math

import pytest
import torch
from torch import nn

from cnf import CNF, Solver, TabularCNF
from cnf.classifier import (
    Classification,
    accuracy,
    bayes_rule,
    class_log_likelihoods,
    classify,
    confusion,
)
from cnf.evaluate import log_probs
from cnf.guidance import (
    GuidedField,
    GuidedJacobianField,
    GuidedTangentField,
    guided_field,
    guided_flow,
    guided_log_prob,
    guided_sample,
    guided_sample_and_log_prob,
)
from cnf.trace import TangentField

TIGHT = Solver("dopri5", atol=1e-10, rtol=1e-10)


class ShiftedLinear(nn.Module):
    """f(t, z, c) = A z + B c: z(T) = e^{AT} x + A^{-1}(e^{AT} - I) B c, log-det T tr A."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.A, self.B = A.clone(), B.clone()

    def forward(self, t: torch.Tensor, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return z @ self.A.T + context @ self.B.T


class ShiftedLinearJacobian(ShiftedLinear):
    """The same field with its Jacobian A given: the exact trace's fast path."""

    def value_and_jacobian(self, t, z, context):
        return self(t, z, context=context), self.A.expand(len(z), -1, -1)


def _shifted(dim: int = 3, K: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    A = torch.randn(dim, dim) * 0.4 - 0.3 * torch.eye(dim)  # invertible
    return A, torch.randn(dim, K)


def _gaussian(A: torch.Tensor, B: torch.Tensor, T: float, c: torch.Tensor):
    """The flow of A z + B c pushes N(0, I) at T back to N(m, S) at 0 (c one condition):
    x = e^{-AT}(z - A^{-1}(e^{AT} - I) B c)."""
    E = torch.linalg.matrix_exp(A * T)
    inv = torch.linalg.inv(E)
    shift = torch.linalg.solve(A, (E - torch.eye(len(A))) @ B) @ c
    return -inv @ shift, inv @ inv.T


def _log_normal(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(x)


def _label_flow(trace: str = "exact", **kw) -> CNF:
    return CNF(2, hidden=(16, 16), num_classes=3, embed=4, trace=trace, **kw)


def _strong(flow: CNF) -> CNF:
    """A field with log-dets of order one, not a near-identity map (and w = 2 strengthens it
    again)."""
    with torch.no_grad():
        for layer in flow.field.layers:
            layer.linear.weight.mul_(3)
            layer.context_gate.weight.mul_(3)
        flow.context_encoder.embedding.weight.mul_(2)
    return flow


# --- w = 0 is the conditional flow ---------------------------------------------------------


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_guidance_zero_is_the_conditional_flow(float64, trace: str) -> None:
    flow = _label_flow(trace, solver=Solver(atol=1e-8, rtol=1e-8))
    labels = torch.tensor([0, 1, 2, 2, 1])
    gen = torch.Generator()
    for c in (labels, 1):
        gen.manual_seed(3)
        x = guided_sample(flow, 5, c, 0.0, generator=gen)
        gen.manual_seed(3)
        torch.testing.assert_close(x, flow.sample(5, context=c, generator=gen), rtol=0, atol=0)
        gen.manual_seed(4)
        logq = guided_log_prob(flow, x, c, 0, generator=gen)
        gen.manual_seed(4)
        torch.testing.assert_close(logq, flow.log_prob(x, context=c, generator=gen), rtol=0,
                                   atol=1e-12)  # fmt: skip
        guided = guided_sample_and_log_prob(flow, 5, c, 0.0, generator=gen.manual_seed(5))
        plain = flow.sample_and_log_prob(5, context=c, generator=gen.manual_seed(5))
        for a, b in zip(guided, plain, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_guided_field_is_the_extrapolation(float64) -> None:
    flow = _label_flow()
    t, z, labels = torch.tensor(0.3), torch.randn(6, 2), torch.arange(6) % 3
    cond = flow.velocity(t, z, context=labels)
    null = flow.velocity(t, z, context=labels, drop=torch.ones(6, dtype=torch.bool))
    for w in (0.0, 0.5, 3):
        torch.testing.assert_close(guided_field(flow, t, z, labels, w), (1 + w) * cond - w * null,
                                   rtol=0, atol=1e-14)  # fmt: skip
    torch.testing.assert_close(guided_field(flow, t, z, labels, 0.0), cond, rtol=0, atol=0)


@pytest.mark.parametrize("rows", ["per-row", "shared"])
def test_guided_jacobian_equals_autograd(float64, rows: str) -> None:
    """The forward-mode Jacobian of the guided field, (1 + w) J(c) - w J(null), per row, and its
    Jacobian-vector product."""
    flow = _label_flow()
    view = guided_flow(flow, 2.5)
    assert isinstance(view.field, GuidedTangentField)  # both forward-mode paths
    t, z = torch.tensor(0.7), torch.randn(5, 2)
    labels = torch.tensor([0, 2, 1, 1, 0]) if rows == "per-row" else torch.tensor(2)
    e = view.encode_context(labels, 5)
    value, jac = view.field.value_and_jacobian(t, z, context=e)
    torch.testing.assert_close(value, view.field(t, z, context=e), rtol=0, atol=1e-13)
    expected = torch.stack([
        torch.autograd.functional.jacobian(
            lambda zi, i=i: view.field(t, zi[None], context=e[i % len(e)][None])[0], z[i]
        )
        for i in range(5)
    ])  # fmt: skip
    torch.testing.assert_close(jac, expected, rtol=0, atol=1e-12)
    v = torch.randn(5, 2)  # Hutchinson's forward-mode path: J v, the same combination
    value_v, jv = view.field.value_and_jvp(t, z, v, context=e)
    torch.testing.assert_close(value_v, value, rtol=0, atol=0)
    torch.testing.assert_close(jv, torch.einsum("nij,nj->ni", expected, v), rtol=0, atol=1e-12)


def test_the_view_shares_the_flows_tensors_and_leaves_the_flow_alone(float64) -> None:
    flow = _label_flow()
    keys = list(flow.state_dict())
    view = guided_flow(flow, 1.0)
    assert {id(p) for p in view.parameters()} == {id(p) for p in flow.parameters()}
    assert not isinstance(flow.field, GuidedField) and view.field.field is flow.field
    guided_log_prob(flow, torch.randn(4, 2), 1, 1.0).sum().backward()
    assert all(p.grad is not None for p in flow.parameters())  # encoder and null row included
    assert list(flow.state_dict()) == keys


def test_adjoint_gradients_of_the_guided_density_equal_direct(float64) -> None:
    """The encoded [e(c), e(null)] joins the adjoint's parameters: the embedding rows of the
    labels and of the null label get their direct gradients."""
    tight = Solver(atol=1e-9, rtol=1e-9)
    direct = CNF(2, hidden=(8,), num_classes=3, embed=2, solver=tight)
    adjoint = CNF(2, hidden=(8,), num_classes=3, embed=2, solver=tight.replace(adjoint=True))
    adjoint.load_state_dict(direct.state_dict())
    x, labels = torch.randn(6, 2), torch.tensor([0, 0, 1, 1, 0, 1])
    grads = [torch.autograd.grad(guided_log_prob(f, x, labels, 1.5).sum(), list(f.parameters()))
             for f in (direct, adjoint)]  # fmt: skip
    for g_direct, g_adjoint in zip(*grads, strict=True):
        torch.testing.assert_close(g_adjoint, g_direct, rtol=0, atol=1e-6)
    embedding = grads[0][[n for n, _ in direct.named_parameters()].index(
        "context_encoder.embedding.weight")]  # fmt: skip
    assert (embedding.abs().sum(1) > 0).tolist() == [True, True, False, True]  # 2 unused


def test_a_tables_guided_flow_is_in_original_units(float64) -> None:
    flow = TabularCNF(2, hidden=(8,), context=1, solver=TIGHT)
    flow.fit_preprocessing(torch.randn(50, 2) * torch.tensor([10.0, 0.1]) + 5)
    with torch.no_grad():
        flow.field.layers[-1].linear.weight.normal_()  # not the identity it starts as
    x, c = torch.randn(5, 2) * torch.tensor([10.0, 0.1]) + 5, torch.tensor([0.5])
    torch.testing.assert_close(guided_log_prob(flow, x, c, 0.0), flow.log_prob(x, context=c))
    x0 = guided_sample(flow, 300, c, 0.0, generator=torch.Generator().manual_seed(0))
    z = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x0, flow.to_data(z, context=c).value)
    samples = guided_sample(flow, 300, c, 2.0, generator=torch.Generator().manual_seed(0))
    assert samples[:, 0].std() > 20 * samples[:, 1].std()  # the normalizer's scales


# --- a linear field: the guided flow in closed form ------------------------------------------


@pytest.mark.parametrize("null", ["zero", "learned"])
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_linear_guided_density_is_the_closed_form_gaussian(float64, null: str, trace: str) -> None:
    """f = A z + B c with null vector v: f_w = A z + B((1 + w) c - w v), the flow of the shifted
    condition. Its samples are N(m, S) exactly, and the guided Jacobian is A for every w, so a
    Hutchinson log-det is T e^T A e for the solve's probe e."""
    A, B = _shifted()
    T, w = 0.8, 2.0
    field = (ShiftedLinear if null == "zero" else ShiftedLinearJacobian)(A, B)  # both paths
    flow = CNF(3, field, context=2, T=T, trace=trace, noise="gaussian", solver=TIGHT)
    v = torch.zeros(2) if null == "zero" else torch.tensor([0.7, -1.2])
    with torch.no_grad():
        flow.context_encoder.null_features.copy_(v)
    c = torch.tensor([1.5, -0.5])
    mean, cov = _gaussian(A, B, T, (1 + w) * c - w * v)
    x = torch.randn(40, 3) * 2
    logq = guided_log_prob(flow, x, c, w, generator=torch.Generator().manual_seed(1))
    # no value_and_jvp to combine: Hutchinson's estimate takes a VJP, not the Jacobian's columns
    assert not isinstance(guided_flow(flow, w).field, TangentField)
    truth = _log_normal(x, mean, cov)
    if trace == "hutchinson":
        e = flow.estimator.probe(x, torch.Generator().manual_seed(1))
        truth = truth + T * (torch.einsum("ni,ij,nj->n", e, A, e) - torch.trace(A))
    torch.testing.assert_close(logq, truth, rtol=0, atol=1e-7)
    assert (logq - flow.log_prob(x, context=c, generator=torch.Generator())).abs().min() > 1e-3


def test_linear_guided_samples_are_the_closed_form_map_and_moments(float64) -> None:
    A, B = _shifted()
    T, w = 0.7, 1.5
    flow = CNF(3, ShiftedLinear(A, B), context=2, T=T, trace="exact", solver=TIGHT)
    c = torch.tensor([-1.0, 2.0])
    mean, cov = _gaussian(A, B, T, (1 + w) * c)  # the null vector is zero at first
    n = 4000
    x = guided_sample(flow, n, c, w, generator=torch.Generator().manual_seed(7))
    z = torch.randn(n, 3, generator=torch.Generator().manual_seed(7))
    inv = torch.linalg.inv(torch.linalg.matrix_exp(A * T))
    torch.testing.assert_close(x, mean + z @ inv.T, rtol=0, atol=1e-7)  # sample by sample
    se = (cov.diagonal() / n).sqrt()
    assert ((x.mean(0) - mean).abs() < 5 * se).all()
    cov_se = ((cov.diagonal()[:, None] * cov.diagonal()[None] + cov**2) / n).sqrt()
    assert ((torch.cov(x.T) - cov).abs() < 5 * cov_se).all()


def test_guided_round_trip_and_sample_log_prob_agree(float64) -> None:
    flow = _strong(_label_flow(solver=Solver(atol=1e-9, rtol=1e-9)))
    labels = torch.tensor([0, 1, 2, 1])
    x, logq = guided_sample_and_log_prob(flow, 4, labels, 2.0,
                                         generator=torch.Generator().manual_seed(2))  # fmt: skip
    torch.testing.assert_close(guided_log_prob(flow, x, labels, 2.0), logq, rtol=0, atol=1e-6)
    view = guided_flow(flow, 2.0)
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(view.to_latent(x, context=labels).value, z, rtol=0, atol=1e-6)
    assert (logq - flow.log_prob(x, context=labels)).abs().min() > 0.1  # not p(x | c)


def test_guided_density_integrates_to_one(float64) -> None:
    flow = _strong(_label_flow(solver=Solver(atol=1e-6, rtol=1e-6))).eval()
    g = torch.linspace(-8, 8, 61)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    grid = torch.stack([xx.flatten(), yy.flatten()], 1)
    with torch.no_grad():
        logq = guided_log_prob(flow, grid, 1, 2.0)
        logp = flow.log_prob(grid, context=1)
    mass = logq.exp().sum() * (g[1] - g[0]) ** 2
    torch.testing.assert_close(mass, torch.tensor(1.0), rtol=0, atol=2e-3)
    assert (logq - logp).abs().max() > 1  # guidance changed the density
    assert logq.max() - logq.min() > 10


# --- the Bayes classifier on class densities in closed form -----------------------------------


def _two_gaussians(trace: str = "exact") -> tuple[CNF, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A flow of p(x | y) = N(m_y, S): the linear field A z + B e_y with set embeddings e_y."""
    A, B = _shifted(2, 2)
    T = 1.0
    flow = CNF(2, ShiftedLinearJacobian(A, B), num_classes=2, embed=2, T=T, trace=trace,
               noise="gaussian", solver=TIGHT)  # fmt: skip
    embeddings = torch.tensor([[1.0, 0.5], [-1.0, 1.0], [0.0, 0.0]])  # rows 0, 1 and null
    with torch.no_grad():
        flow.context_encoder.embedding.weight.copy_(embeddings)
    return flow, [_gaussian(A, B, T, embeddings[y]) for y in range(2)]


def test_class_log_likelihoods_are_the_closed_form(float64) -> None:
    flow, gaussians = _two_gaussians()
    x = torch.randn(50, 2) * 2
    ll = class_log_likelihoods(flow, x, batch_size=16)
    truth = torch.stack([_log_normal(x, m, S) for m, S in gaussians], 1)
    assert ll.shape == (50, 2) and ll.dtype == torch.float64
    torch.testing.assert_close(ll, truth, rtol=0, atol=1e-7)
    assert flow.training  # the mode it was in


def test_every_class_is_solved_under_the_same_probes(float64) -> None:
    """With a linear field the Hutchinson log-det is T e^T A e whatever the class: the same
    probes in every class's solve cancel it from the comparison exactly."""
    flow, gaussians = _two_gaussians("hutchinson")
    x = torch.randn(40, 2) * 2
    ll = class_log_likelihoods(flow, x, batch_size=16, seed=3)
    truth = torch.stack([_log_normal(x, m, S) for m, S in gaussians], 1)
    assert (ll - truth).abs().max() > 1e-2  # the estimate is noisy ...
    diff = ll[:, 0] - ll[:, 1]
    torch.testing.assert_close(diff, truth[:, 0] - truth[:, 1], rtol=0, atol=1e-7)  # ... fairly
    torch.testing.assert_close(class_log_likelihoods(flow, x, batch_size=16, seed=3), ll)


def test_classify_is_bayes_rule_and_the_prior_moves_the_boundary(float64) -> None:
    flow, gaussians = _two_gaussians()
    x = torch.randn(300, 2) * 2
    truth = torch.stack([_log_normal(x, m, S) for m, S in gaussians], 1)
    ll, decisions = class_log_likelihoods(flow, x), []
    for prior in (None, [0.9, 0.1], torch.tensor([0.2, 0.8])):
        result = bayes_rule(ll, prior) if prior is not None else classify(flow, x)
        p = torch.full((2,), 0.5) if prior is None else torch.as_tensor(prior)
        joint = truth + p.log()
        torch.testing.assert_close(result.log_posterior, joint.log_softmax(1), rtol=0, atol=1e-7)
        torch.testing.assert_close(result.posterior.sum(1), torch.ones(300))
        torch.testing.assert_close(result.log_evidence, joint.logsumexp(1), rtol=0, atol=1e-7)
        assert torch.equal(result.predicted, joint.argmax(1))
        decisions.append(result.predicted)
    uniform, skewed0, skewed1 = decisions
    assert ((skewed0 == 0) >= (uniform == 0)).all() and (skewed0 != uniform).any()
    assert ((skewed1 == 1) >= (uniform == 1)).all() and (skewed1 != uniform).any()


def test_accuracy_and_confusion_on_a_labelled_set(float64) -> None:
    flow, _ = _two_gaussians()
    y = torch.arange(200) % 2
    with torch.no_grad():
        x = flow.sample(200, context=y, generator=torch.Generator().manual_seed(0))
    result = classify(flow, x)
    acc, table = result.accuracy(y), result.confusion(y)
    assert isinstance(result, Classification) and result.classes == 2
    assert table.shape == (2, 2) and int(table.sum()) == 200
    assert table.sum(1).tolist() == [100, 100]  # rows: the true classes
    assert table.sum(0).tolist() == torch.bincount(result.predicted, minlength=2).tolist()
    assert acc == pytest.approx(float(table.trace()) / 200) and acc > 0.6
    assert accuracy(result.predicted, y) == acc


def test_confusion_and_accuracy_by_hand() -> None:
    pred, y = torch.tensor([0, 1, 1, 2, 2]), torch.tensor([0, 1, 2, 2, 0])
    table = [[1, 0, 1], [0, 1, 0], [0, 1, 1]]  # rows: the true classes
    assert confusion(pred, y, 3).tolist() == table
    assert confusion(pred.to(torch.uint8), y.to(torch.uint8), 3).tolist() == table  # no overflow
    assert accuracy(pred, y) == pytest.approx(0.6)
    result = bayes_rule(torch.tensor([[0.0, -math.inf], [-1.0, -1.0]]), prior=[0.0, 1.0])
    assert result.predicted.tolist() == [0, 1]  # a row only class 0 explains; a tie the prior


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("guidance", "error", "match"),
    [
        (-0.5, ValueError, r"guidance must be a finite number w >= 0 .* got -0.5"),
        (math.nan, ValueError, r"guidance must be a finite number .* got nan"),
        (math.inf, ValueError, r"guidance must be a finite number .* got inf"),
        (True, TypeError, r"guidance must be a real number .* got bool True"),
        ("2", TypeError, r"guidance must be a real number .* got str '2'"),
        (torch.tensor(2.0), TypeError, r"guidance must be a real number .* got Tensor"),
    ],
)
def test_guidance_refusals(guidance, error, match) -> None:
    flow, x = _label_flow(), torch.zeros(3, 2)
    for call in (
        lambda: guided_sample(flow, 3, 1, guidance),
        lambda: guided_log_prob(flow, x, 1, guidance),
        lambda: guided_sample_and_log_prob(flow, 3, 1, guidance),
        lambda: guided_field(flow, torch.tensor(0.5), x, 1, guidance),
    ):
        with pytest.raises(error, match=match):
            call()


def test_guidance_refuses_a_flow_without_conditions() -> None:
    with pytest.raises(ValueError, match=r"flow models p\(x\) without conditions.*cond_dropout"):
        guided_sample(CNF(2, hidden=(4,)), 3, 1, 2.0)
    with pytest.raises(TypeError, match=r"flow must be a conditional cnf.CNF, got Linear"):
        guided_log_prob(nn.Linear(2, 2), torch.zeros(3, 2), 1, 2.0)


@pytest.mark.parametrize(
    ("context", "error", "match"),
    [
        (None, ValueError, r"context is missing: .*num_classes=3"),
        (torch.tensor([0, 1]), ValueError, r"context of shape \(2,\) does not fit 3 rows"),
        (3, ValueError, r"context holds labels outside \[0, 3\): \[3\]"),
        (torch.zeros(3), TypeError, r"context must hold integer class labels"),
    ],
)
def test_guidance_checks_the_context_as_the_flow_does(context, error, match) -> None:
    flow = _label_flow()
    with pytest.raises(error, match=match):
        guided_log_prob(flow, torch.zeros(3, 2), context, 1.0)
    with pytest.raises(error, match=match):
        guided_sample(flow, 3, context, 1.0)


def test_guidance_checks_x_and_n_as_the_flow_does() -> None:
    flow = _label_flow()
    with pytest.raises(ValueError, match=r"expected x of shape \(n, 2\), got \(3, 3\)"):
        guided_log_prob(flow, torch.zeros(3, 3), 1, 1.0)
    with pytest.raises(ValueError, match=r"n must be a positive integer number of samples"):
        guided_sample(flow, 0, 1, 1.0)
    with pytest.raises(ValueError, match=r"a guided field takes context=\[e\(c\), e\(null\)\]"):
        GuidedJacobianField(flow.field, 1.0).value_and_jacobian(
            torch.tensor(0.0), torch.zeros(3, 2)
        )


@pytest.mark.parametrize(
    ("flow", "match"),
    [
        (CNF(2, hidden=(4,)), r"label-conditional CNF to classify, got a CNF of p\(x\) without"),
        (CNF(2, hidden=(4,), context=3), r"got a CNF of p\(x \| c\) for 3 continuous features"),
        (nn.Linear(2, 2), r"got Linear: build CNF\(dim, num_classes=C\)"),
    ],
)
def test_classify_refuses_a_flow_without_labels(flow, match: str) -> None:
    for call in (classify, class_log_likelihoods):
        with pytest.raises(ValueError, match=match):
            call(flow, torch.zeros(3, 2))


@pytest.mark.parametrize(
    ("prior", "error", "match"),
    [
        ([0.5, 0.5], ValueError, r"shape \(3,\), got \(2,\): this flow has 3 classes"),
        ([[0.2, 0.3, 0.5]], ValueError, r"shape \(3,\), got \(1, 3\)"),
        ([0.5, 0.6, -0.1], ValueError, r"non-negative probabilities"),
        ([0.5, math.nan, 0.5], ValueError, r"non-negative probabilities"),
        ([1.0, 1.0, 1.0], ValueError, r"prior must sum to 1, .*sum 3.*p / sum\(p\)"),
        ("uniform", TypeError, r"prior must be 3 class probabilities .* got str"),
    ],
)
def test_prior_refusals(prior, error, match) -> None:
    with pytest.raises(error, match=match):
        classify(_label_flow(), torch.zeros(3, 2), prior=prior)


def test_classifier_input_refusals() -> None:
    flow = _label_flow()
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 0"):
        class_log_likelihoods(flow, torch.zeros(3, 2), batch_size=0)
    with pytest.raises(ValueError, match=r"expected x of shape \(n, 2\)"):
        classify(flow, torch.zeros(3))
    with pytest.raises(ValueError, match=r"log_likelihood must be a tensor \(n, C\).*\(3,\)"):
        bayes_rule(torch.zeros(3))


L = torch.tensor
LABEL_REFUSALS = [
    (L([0, 1]), L([0, 1, 1]), ValueError, r"one shape \(n,\), got \(2,\) and \(3,\)"),
    (L([[0, 1]]), L([[0, 1]]), ValueError, r"label vectors of one shape \(n,\), got \(1, 2\)"),
    (L([0.0, 1.0]), L([0, 1]), TypeError, r"pred must be an integer .*float"),
    (L([0, 1]), [0, 1], TypeError, r"y must be an integer tensor .* got list"),
    (L([0, 3]), L([0, 1]), ValueError, r"pred holds labels outside \[0, 3\): \[3\]"),
    (L([0, 1]), L([-1, 1]), ValueError, r"y holds labels outside \[0, 3\): \[-1\]"),
]


@pytest.mark.parametrize(("pred", "y", "error", "match"), LABEL_REFUSALS)
def test_label_refusals(pred, y, error, match) -> None:
    with pytest.raises(error, match=match):
        confusion(pred, y, 3)
    if "outside" not in match:
        with pytest.raises(error, match=match):
            accuracy(pred, y)


def test_empty_and_class_count_refusals() -> None:
    empty = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"accuracy of no rows is undefined"):
        accuracy(empty, empty)
    assert confusion(empty, empty, 2).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match=r"classes must be a positive integer, got 0"):
        confusion(empty, empty, 0)


def test_a_multiscale_image_flow_classifies_and_guides(float64) -> None:
    """The multiscale model of images: its classes' log-likelihoods are its own log_prob per
    class, and its guided view at w = 0 is the model (densities under the same probes, and
    samples from the same noise); at w > 0 every block is guided."""
    from cnf.multiscale import MultiscaleCNF

    rk4 = Solver("rk4", step_size=0.5)
    torch.manual_seed(0)
    flow = MultiscaleCNF((1, 8, 8), levels=17, num_classes=3, scales=2, blocks=1, hidden=(8,),
                         field="conv", solver=rk4, eval_solver=rk4).double()  # fmt: skip
    x = flow.sample(4, context=torch.tensor([0, 1, 2, 0]))
    table = class_log_likelihoods(flow, x, seed=3)
    for y in range(3):
        expected, _ = log_probs(flow, x, seed=3, context=torch.full((4,), y))
        torch.testing.assert_close(table[:, y], expected)

    def logp(f, **kw):
        return f.log_prob(x, context=1, generator=torch.Generator().manual_seed(0), **kw)

    torch.testing.assert_close(logp(guided_flow(flow, 0.0)), logp(flow))
    draws = [f.sample(3, context=2, generator=torch.Generator().manual_seed(1))
             for f in (flow, guided_flow(flow, 0.0))]  # fmt: skip
    torch.testing.assert_close(draws[0], draws[1])
    guided = guided_flow(flow, 2.0)
    assert all(isinstance(b.field, GuidedField) for b in guided.ode_blocks())
    assert not any(isinstance(b.field, GuidedField) for b in flow.ode_blocks())
    assert not torch.allclose(logp(guided), logp(flow))
