"""The tabular model: the fixed affine layer's log-det, densities in original units."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from cnf.flow import CNF
from cnf.solvers import Solver
from cnf.table_flow import EXACT_EVAL_MAX_DIM, Normalizer, TabularCNF


def _data(n: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)) @ np.array([[2.0, 0.5, 0.0], [0.0, 0.3, 0.1], [0.0, 0.0, 40.0]])
    return x + np.array([10.0, -3.0, 500.0])


def _flow(dim: int, preprocess: str = "standardize", seed: int = 0) -> TabularCNF:
    torch.manual_seed(seed)
    flow = TabularCNF(
        dim, preprocess=preprocess, hidden=(16, 16), solver=Solver("rk4", step_size=0.1)
    )
    for p in flow.parameters():  # a clearly non-identity flow
        p.data.normal_(0, 0.5)
    return flow.eval()


@pytest.mark.parametrize("kind", ["standardize", "whiten", "none"])
def test_normalizer_logdet_is_the_log_abs_det_of_its_jacobian(float64, kind: str) -> None:
    norm = Normalizer(3, kind)
    x = _data()
    norm.fit(x)
    point = torch.tensor(x[:1])
    jac = torch.autograd.functional.jacobian(lambda v: norm(v), point).reshape(3, 3)
    assert norm.logdet.item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-12)
    if kind == "standardize":  # the closed form: -sum log sigma
        assert norm.logdet.item() == pytest.approx(-np.log(x.std(0)).sum(), abs=1e-12)
    u = norm(torch.tensor(x))
    np.testing.assert_allclose(norm.inverse(u).numpy(), x, rtol=1e-12, atol=1e-9)
    if kind == "whiten":  # whitened training data has identity covariance
        np.testing.assert_allclose(np.cov(u.numpy().T, bias=True), np.eye(3), atol=1e-6)


def test_normalizer_refuses_constant_columns() -> None:
    x = _data()
    x[:, 1] = 4.0
    with pytest.raises(ValueError, match=r"columns \[1\] are constant on the training rows"):
        Normalizer(3).fit(x)
    with pytest.raises(ValueError, match="unknown preprocess 'zscore'"):
        Normalizer(3, "zscore")


@pytest.mark.parametrize("preprocess", ["standardize", "whiten"])
def test_nll_changes_by_log_c_when_a_column_is_scaled_by_c(float64, preprocess: str) -> None:
    """Same flow parameters, data in other units (c > 0): each row's NLL moves by exactly
    sum log c."""
    x = _data(100)
    c = np.array([1.0, 1000.0, 0.01])
    a, b = _flow(3, preprocess), _flow(3, preprocess)
    a.fit_preprocessing(x)
    b.fit_preprocessing(x * c)
    with torch.no_grad():
        la = a.log_prob(torch.tensor(x[:20]))
        lb = b.log_prob(torch.tensor(x[:20] * c))
    np.testing.assert_allclose((la - lb).numpy(), np.log(np.abs(c)).sum(), atol=1e-9)


def test_log_prob_is_flow_density_plus_normalizer_logdet(float64) -> None:
    x = _data(50)
    flow = _flow(3)
    flow.fit_preprocessing(x)
    xt = torch.tensor(x[:10])
    with torch.no_grad():
        u = (xt - torch.tensor(x.mean(0))) / torch.tensor(x.std(0))
        out = CNF.to_latent(flow, u, trace="exact")  # the flow alone, without the normalizer
        inner = flow.base_log_prob(out.value) + out.logdet
        expected = inner - np.log(x.std(0)).sum()
        np.testing.assert_allclose(flow.log_prob(xt).numpy(), expected.numpy(), rtol=1e-12)


def test_density_integrates_to_one_in_original_units(float64) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 2)) * [3.0, 0.2] + [50.0, -1.0]
    flow = _flow(2, seed=1)
    flow.fit_preprocessing(x)
    # a box of +-9 standard deviations around the training mean, midpoint rule
    n = 120
    gx = 50.0 + 9 * 3.0 * ((np.arange(n) + 0.5) / n * 2 - 1)
    gy = -1.0 + 9 * 0.2 * ((np.arange(n) + 0.5) / n * 2 - 1)
    xx, yy = np.meshgrid(gx, gy)
    pts = torch.tensor(np.stack([xx.ravel(), yy.ravel()], 1))
    with torch.no_grad():
        p = flow.log_prob(pts).exp().numpy()
    total = p.sum() * (gx[1] - gx[0]) * (gy[1] - gy[0])
    assert total == pytest.approx(1.0, abs=5e-3)


def test_samples_are_in_original_units_and_round_trip(float64) -> None:
    x = _data(400)
    flow = _flow(3)
    for p in flow.parameters():
        p.data.mul_(0.1)  # near identity: samples follow the standardization
    flow.fit_preprocessing(x)
    with torch.no_grad():
        s, logp = flow.sample_and_log_prob(2000, generator=torch.Generator().manual_seed(0))
        np.testing.assert_allclose(flow.log_prob(s).numpy(), logp.numpy(), atol=1e-5)
        z = flow.to_latent(s)
        back = flow.to_data(z.value)
    np.testing.assert_allclose(back.value.numpy(), s.numpy(), rtol=1e-6)
    np.testing.assert_allclose((z.logdet + back.logdet).numpy(), 0, atol=1e-6)
    assert abs(s[:, 2].mean().item() - 500) < 10 and 20 < s[:, 2].std().item() < 80


def test_exact_trace_for_evaluation_up_to_the_bound(float64) -> None:
    dim = EXACT_EVAL_MAX_DIM  # 64: at the bound, eval-mode log_prob has no probe noise
    flow = TabularCNF(dim, hidden=(8,), solver=Solver("rk4", step_size=0.5))
    assert flow.estimator.name == "hutchinson"  # training above 8 dims
    for p in flow.parameters():  # away from the identity start, where every trace is 0
        p.data.normal_(0, 0.3)
    flow.fit_preprocessing(np.random.default_rng(0).normal(size=(30, dim)))
    flow.eval()
    x = torch.randn(4, dim)
    with torch.no_grad():
        a = flow.log_prob(x, generator=torch.Generator().manual_seed(1))
        b = flow.log_prob(x, generator=torch.Generator().manual_seed(2))
        exact = flow.log_prob(x, trace="exact")
        noisy = flow.train().log_prob(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, exact)
    assert not torch.allclose(noisy, exact)


def test_a_checkpoint_reloads_the_statistics(tmp_path) -> None:
    flow = _flow(3)
    flow.fit_preprocessing(_data())
    torch.save(flow.state_dict(), tmp_path / "s.pt")
    other = _flow(3, seed=5)
    other.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    x = torch.tensor(_data(5), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(other.log_prob(x), flow.log_prob(x))
    assert not math.isclose(other.normalizer.logdet.item(), 0.0)


@pytest.mark.parametrize("preprocess", ["standardize", "whiten"])
def test_untrained_model_is_the_gaussian_fit(float64, preprocess: str) -> None:
    from scipy.stats import multivariate_normal

    x = _data(200)
    flow = TabularCNF(
        3, preprocess=preprocess, hidden=(8,), solver=Solver("rk4", step_size=0.5)
    ).eval()
    flow.fit_preprocessing(x)
    cov = np.cov(x.T, bias=True) if preprocess == "whiten" else np.diag(x.var(0))
    expected = multivariate_normal(x.mean(0), cov).logpdf(x[:20])
    with torch.no_grad():
        np.testing.assert_allclose(
            flow.log_prob(torch.tensor(x[:20])).numpy(), expected, rtol=1e-10
        )


def test_sizing_a_model_imports_no_compiler() -> None:
    """Every command sizes its model on the meta device before building it (model_shapes).
    There, torch.eye and torch.linspace import torch._dynamo, a CPU second for a command that
    trains nothing (training's optimizer imports it anyway): the table normalizer and the
    U-Net's time embedding avoid both."""
    code = """
import sys
from cnf.data import get_dataset
from cnf.model_config import model_shapes
from cnf.training import TrainConfig
for name in ("wine", "digits"):
    cfg = TrainConfig.for_data(name, seed=0)
    shapes = model_shapes(cfg.model, get_dataset(name, seed=0).meta())
    assert shapes, name
assert "torch._dynamo" not in sys.modules, "model_shapes imported torch._dynamo"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
