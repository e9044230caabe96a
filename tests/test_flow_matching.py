"""Flow matching against mathematics: the closed-form optimal field of Gaussian data, the exact
optimal-transport coupling, the model contract of an FM-trained CNF, and exact resumes."""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import config
from torch import nn

from cnf import CNF, Solver
from cnf.cli import main
from cnf.runs import load_run
from cnf.training import FlowMatching, Phases, TrainState, fit, train
from cnf.training.objectives import MaximumLikelihood, ot_pairing

MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
SIGMA = torch.tensor([[2.0, 0.6], [0.6, 0.5]], dtype=torch.float64)


def _moments(s, sigma_min: float, T: float):
    """For x ~ N(MU, SIGMA), z ~ N(0, I), x_s = a z + b x, u = (c z - x) / T, at path times ``s``
    (a number, or a tensor of shape (n,)): the mean and covariance of x_s, Cov(u, x_s) and
    Cov(u), each with a leading axis of len(s)."""
    s = torch.as_tensor(s, dtype=torch.float64).reshape(-1, 1, 1)
    a, b, c = sigma_min + (1 - sigma_min) * s, 1 - s, 1 - sigma_min
    eye = torch.eye(2, dtype=torch.float64)
    cov_x = a**2 * eye + b**2 * SIGMA
    cross = (c * a * eye - b * SIGMA) / T
    cov_u = (c**2 * eye + SIGMA) / T**2
    return b[:, :, 0] * MU, cov_x, cross, cov_u.expand_as(cov_x)


class OptimalField(nn.Module):
    """The minimizer of the flow-matching loss for Gaussian data: v*(t, x) = E[u | x_s = x]
    = -MU / T + Cov(u, x_s) Cov(x_s)^-1 (x - E x_s), per sample time."""

    def __init__(self, sigma_min: float, T: float, scale: float = 1.0) -> None:
        super().__init__()
        self.sigma_min, self.T, self.scale = sigma_min, T, scale
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = t.reshape(-1).expand(len(x)).double() / self.T
        mean, cov_x, cross, _ = _moments(s, self.sigma_min, self.T)
        solved = torch.linalg.solve(cov_x, (x.double() - mean)[..., None])
        v = -MU / self.T + (cross @ solved)[..., 0]
        return (self.scale * v).to(x) + 0 * self.dummy


def _optimal_loss(sigma_min: float, T: float) -> float:
    """E_s [tr(Cov(u) - C Cov(x_s)^-1 C^T)] / D: the loss at the optimum, by Gauss-Legendre."""
    nodes, weights = np.polynomial.legendre.leggauss(64)
    total = 0.0
    for node, weight in zip((nodes + 1) / 2, weights / 2, strict=True):
        _, cov_x, cross, cov_u = (m[0] for m in _moments(float(node), sigma_min, T))
        total += weight * float(torch.trace(cov_u - cross @ torch.linalg.solve(cov_x, cross.T)))
    return total / 2


