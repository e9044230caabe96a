"""Images trained by flow matching: the U-Net field, the single-scale model's exact likelihood,
the importance-weighted bound on the discrete likelihood, the bfloat16 option."""

import math

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

from cnf import Solver
from cnf.dequantize import dequantized_bound, logmeanexp_noise_bias
from cnf.field_configs import UNetConfig
from cnf.fields import UNet, _ResBlock
from cnf.multiscale import MultiscaleCNF
from cnf.training import FlowMatching, MaximumLikelihood

TIGHT = Solver("dopri5", atol=1e-9, rtol=1e-9)


def _perturbed(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Give every parameter (the zero-initialized output too) random values."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


@pytest.mark.parametrize("scale_shift", [False, True])
def test_the_unet_keeps_shapes_starts_at_zero_and_takes_time(scale_shift: bool) -> None:
    unet = UNet(2, width=8, resolutions=3, depth=2, scale_shift=scale_shift)
    x = torch.randn(5, 2, 8, 8)
    assert unet(torch.tensor(0.3), x).shape == x.shape
    assert unet(torch.tensor(0.3), x).abs().max() == 0  # the untrained flow is the identity
    _perturbed(unet)
    t = torch.tensor([0.1, 0.4, 0.4, 0.9, 0.2])
    per_sample = unet(t, x)
    for i in range(5):  # one time per row is the same as each row at its own time
        torch.testing.assert_close(per_sample[i], unet(t[i], x[i : i + 1])[0])
    assert (unet(torch.tensor(0.1), x) - unet(torch.tensor(0.9), x)).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="must be a multiple of 4"):
        MultiscaleCNF((1, 6, 6), levels=4, scales=1, blocks=1, field=UNetConfig(resolutions=3))


def test_scale_shift_conditions_the_normalized_features_on_time() -> None:
    block = _perturbed(_ResBlock(4, 6, embedding=5, scale_shift=True))
    x, emb = torch.randn(3, 4, 8, 8), torch.randn(3, 5)
    scale, shift = block.time(emb).chunk(2, 1)  # (3, 6) each
    h = block.norm2(block.conv1(torch.nn.functional.silu(block.norm1(x))))
    h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    expected = block.conv2(torch.nn.functional.silu(h)) + block.skip(x)
    torch.testing.assert_close(block(x, emb), expected)
    with pytest.raises(ValueError, match="scale_shift must be True or False, got 'yes'"):
        UNet(1, scale_shift="yes")


def test_the_single_scale_model_log_prob_is_log_det_of_its_map(float64) -> None:
    model = MultiscaleCNF((1, 4, 4), levels=4, scales=1, blocks=1, field=UNetConfig(width=4),
                          trace="exact", solver=TIGHT)  # fmt: skip
    _perturbed(model.ode_blocks()[0].field, 0.2)
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64)
    x = torch.randint(0, 4, (2, 1, 4, 4), generator=g) + noise

    def f(v: torch.Tensor) -> torch.Tensor:
        # the latent does not depend on the trace estimator; one probe is cheaper than 16
        return model.to_latent(v.reshape(-1, 1, 4, 4), trace="hutchinson").value.flatten(1)

    with torch.no_grad():
        logp = model.log_prob(x)
        z = f(x)
    jac = torch.stack([jacobian(f, xi.flatten()[None])[0, :, 0] for xi in x])
    brute = model.base_log_prob(z) + torch.linalg.slogdet(jac)[1]
    torch.testing.assert_close(logp, brute, rtol=0, atol=1e-6)
    block = model.ode_blocks()[0]
    with torch.no_grad():  # the field's share is far above the tolerance
        share = block.to_latent(model.field_coordinates(x)).logdet
    assert share.abs().min() > 1e-2


