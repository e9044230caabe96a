"""Solver validity (cnf.validity) and step adaptation (cnf.adaptation), Ott et al. 2021."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SMALL, LinearField, config
from torch import Tensor

from cnf import CNF, Solver, viz
from cnf.adaptation import StepAdapter, checking_solver, hairer_initial_step, initial_step
from cnf.cli import main
from cnf.data import get_dataset
from cnf.report import report
from cnf.table_flow import TabularCNF
from cnf.training import train
from cnf.validity import decide, solver_validity


def _decay(t, y):
    return -y


@pytest.mark.parametrize("order", [1, 2, 4])
def test_hairer_initial_step_by_hand_for_decay(order: int) -> None:
    # y' = -y, y0 = 2, rtol = 1e-3, atol = 1e-6: sc = 0.002001
    sc = 1e-6 + 2 * 1e-3
    d0 = d1 = 2 / sc  # ||y0/sc||, ||f0/sc||
    h0 = 0.01 * d0 / d1  # = 0.01
    y1 = 2 - h0 * 2
    d2 = abs((-y1 + 2) / sc) / h0
    h1 = (0.01 / max(d1, d2)) ** (1 / (order + 1))
    expected = min(100 * h0, h1)
    got = hairer_initial_step(_decay, 0.0, torch.tensor([2.0], dtype=torch.float64), order,
                              rtol=1e-3, atol=1e-6)  # fmt: skip
    assert got == pytest.approx(expected, rel=1e-12)
    assert got == pytest.approx((0.01 / 999.5002498750625) ** (1 / (order + 1)), rel=1e-9)


def test_hairer_initial_step_degenerate_branches() -> None:
    # y0 = 0: d0 = d1 = 0 -> h0 = 1e-6; f is 0 along the Euler step -> h1 = max(1e-6, 1e-9)
    assert hairer_initial_step(_decay, 0.0, torch.zeros(3), 4) == pytest.approx(1e-6)
    # order enters as the (p+1)-th root: rtol=0, atol=1e-3, y0=1 gives h0=0.01, d1=d2=1000
    y0 = torch.ones(1, dtype=torch.float64)
    assert hairer_initial_step(_decay, 0.0, y0, 1, rtol=0.0, atol=1e-3) == pytest.approx(1e-5**0.5)
    assert hairer_initial_step(_decay, 0.0, y0, 4, rtol=0.0, atol=1e-3) == pytest.approx(0.1)


def test_checking_solvers() -> None:
    assert checking_solver(Solver("euler", step_size=0.2)) == Solver("midpoint", step_size=0.1)
    assert checking_solver(Solver("midpoint", step_size=0.2)) == Solver("rk4", step_size=0.1)
    assert checking_solver(Solver("rk4", step_size=0.2), tight=1e-7) == Solver(
        "dopri5", atol=1e-7, rtol=1e-7
    )
    fine = checking_solver(Solver("dopri5", atol=1e-4, rtol=1e-3))
    assert (fine.method, fine.atol, fine.rtol) == (
        "dopri5",
        pytest.approx(1e-5),
        pytest.approx(1e-4),
    )


class _Metric:
    """A mocked metric: the NLL error of a solver is err(step or tol); the test solver is exact."""

    def __init__(self, err) -> None:
        self.err, self.calls = err, []

    def __call__(self, solver: Solver) -> float:
        self.calls.append(solver)
        exact = (solver.method == "dopri5" and solver.atol < 1e-5) or solver.method == "midpoint"
        key = solver.step_size if solver.fixed_step else solver.atol
        return 3.0 if exact else 3.0 + self.err(key)


def test_adapter_shrinks_on_disagreement() -> None:
    metric = _Metric(lambda h: 0.5)
    solver, record = StepAdapter(threshold=0.02).adapt(Solver("euler", step_size=0.2), metric)
    assert record["event"] == "shrink" and record["gap"] == pytest.approx(0.5)
    assert solver == Solver("euler", step_size=0.1)
    assert metric.calls[0] == Solver("midpoint", step_size=0.1)  # euler is checked by midpoint


def test_adapter_grows_when_the_larger_step_still_agrees() -> None:
    metric = _Metric(lambda h: 0.01 * h)
    solver, record = StepAdapter(threshold=0.02).adapt(Solver("euler", step_size=0.2), metric)
    assert record["event"] == "grow"
    assert solver.step_size == pytest.approx(0.22)


def test_adapter_reverts_when_the_larger_step_disagrees() -> None:
    metric = _Metric(lambda h: 0.0 if h < 0.21 else 1.0)
    solver, record = StepAdapter(threshold=0.02).adapt(Solver("euler", step_size=0.2), metric)
    assert record["event"] == "revert" and record["trial_gap"] == pytest.approx(1.0)
    assert solver == Solver("euler", step_size=0.2)
    assert [s.step_size for s in metric.calls] == [0.1, 0.2, pytest.approx(0.22)]


def test_adapter_respects_the_step_bounds() -> None:
    adapter = StepAdapter(threshold=0.02, T=1.0, max_steps=500)
    solver, record = adapter.adapt(Solver("euler", step_size=0.0025), _Metric(lambda h: 1.0))
    assert record["event"] == "shrink" and solver.step_size == pytest.approx(1 / 500)
    solver, _ = adapter.adapt(solver, _Metric(lambda h: 1.0))
    assert solver.step_size == pytest.approx(1 / 500)  # never more than max_steps steps
    big, _ = adapter.adapt(Solver("euler", step_size=0.95), _Metric(lambda h: 0.0))
    assert big.step_size == 1.0  # never more than T


@pytest.mark.parametrize(
    ("err", "event", "factor"),
    [(lambda tol: 1.0, "shrink", 0.5), (lambda tol: 0.0, "grow", 1.1),
     (lambda tol: 0.0 if tol < 1e-4 else 1.0, "revert", 1.0)],
)  # fmt: skip
def test_adapter_on_tolerances(err, event: str, factor: float) -> None:
    metric = _Metric(err)
    start = Solver("dopri5", atol=0.95e-4, rtol=0.95e-4)
    solver, record = StepAdapter(threshold=0.02).adapt(start, metric)
    assert record["event"] == event
    assert solver.atol == pytest.approx(0.95e-4 * factor)
    assert solver.rtol == pytest.approx(0.95e-4 * factor)
    assert metric.calls[0].atol == pytest.approx(0.95e-5)  # checked at a tenth of the tolerance


def _rotating_flow(**solver) -> CNF:
    A = torch.tensor([[-1.0, 3.0], [-3.0, -1.0]])  # log-det T tr A = -2; euler gets it wrong
    return CNF(
        2, LinearField(A), trace="exact", eval_solver=Solver(**solver), solver=Solver(**solver)
    )


def test_coarse_euler_is_invalid_and_a_fine_step_is_valid(float64) -> None:
    x = torch.randn(200, 2)
    coarse = solver_validity(_rotating_flow(method="euler", step_size=0.5), x)
    fine = solver_validity(_rotating_flow(method="euler", step_size=1 / 2000), x)
    assert not coarse.valid and coarse.delta_nats_per_dim > 0.1
    assert fine.valid and abs(fine.delta_nats_per_dim) < 0.01
    # two euler steps move z by M = (I + A/2)^2 but integrate the (constant) trace exactly, so
    # the coarse "flow" pairs z = M x with log-det tr A, not log|det M|: it is not a flow, and
    # the exact one is expm(A) with log-det tr A. The NLL gap is known in closed form.
    A = torch.tensor([[-1.0, 3.0], [-3.0, -1.0]])
    M = torch.linalg.matrix_power(torch.eye(2) + A / 2, 2)
    base = CNF(2, LinearField(A)).base_log_prob
    logp_euler = base(x @ M.T) + torch.trace(A)
    logp_exact = base(x @ torch.linalg.matrix_exp(A).T) + torch.trace(A)
    assert coarse.delta_nll == pytest.approx(float((logp_exact - logp_euler).mean()), abs=1e-6)
    assert coarse.train.recon_max > 0.1 and coarse.reference.recon_max < 1e-6
    assert fine.train.nfe == 2000 and coarse.train.nfe == 2
    assert coarse.reference.solver == "dopri5(atol=1e-08, rtol=1e-08)"


def test_same_probes_across_solvers(float64) -> None:
    """With Hutchinson, solver error must not be mixed with estimator noise: two accurate
    solvers agree to solver precision although each estimate is noisy."""
    flow = CNF(3, hidden=(16,), trace="hutchinson", solver=Solver("dopri5", atol=1e-9, rtol=1e-9))
    x = torch.randn(100, 3)
    report = solver_validity(flow, x)
    assert abs(report.delta_nll) < 1e-6 and report.se < 1e-6
    flow.eval()
    with torch.no_grad():
        a = flow.log_prob(x, generator=torch.Generator().manual_seed(1))
        b = flow.log_prob(x, generator=torch.Generator().manual_seed(2))
    assert (a - b).abs().mean() > 1e-3  # the estimator itself is noisy


def test_report_keys_and_types(float64) -> None:
    report = solver_validity(_rotating_flow(method="rk4", step_size=0.25), torch.randn(50, 2))
    d = report.to_dict()
    assert isinstance(d["delta_nll"], float) and isinstance(d["valid"], bool)
    assert isinstance(d["delta_nats_per_dim"], float) and isinstance(d["delta_bits_per_dim"], float)
    assert d["delta_bits_per_dim"] == pytest.approx(d["delta_nats_per_dim"] / math.log(2))
    for which in ("train", "reference"):
        assert set(d["recon_error"][which]) == {"mean", "max"}
        assert all(isinstance(v, float) for v in d["recon_error"][which].values())
    for which in ("train", "finer", "reference"):
        assert set(d[which]) == {"solver", "nll", "nfe", "recon_mean", "recon_max"}
        assert isinstance(d[which]["nfe"], int)
    assert d["finer"]["solver"] == "rk4(h=0.125)" and d["threshold"] >= 0.02
    json.dumps(d)  # plain data
    assert report.summary().startswith(("VALID", "INVALID", "UNDECIDED"))


def test_training_adapts_the_step_and_reports_validity(tmp_path: Path) -> None:
    small = {**SMALL, "iters": 20, "eval_every": 20, "method": "euler", "step_size": 0.5}
    cfg = config(data="8gaussians", **small, adapt_every=5, adapt_threshold=1e-12)
    result = train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r["step_size"] for r in rows]
    assert steps[0] == 0.5 and steps[-1] == pytest.approx(0.5 / 16)  # 4 checks, all shrink
    assert [c["event"] for r in rows for c in r.get("adapt", [])] == ["shrink"] * 4
    assert {"delta_nll", "recon_error", "valid"} <= result.report["validity"].keys()
    assert tmp_path / "run" / "solver.png" in viz.plot_run(tmp_path / "run", data=result.data)


def test_hairer_starts_fixed_step_training(tmp_path: Path) -> None:
    cfg = config(data="8gaussians", **{**SMALL, "step_size": None}, adapt=False)
    train(cfg, tmp_path / "run", progress=False)
    first = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert 1 / 500 <= first["step_size"] < 1.0 and first["step_size"] != 1 / 8


def test_initial_step_of_a_zero_field_is_T_over_8_and_uses_normalized_coordinates(float64) -> None:
    x = torch.randn(200, 3, dtype=torch.float64) * torch.tensor([1.0, 50.0, 1000.0]) + 7.0
    flow = TabularCNF(3, hidden=(8,), T=2.0, solver=Solver("rk4", step_size=0.5)).double()
    flow.fit_preprocessing(x)
    assert initial_step(flow, x, 4, rtol=1e-5, atol=1e-5) == pytest.approx(2.0 / 8)
    for p in flow.field.layers[-1].parameters():  # a field that moves: Hairer's rule
        torch.nn.init.normal_(p)
    u = flow.normalizer(x)

    def f(t: float, y: Tensor) -> Tensor:
        return flow.estimator(
            flow.field, torch.tensor(t, dtype=y.dtype), y, flow.estimator.probe(y)
        ).value

    with torch.no_grad():
        expected = hairer_initial_step(f, 0.0, u, 4, rtol=1e-5, atol=1e-5)
    got = initial_step(flow, x, 4, rtol=1e-5, atol=1e-5)
    assert got == pytest.approx(expected) and got != pytest.approx(2.0 / 8)


def test_eval_validity_json(tmp_path: Path, capsys) -> None:
    train(config(data="8gaussians", **SMALL), tmp_path / "run", progress=False)
    assert main(["eval", str(tmp_path / "run"), "--n", "300", "--json", "--validity"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"delta_nll", "recon_error", "valid"} <= result["validity"].keys()


def _noisy_sample() -> torch.Tensor:
    """Four points, one far out: the NLL gap of a coarse euler is small on the near ones and
    large on the far one, so its standard error is larger than its mean."""
    return torch.tensor([[0.1, 0.0], [0.0, 0.1], [-0.1, 0.0], [3.0, 0.0]])


def test_noise_never_turns_a_failure_into_a_pass(float64) -> None:
    flow = _rotating_flow(method="euler", step_size=0.02)
    small = solver_validity(flow, _noisy_sample())
    # 0.01 nats/dim missed, within 2 SE: the old rule (pass within max(tol, 2 SE)) said VALID
    assert small.threshold < abs(small.delta_nll) <= 2 * small.se
    assert small.verdict == "UNDECIDED" and not small.valid and small.n == 4
    assert "UNDECIDED" in small.summary() and "more points" in small.summary()
    # with more points to draw on, the check grows its sample until it can decide
    pool = torch.cat([_noisy_sample(), torch.randn(4000, 2)])
    grown = solver_validity(flow, pool, start=4)
    assert grown.verdict == "INVALID" and 4 < grown.n <= len(pool)
    low = grown.interval[0]
    assert low > grown.threshold  # the whole interval is outside the tolerance


def test_a_fine_solver_is_valid_on_a_few_points(float64) -> None:
    report = solver_validity(_rotating_flow(method="rk4", step_size=0.01), _noisy_sample())
    assert report.verdict == "VALID" and report.n == 4  # decided at the first look


@pytest.mark.parametrize(
    ("delta", "se", "n", "verdict"),
    [(0.0, 0.001, 100, "VALID"), (0.019, 0.0004, 100, "VALID"), (0.019, 0.001, 100, "UNDECIDED"),
     (-0.05, 0.01, 100, "INVALID"), (-0.05, 0.02, 100, "UNDECIDED"), (0.0, 0.0, 1, "UNDECIDED"),
     (0.3, math.nan, 5, "UNDECIDED")],
)  # fmt: skip
def test_the_verdict_needs_the_interval_on_one_side(delta, se, n, verdict) -> None:
    assert decide(delta, se, n, 0.02) == verdict


def test_the_report_checks_validity_on_its_own_sample_whatever_n(float64) -> None:
    data = get_dataset("8gaussians")
    flow = _rotating_flow(method="rk4", step_size=0.25)
    result = report(flow, data, n=20, validity_n=300)  # cnf eval --n 20 --validity
    assert result.evaluation.n == 20 and result.validity.n >= 300
