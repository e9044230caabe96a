"""The multiscale image CNF against brute-force Jacobians, closed forms and itself, in float64."""

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from cnf import Solver
from cnf.evaluate import bits_per_dim, evaluate
from cnf.field_configs import ConvConfig
from cnf.multiscale import MultiscaleCNF, max_scales
from cnf.transforms import Dequantization, squeeze

TIGHT = Solver("dopri5", atol=1e-10, rtol=1e-10)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny convolutions: a second thread only adds synchronization (conftest restores)."""
    torch.set_num_threads(1)


def _tiny(shape=(1, 4, 4), levels: int = 4, strength: float = 3.0, **kw) -> MultiscaleCNF:
    """Two scales on a tiny image, with fields strong enough for log-dets of order one."""
    options = dict(levels=levels, scales=2, blocks=1, hidden=(8, 8), activation="tanh",
                   trace="exact", solver=TIGHT)  # fmt: skip
    model = MultiscaleCNF(shape, **{**options, **kw})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("conv.weight"):
                p.mul_(strength)
    return model


def _pixels(n: int, shape, levels: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return Dequantization.noise(torch.randint(0, levels, (n, *shape), generator=g), generator=g)


def _zero_fields(model: MultiscaleCNF) -> None:
    """Zero every block's last layer: each CNF becomes the identity with log-det 0."""
    with torch.no_grad():
        for block in model.ode_blocks():
            for p in block.field.layers[-1].parameters():
                p.zero_()


def _by_hand(model: MultiscaleCNF, x: torch.Tensor, **kw) -> tuple[torch.Tensor, list]:
    """The two-scale, one-block pass of :func:`_tiny` written out: the transforms' log-det and
    each block's result."""
    y, logdet = model.dequantization(x)
    y, ld = model.squash(y)
    first, second, last = model.ode_blocks()
    a = first.to_latent(y, **kw)
    b = second.to_latent(squeeze(a.value), **kw)
    c = last.to_latent(b.value[:, :2], **kw)
    return logdet + ld, [a, b, c]


def test_log_prob_matches_brute_force_jacobian(float64) -> None:
    """log p(x) = log N(f(x)) + log|det J_f(x)|, J_f by autograd through the whole composite map
    (dequantization scaling, logit, three CNFs, squeeze, factor-out and reassembly)."""
    model = _tiny()
    x = _pixels(2, (1, 4, 4), 4).double()

    def f(v: torch.Tensor) -> torch.Tensor:  # the state path does not depend on the trace
        return model.to_latent(v.reshape(-1, 1, 4, 4), trace="hutchinson").value.flatten(1)

    with torch.no_grad():
        z = f(x)
        logp = model.log_prob(x)
        _, blocks = _by_hand(model, x)
    jac = torch.stack([jacobian(f, xi.flatten(), vectorize=True)[0] for xi in x])
    brute = model.base_log_prob(z) + torch.linalg.slogdet(jac)[1]
    torch.testing.assert_close(logp, brute, rtol=0, atol=1e-6)
    # every block's share is far above the tolerance: a lost or wrong block log-det cannot hide
    assert min(float(b.logdet.abs().min()) for b in blocks) > 1e-2


@torch.no_grad()
def test_round_trip_and_sample_log_prob(float64) -> None:
    shape = (3, 4, 4)  # colour: 12 channels after the squeeze, 6 factored out
    model = _tiny(shape).eval()
    x = _pixels(2, shape, 4).double()
    out = model.to_latent(x)
    assert out.value.shape == x.shape
    back = model.to_data(out.value)
    torch.testing.assert_close(back.value, x, rtol=0, atol=1e-7)
    torch.testing.assert_close(back.logdet, -out.logdet, rtol=0, atol=1e-7)
    gen = torch.Generator().manual_seed(1)
    samples, logp = model.sample_and_log_prob(2, generator=gen)
    assert samples.shape == (2, *shape)
    torch.testing.assert_close(model.log_prob(samples), logp, rtol=0, atol=1e-6)
    gen.manual_seed(1)
    torch.testing.assert_close(model.sample(2, generator=gen), samples, rtol=0, atol=1e-8)