def test_flow_matching_trains_the_single_scale_model_in_its_logit_space() -> None:
    model = MultiscaleCNF((1, 4, 4), levels=4, scales=1, blocks=1, field=UNetConfig(width=4))
    x = torch.randint(0, 4, (8, 1, 4, 4)).float() + torch.rand(8, 1, 4, 4)
    y = model.field_coordinates(x)
    assert y.shape == x.shape and float(y.abs().max()) > 1.0  # the logit, not [0, L)
    loss, _ = FlowMatching().loss(model, x, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and model.ode_blocks()[0].field.out[-1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="flow matching needs one block"):
        MultiscaleCNF((1, 4, 4), levels=4, scales=2, blocks=1).field_coordinates(x)


def test_unet_dropout_regularizes_the_regression_but_never_a_solve() -> None:
    model = MultiscaleCNF((1, 4, 4), levels=4, scales=1, blocks=1,
                          field=UNetConfig(width=8, dropout=0.5),
                          solver=Solver("rk4", step_size=0.5))  # fmt: skip
    field = _perturbed(model.ode_blocks()[0].field, 0.3)
    x = torch.randint(0, 4, (8, 1, 4, 4)).float() + torch.rand(8, 1, 4, 4)
    z, t = torch.randn(8, 1, 4, 4), torch.tensor(0.5)
    assert not torch.equal(field(t, z), field(t, z))  # training mode: a fresh mask per call
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    fm = [FlowMatching().loss(model, x, gen())[0] for _ in range(2)]
    assert fm[0] == fm[1]  # a step's masks follow from its generator: (seed, iteration) ...
    halves = [FlowMatching().loss(model, x, gen(), shard=r)[0] for r in ((0, 4), (4, 8))]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, fm[0])  # ... whatever the shard
    layers = [m for m in field.modules() if hasattr(m, "draw")]
    assert len(layers) == 5 and all(m.draw is None for m in layers)  # given back after it
    for m in layers:
        m.p = 0.0
    assert FlowMatching().loss(model, x, gen())[0] != fm[0]  # the regression sees the dropout
    for m in layers:
        m.p = 0.5
    mle = [MaximumLikelihood().loss(model, x, gen())[0] for _ in range(2)]
    assert mle[0] == mle[1]  # ... a likelihood solve does not ...
    assert field.training  # ... and the mode is given back
    model.eval()
    torch.testing.assert_close(field(t, z), field(t, z), rtol=0, atol=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        UNet(1, dropout=1.0)


def test_the_importance_weighted_bound_is_tighter_and_converges(float64) -> None:
    # a 2x2 image of 2 levels: P(k) is the integral of p over the unit cube at k, computable
    rk4 = Solver("rk4", step_size=0.125)
    model = MultiscaleCNF((1, 2, 2), levels=2, scales=1, blocks=1, field="conv", hidden=(8,),
                          alpha=0.05, trace="exact", solver=rk4)  # fmt: skip
    _perturbed(model.ode_blocks()[0].field, 0.5)
    model.eval()
    pixels = torch.tensor([[[[0, 1], [1, 1]]], [[[1, 0], [0, 0]]]], dtype=torch.uint8)
    nodes, weights = (torch.from_numpy(a) / 2 for a in np.polynomial.legendre.leggauss(6))
    grid = torch.cartesian_prod(*[nodes + 0.5] * 4).reshape(-1, 1, 2, 2)  # Gauss-Legendre, 6^4
    weight = torch.cartesian_prod(*[weights] * 4).prod(1)
    with torch.no_grad():
        exact = [-math.log(float(model.log_prob(p + grid).exp() @ weight)) for p in pixels]
    exact_nll = sum(exact) / len(exact)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731  the same draws for every K
    one = dequantized_bound(model, pixels, 1, generator=gen())
    sixteen = dequantized_bound(model, pixels, 16, generator=gen())
    many = dequantized_bound(model, pixels, 2048, generator=gen())
    # on the same 16 draws, log-mean-exp is never worse than the mean of the single-draw bounds
    with torch.no_grad():
        u = torch.rand((16, *pixels.shape), generator=gen()).double()
        draws = model.log_prob((pixels.double() + u).flatten(0, 1)).reshape(16, 2)
    single = -float(draws.mean())
    assert sixteen.nll <= single + 1e-12
    # a bound in expectation, closing in on P(k); its spread at K = 2048 is about 0.015 nats
    assert exact_nll - 0.08 <= many.nll <= sixteen.nll + 0.05
    assert abs(many.nll - exact_nll) < abs(one.nll - exact_nll) + 1e-9
    assert many.samples == 2048 and many.bits_per_dim == pytest.approx(many.nll / (4 * math.log(2)))


def _tiny_hutchinson_model() -> MultiscaleCNF:
    """A 2x2 image model of 4 levels with random weights and Hutchinson's trace, in eval mode."""
    rk4 = Solver("rk4", step_size=0.25)
    model = MultiscaleCNF((1, 2, 2), levels=4, scales=1, blocks=1, field="conv", hidden=(16,),
                          alpha=0.05, trace="hutchinson", solver=rk4)  # fmt: skip
    _perturbed(model.ode_blocks()[0].field, 0.5)
    return model.eval()


def test_the_importance_weighted_bound_takes_the_exact_trace_not_hutchinsons(float64) -> None:
    # Hutchinson's log p + eps is unbiased, but log-mean-exp over K draws of it is biased low
    # (towards log E exp(eps) > 0 nats); the bound must be computed from exact log-densities
    model = _tiny_hutchinson_model()
    pixels = torch.randint(0, 4, (6, 1, 2, 2), generator=torch.Generator().manual_seed(1))
    K = 64
    bound = dequantized_bound(
        model, pixels, K, generator=torch.Generator().manual_seed(2), batch_size=K * 4 * 6
    )  # one solve: the draws below
    u = torch.rand((K, *pixels.shape), generator=torch.Generator().manual_seed(2)).double()
    x = (pixels.double() + u).flatten(0, 1)
    with torch.no_grad():
        exact = model.log_prob(x, trace="exact").reshape(K, -1)
        noisy = model.log_prob(x, generator=torch.Generator().manual_seed(3)).reshape(K, -1)
    iw = lambda lp: -float((torch.logsumexp(lp, 0) - math.log(K)).mean())  # noqa: E731
    assert bound.trace == "exact" and bound.nll == pytest.approx(iw(exact), abs=1e-9)
    assert bound.single_nll == pytest.approx(-float(exact.mean()), abs=1e-9)
    torch.testing.assert_close(bound.draws, exact, rtol=0, atol=1e-9)
    assert (noisy - exact).std() > 0.5  # the probe's noise is real here (about 1 nat) ...
    assert iw(noisy) < iw(exact) - 0.1  # ... and a Hutchinson "bound" would claim too much
    # K = 1 keeps the model's own (unbiased) estimator and its cost
    assert dequantized_bound(model, pixels, 1).trace == "hutchinson"


def test_the_noise_bias_of_a_log_mean_exp_is_its_second_order_term(float64) -> None:
    # E log mean exp(l + e) - log mean exp(l) for independent e_j ~ N(0, v_j), by Monte Carlo
    g = torch.Generator().manual_seed(0)
    ell = torch.randn(8, 5, generator=g) * torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0])  # K = 8
    v = 0.02 + 0.08 * torch.rand(8, 5, generator=g)
    noise = torch.randn(100_000, 8, 5, generator=g) * v.sqrt()
    lme = lambda x: torch.logsumexp(x, -2) - math.log(8)  # noqa: E731
    realized = (lme(ell + noise).mean(0) - lme(ell)).tolist()
    se = ((lme(ell + noise) - lme(ell)).std(0) / math.sqrt(100_000)).tolist()
    predicted = logmeanexp_noise_bias(ell + noise[0], v).tolist()  # weights from noisy terms
    for r, s, p, vmax in zip(realized, se, predicted, v.max(0).values.tolist(), strict=True):
        assert 0 < r <= 0.5 * (1 - 1 / 8) * vmax + 4 * s  # positive, and at most its bound
        assert p == pytest.approx(r, rel=0.25, abs=4 * s)
    assert float(logmeanexp_noise_bias(ell[:1], v[:1]).abs().max()) == 0  # K = 1: none