def _gaussian(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    L = torch.linalg.cholesky(SIGMA)
    return MU + torch.randn(n, 2, generator=g, dtype=torch.float64) @ L.T


@pytest.mark.parametrize(("sigma_min", "T"), [(0.0, 1.0), (0.1, 1.0), (0.0, 2.0)])
def test_the_loss_at_the_closed_form_optimum(sigma_min: float, T: float) -> None:
    objective = FlowMatching(sigma_min=sigma_min)
    x = _gaussian(200_000, 0)

    def loss(scale: float) -> float:
        flow = CNF(2, OptimalField(sigma_min, T, scale), T=T).double()
        return float(objective.loss(flow, x, torch.Generator().manual_seed(1))[0].detach())

    expected = _optimal_loss(sigma_min, T)
    assert loss(1.0) == pytest.approx(expected, rel=0.01)  # Monte Carlo: 200,000 pairs
    assert loss(1.2) > loss(1.0) and loss(0.8) > loss(1.0)  # and it is the minimum


def test_a_trained_field_is_the_optimal_one_and_a_density() -> None:
    torch.set_num_threads(1)  # as the trainer runs small models (conftest restores it)
    data = _Data(_gaussian(8000, 2).float())
    flow = CNF(2, hidden=(64, 64), solver=Solver("dopri5", atol=1e-6, rtol=1e-6))
    cfg = config(iters=2500, batch_size=512, lr=3e-3, eval_every=10**6)
    state = TrainState.create(flow, lr=cfg.lr, weight_decay=0.0, iters=cfg.iters,
                              schedule="cosine")  # fmt: skip
    fit(state, data, FlowMatching(), cfg, progress=False, quiet=True)
    optimal = OptimalField(0.0, 1.0)
    for s in (0.2, 0.5, 0.8):
        x = ((1 - s) * _gaussian(2000, 3) + s * torch.randn(2000, 2, dtype=torch.float64)).float()
        t = torch.full((2000,), s)
        with torch.no_grad():
            error = (flow.field(t, x) - optimal(t, x)).norm(dim=1).mean()
            scale = optimal(t, x).norm(dim=1).mean()
        assert error < 0.1 * scale, (s, float(error), float(scale))
    # and the trained CNF is a density: its NLL is the data's entropy, plus a small KL
    entropy = 0.5 * math.log(torch.linalg.det(2 * math.pi * math.e * SIGMA).item())
    with torch.no_grad():
        nll = -flow.eval().log_prob(_gaussian(4000, 4).float()).double().mean().item()
    assert entropy - 0.05 <= nll < entropy + 0.05  # 4000 samples: SE about 0.02


class _Data:
    """A dataset of fixed rows: random batches per iteration, no validation set."""

    name, kind = "gaussian", "toy"
    event_shape = (2,)

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def train_batch(self, batch_size: int, iteration: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(iteration)
        return self.x[torch.randint(len(self.x), (batch_size,), generator=g)]

    def validation(self) -> torch.Tensor:
        return self.x[:0]


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_the_ot_coupling_is_the_best_permutation(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x, z = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
    cost = lambda p: float((x - z[list(p)]).square().sum())  # noqa: E731
    best = min(itertools.permutations(range(n)), key=cost)
    assert cost(ot_pairing(x, z).tolist()) == pytest.approx(cost(best))
    assert sorted(ot_pairing(x, z).tolist()) == list(range(n))  # a permutation


@pytest.fixture(scope="module")
def fm_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fm") / "run"
    cfg = config(data="8gaussians", objective="fm", coupling="ot", iters=600, batch_size=256,
                 lr=3e-3, eval_every=300, test_size=1000, validity_size=300,
                 hidden=(32, 32))  # fmt: skip
    train(cfg, out, progress=False)
    return out


def test_an_fm_model_keeps_the_model_contract(fm_run: Path, tmp_path: Path) -> None:
    run = load_run(fm_run)
    model = run.model
    x = torch.as_tensor(run.dataset().test(200), dtype=torch.float32)
    with torch.no_grad():
        logp = model.log_prob(x)
        samples, logq = model.sample_and_log_prob(50)
        z = model.to_latent(x).value
        back = model.to_data(z).value
    assert logp.shape == (200,) and samples.shape == (50, 2) and logq.shape == (50,)
    assert (back - x).norm(dim=1).max() < 1e-3  # x -> z -> x with the evaluation solver
    again = load_run(fm_run)  # save/load round trip
    with torch.no_grad():
        torch.testing.assert_close(again.model.log_prob(x), logp)
    g = torch.linspace(-4.5, 4.5, 121)  # the density integrates to one
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    with torch.no_grad():
        p = model.log_prob(torch.stack([xx.ravel(), yy.ravel()], 1)).exp()
    assert float(p.sum() * (g[1] - g[0]) ** 2) == pytest.approx(1.0, abs=0.03)


def test_flow_matching_from_the_command_line(fm_run: Path, tmp_path: Path, capsys) -> None:
    import json

    report = json.loads((fm_run / "report.json").read_text())
    assert report["validity"]["valid"] and report["kl"] < 1.0  # untrained: about 3 nats
    rows = [json.loads(line) for line in (fm_run / "log.jsonl").read_text().splitlines()]
    assert rows[0]["nfe"] == 1 and "fm_loss" in rows[0] and "val_nll" in rows[299]
    flags = ["--data", "8gaussians", "--out", str(tmp_path / "x"), "--no-progress"]
    for extra, word in (
        (["--objective", "mle", "--coupling", "ot"], "--coupling is an option of flow matching"),
        (["--objective", "fm", "--learn-T"], "--learn-T has no meaning for flow matching"),
        (["--objective", "sde"], "--objective 'sde' is unknown"),
    ):
        assert main(["train", *flags, *extra]) == 1
        assert word in capsys.readouterr().err
    digits = ["train", *flags[:1], "digits", *flags[2:], "--objective", "fm", "--scales", "2"]
    assert main(digits) == 1  # the image preset of flow matching has one scale
    assert "flow matching trains one CNF block" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # each refused before the run directory was made


def test_fm_then_mle_starts_the_mle_phase_at_the_largest_valid_step(tmp_path: Path) -> None:
    import json

    cfg = config(data="8gaussians", objective="fm", iters=300, finetune_iters=60,
                 finetune_lr=1e-3, batch_size=128, eval_every=120, test_size=300,
                 validity_size=200, hidden=(16, 16), adapt_every=25)  # fmt: skip
    objective = cfg.make_objective()
    assert isinstance(objective, Phases) and objective.name == "fm+mle"
    assert isinstance(objective.at(300), FlowMatching)
    assert isinstance(objective.at(301), MaximumLikelihood)
    train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["objective"] for r in rows[299:301]] == ["fm", "mle"]
    [start] = rows[300]["adapt"]  # the log's list of the row's step-size checks
    assert start["event"] == "start" and rows[300]["nfe"] > 1
    assert rows[300]["lr"] == pytest.approx(1e-3, rel=1e-3)  # the schedule starts again
    assert rows[-1]["lr"] == pytest.approx(1e-5)
    # the adapter checks 1, 2, 4, 8 and 16 iterations into the phase, then every 25
    checked = [r["iter"] for r in rows[300:] if "adapt" in r]
    assert checked == [301, 302, 303, 305, 309, 317, 325, 350]
    assert (objective.begins(300), objective.begins(301), objective.begins(360)) == (1, 301, 301)


@pytest.mark.parametrize("adapt_size", [0, 16])
def test_adapt_size_limits_the_rows_each_step_check_scores(tmp_path: Path, monkeypatch,
                                                           adapt_size: int) -> None:  # fmt: skip
    import cnf.training.objectives as objectives

    scored = []
    real = objectives.batch_nll_metric

    def spy(model, x, *args, **kwargs):
        scored.append(len(x))
        return real(model, x, *args, **kwargs)

    monkeypatch.setattr(objectives, "batch_nll_metric", spy)
    cfg = config(data="8gaussians", objective="fm", iters=20, finetune_iters=6, batch_size=64,
                 eval_every=100, test_size=100, validity_size=50, hidden=(8,), adapt_every=3,
                 adapt_size=adapt_size)  # fmt: skip
    train(cfg, tmp_path / "run", progress=False)
    # the switch's search at 21, then checks at 21 and 24 (every 3) and 22, 23, 25 (1, 2, 4 in)
    assert len(scored) >= 5
    assert set(scored) == {adapt_size or 64}


def test_adapt_size_must_be_a_count() -> None:
    from cnf.options import ConfigError

    with pytest.raises(ConfigError, match="adapt_size"):
        config(data="8gaussians", adapt_size=-1)