def test_bits_per_dim_of_a_known_gaussian(float64) -> None:
    """Without the logit (alpha=0) and with identity CNFs the model is N(L/2, L^2 I) in pixel
    units: its bits/dim on its own samples is the Gaussian's entropy per dimension in bits,
    (1/2) log2(2 pi e) + log2 L -- the log2 L coming from the rescaling by the levels."""
    levels = 256
    model = _tiny(
        (1, 4, 4), levels, alpha=0.0, trace="hutchinson", solver=Solver("rk4", step_size=1.0)
    )
    _zero_fields(model)
    x = levels / 2 + levels * torch.randn(4000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    truth = torch.distributions.Normal(levels / 2, float(levels)).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(model.log_prob(x[:50]), truth[:50], rtol=0, atol=1e-8)
    ev = evaluate(model, x)
    entropy_bits = 0.5 * math.log2(2 * math.pi * math.e) + math.log2(levels)
    assert ev.bits_per_dim == pytest.approx(bits_per_dim(ev.nll, 16))
    se = ev.nll_se / (16 * math.log(2))
    assert abs(ev.bits_per_dim - entropy_bits) < 4 * se
    assert se < 0.01  # the test can tell a missing log2(L) = 8 bits, or a wrong D


def test_hutchinson_log_prob_is_unbiased(float64) -> None:
    """With a fixed-step solver the state path does not depend on the probe, so the mean over
    probes of the Hutchinson log-density is the exact-trace one."""
    model = _tiny(trace="hutchinson", solver=Solver("rk4", step_size=0.25, atol=1e-5, rtol=1e-5))
    x = _pixels(1, (1, 4, 4), 4).double().expand(3000, -1, -1, -1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        estimates = model.log_prob(x, generator=gen)
        exact = model.log_prob(x[:1], trace="exact")
    se = estimates.std() / math.sqrt(len(estimates))
    assert estimates.std() > 0.05  # the probes do vary
    assert abs(float(estimates.mean() - exact)) < 4 * se


def test_regularizers_and_nfe_sum_over_blocks(float64) -> None:
    model = _tiny(eval_solver=Solver("rk4", step_size=0.5), solver=Solver("rk4", step_size=0.25))
    x = _pixels(2, (1, 4, 4), 4).double()
    out = model.to_latent(x, regularize=True)
    assert model.nfe.forward == 3 * 16  # three blocks of four rk4 steps
    transforms, (a, b, c) = _by_hand(model, x, regularize=True)
    torch.testing.assert_close(out.kinetic, a.kinetic + b.kinetic + c.kinetic)
    torch.testing.assert_close(out.jacobian, a.jacobian + b.jacobian + c.jacobian)
    torch.testing.assert_close(out.logdet, transforms + a.logdet + b.logdet + c.logdet)
    model.eval()
    model.log_prob(x)
    assert model.nfe.forward == 3 * 8  # the evaluation solver in every block


def test_gradients_reach_every_parameter() -> None:
    model = _tiny(trace="hutchinson", learn_T=True, solver=Solver("rk4", step_size=0.5))
    x = _pixels(4, (1, 4, 4), 4)
    (-model.log_prob(x).mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_adjoint_gradients_match_direct_backpropagation(float64) -> None:
    """FFJORD's configuration trains with the adjoint: through every block of the composite it
    must give the gradients that backpropagating through the solver's steps gives."""
    options = dict(trace="hutchinson", learn_T=True)
    solver = Solver(atol=1e-9, rtol=1e-9)
    direct = _tiny(**options, solver=solver)
    adjoint = _tiny(**options, solver=solver.replace(adjoint=True))
    adjoint.load_state_dict(direct.state_dict())
    x = _pixels(3, (1, 4, 4), 4).double()
    for model in (direct, adjoint):
        loss = -model.log_prob(x, generator=torch.Generator().manual_seed(0)).mean()
        loss.backward()
    assert adjoint.nfe.backward > 0 and direct.nfe.backward == 0
    for (name, a), b in zip(direct.named_parameters(), adjoint.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_scales_follow_ffjord_rule() -> None:
    assert [max_scales(s, s) for s in (28, 32, 8, 4, 3)] == [3, 4, 2, 1, 0]
    for shape, scales, blocks in [((1, 28, 28), 3, 10), ((3, 32, 32), 4, 14), ((1, 8, 8), 2, 6),
                                  ((1, 9, 9), 1, 2)]:  # fmt: skip
        model = MultiscaleCNF(shape, hidden=(4,))
        assert (len(model.scales), len(model.ode_blocks())) == (scales, blocks)
    # 28x28: 1x28x28 -> 4x14x14 (keep 2) -> 8x7x7 (keep 4) -> 4x7x7
    shapes = [b.event_shape for b in MultiscaleCNF((1, 28, 28), hidden=(4,), blocks=1).ode_blocks()]
    assert shapes == [(1, 28, 28), (4, 14, 14), (2, 14, 14), (8, 7, 7), (4, 7, 7)]


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: MultiscaleCNF((64,)), ValueError, r"image shape \(C, H, W\), got \(64,\)"),
        (lambda: MultiscaleCNF((1, 6, 6), scales=3), ValueError, "multiples of 4, got 6x6"),
        (lambda: MultiscaleCNF((1, 8, 8), blocks=0), ValueError, "blocks must be a positive"),
        (lambda: MultiscaleCNF((1, 8, 8), levels=1), ValueError, "levels must be an integer"),
        (
            lambda: MultiscaleCNF((1, 8, 8), field=ConvConfig("dense")),
            ValueError,
            "layer 'dense' is unknown",
        ),
    ],
)
def test_bad_construction(make, error, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_bad_input() -> None:
    model = _tiny(trace="hutchinson", solver=Solver("rk4", step_size=0.5))
    with pytest.raises(ValueError, match=r"expected x of shape \(n, 1, 4, 4\), got \(2, 16\)"):
        model.log_prob(torch.rand(2, 16))
    with pytest.raises(ValueError, match=r"outside the model's support.*multiplied by 4"):
        model.log_prob(torch.full((2, 1, 4, 4), 4.5))
    with pytest.raises(ValueError, match="NaN or inf"):
        model.log_prob(torch.full((2, 1, 4, 4), math.nan))
    with pytest.raises(ValueError, match="n must be a positive integer"):
        model.sample(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(float64) -> None:
    cpu = _tiny()
    gpu = _tiny().to("cuda")
    gpu.load_state_dict(cpu.state_dict())
    x = _pixels(3, (1, 4, 4), 4).double()
    torch.testing.assert_close(gpu.log_prob(x.cuda()).cpu(), cpu.log_prob(x), rtol=0, atol=1e-8)
    gen = torch.Generator(device="cuda").manual_seed(0)
    assert gpu.sample(4, generator=gen).device.type == "cuda"


def test_the_map_without_the_trace_is_the_same_map() -> None:
    # round trips (the validity check) skip the trace: the map must not change (fixed steps)
    rk4 = Solver("rk4", step_size=0.25)
    model = MultiscaleCNF((1, 4, 4), levels=4, blocks=1, hidden=(8,), solver=rk4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randint(0, 4, (3, 1, 4, 4)).float() + torch.rand(3, 1, 4, 4)
    with torch.no_grad():
        full, bare = model.to_latent(x), model.to_latent(x, logdet=False)
        torch.testing.assert_close(bare.value, full.value)
        assert (full.logdet - bare.logdet).abs().min() > 1e-3  # the blocks' traces left out
        back = model.to_data(bare.value, logdet=False).value
        torch.testing.assert_close(back, model.to_data(full.value).value)
    block = model.ode_blocks()[0]
    y = torch.randn(3, *block.event_shape)
    assert block.to_latent(y, logdet=False).logdet.abs().max() == 0