def test_probe_averaged_bound_estimates_its_own_bias(float64) -> None:
    # averaging P Hutchinson probes per draw leaves a bias of about var/(2P) inside the
    # log-mean-exp; the bound reports an estimate of it from the probes' spread, checked here
    # against the exact-trace bound on the same draws, over several sets of probes
    model = _tiny_hutchinson_model()
    pixels = torch.randint(0, 4, (70, 1, 2, 2), generator=torch.Generator().manual_seed(1))
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    exact = dequantized_bound(model, pixels, 16, generator=gen(2), batch_size=10**6)
    chunked = dequantized_bound(model, pixels, 16, generator=gen(2), batch_size=200)
    assert chunked.nll == pytest.approx(exact.nll, abs=1e-9)  # the draws whatever the solves
    pixels = pixels[:40]
    exact = dequantized_bound(model, pixels, 16, generator=gen(2), batch_size=10**6)
    biases = {}
    for probes in (2, 16):
        runs = [dequantized_bound(model, pixels, 16, probes=probes, generator=gen(2),
                                  probe_generator=gen(100 + i), batch_size=10**6)
                for i in range(8)]  # fmt: skip
        realized = torch.tensor([exact.nll - b.nll for b in runs])  # how optimistic each is
        estimated = sum(b.probe_bias for b in runs) / len(runs)
        se = float(realized.std()) / math.sqrt(len(runs))
        assert estimated == pytest.approx(float(realized.mean()), rel=0.2, abs=3 * se)
        b = runs[0]
        assert b.trace == "hutchinson" and b.probes == probes and b.samples == 16
        assert b.probe_bias_bits_per_dim == pytest.approx(b.probe_bias / (4 * math.log(2)))
        spread = float((b.draws - exact.draws).std())  # the same draws, up to the probes' noise
        assert 0.2 < spread < 2 and b.probe_noise == pytest.approx(spread, rel=0.15)
        assert b.single_nll == pytest.approx(exact.single_nll, abs=4 * spread / math.sqrt(640))
        biases[probes] = estimated
    assert 4 < biases[2] / biases[16] < 16  # it falls as 1/P
    with pytest.raises(ValueError, match="probes must be an integer >= 2"):
        dequantized_bound(model, pixels, 4, probes=1)


def _bf16_losses(device: str) -> tuple[torch.Tensor, torch.Tensor, set]:
    torch.manual_seed(0)
    model = _perturbed(MultiscaleCNF((1, 8, 8), levels=17, scales=1, blocks=1,
                                     field=UNetConfig(width=8)), 0.1).to(device)  # fmt: skip
    x = (torch.randint(0, 17, (16, 1, 8, 8)).float() + torch.rand(16, 1, 8, 8)).to(device)
    seen = set()
    model.ode_blocks()[0].field.out[-1].register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    gen = lambda: torch.Generator(device=device).manual_seed(0)  # noqa: E731
    low, _ = FlowMatching(autocast="bf16").loss(model, x, gen())
    full, _ = FlowMatching().loss(model, x, gen())
    return low, full, seen


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bfloat16_autocast_runs_the_regression_field_in_bfloat16(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: bfloat16 autocast is meant for the GPU")
    low, full, seen = _bf16_losses(device)
    assert seen == {torch.bfloat16, torch.float32}  # the field ran in both precisions
    assert low.dtype == torch.float32
    assert float(low.detach()) == pytest.approx(float(full.detach()), rel=0.05)
    assert float(low.detach()) != float(full.detach())
    with pytest.raises(ValueError, match=r"autocast .fp16. is unknown"):
        FlowMatching(autocast="fp16")


def test_evaluation_turns_tf32_off_and_restores_it() -> None:
    from cnf.flow import evaluating

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = True
    model = torch.nn.Linear(2, 2)
    try:
        with evaluating(model):
            assert not matmul.allow_tf32 and not cudnn.allow_tf32 and not model.training
        assert matmul.allow_tf32 and cudnn.allow_tf32 and model.training
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before
