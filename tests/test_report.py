"""The report priced by what it must say: a test NLL drawn until its standard error, under the
loosest evaluation solver that agrees with the float64 reference, each phase's CPU seconds; the
validation NLL's looser solver; a budget that prices the whole command."""

import json
import math
import time

import pytest
import torch
from conftest import config

from cnf import CNF
from cnf.data import get_dataset
from cnf.evaluate import evaluate, log_probs
from cnf.report import AGREEMENT, SE, candidates, report, reported_solver
from cnf.solvers import Solver
from cnf.validity import loosest_agreeing, solver_validity


def flow(seed: int = 0) -> CNF:
    torch.manual_seed(seed)
    model = CNF(2, hidden=(16, 16), eval_solver=Solver("dopri5", atol=1e-7, rtol=1e-7))
    with torch.no_grad():  # a field that bends the density, so that tolerances matter
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


def points(n: int) -> torch.Tensor:
    return torch.as_tensor(get_dataset("8gaussians").test(n), dtype=torch.float32) / 2


def test_the_test_nll_stops_at_its_standard_error_on_the_rows_it_scored() -> None:
    model, x = flow(), points(6000)
    fixed = Solver("rk4", step_size=0.1)  # an adaptive step would depend on the batch
    full = evaluate(model, x, solver=fixed)
    target = 2.5 * full.nll_se  # needs roughly a sixth of the rows
    part = evaluate(model, x, solver=fixed, se=target, least=500)
    assert 500 <= part.n < len(x) and part.nll_se <= target
    # the exact trace has no probes: the rows scored have the numbers of any other evaluation
    same = log_probs(model, x[: part.n], solver=fixed)[0]
    assert part.nll == pytest.approx(-float(same.mean()), abs=1e-9)
    assert evaluate(model, x[:700], se=1e-9, least=500).n == 700  # capped by the rows there are


def test_the_evaluation_solver_is_the_loosest_that_agrees_with_the_reference() -> None:
    model, x = flow(), points(400)
    check = solver_validity(model, x, solver=model.eval_solver, seed=0)
    tried_all = candidates(model.eval_solver)
    assert [s.atol for s in tried_all] == [1e-4, 1e-5, 1e-6]
    chosen, tried = loosest_agreeing(model, x, check, tried_all, tolerance=1.0)
    assert chosen == tried_all[0] and len(tried) == 1 and tried[0].agrees
    chosen, tried = loosest_agreeing(model, x, check, tried_all, tolerance=1e-12)
    assert chosen is None and [t.agrees for t in tried] == [False] * 3
    # an agreement is measured, not assumed: the loosest's error is a real, nonzero number
    reference = -check.reference_logp.mean()
    loose = -log_probs(model, x, solver=tried_all[0])[0].mean()
    assert tried[0].delta == pytest.approx(float(loose - reference), abs=1e-3)
    assert abs(tried[0].delta) > abs(tried[2].delta) > 0


def test_a_report_says_what_it_cost_and_which_solver_it_used(tmp_path) -> None:
    model, data = flow(), get_dataset("8gaussians")
    made = report(model, data, n=4000, validity_n=300, se=0.05)
    out = made.to_dict()
    assert set(out["cost"]) == {"validity check", "evaluation solver", "test NLL"}
    assert all(v >= 0 for v in out["cost"].values())
    used = Solver(**out["evaluation_solver"])
    agreed = [c for c in out["solver_choice"] if c["agrees"]]
    assert used.describe() == out["solver"] == (agreed[0]["solver"] if agreed else
                                                 model.eval_solver.describe())  # fmt: skip
    assert out["n"] < 4000 and out["nll_se"] <= 0.05
    assert "report:" in made.summary("8gaussians") and AGREEMENT * SE < 0.01
    # the figures use the report's solver, for the checkpoint it was made from only
    (tmp_path / "report.json").write_text(json.dumps({"iteration": 7, **out}))
    assert reported_solver(tmp_path, 7) == used
    assert reported_solver(tmp_path, 8) is None
    (tmp_path / "report.json").write_text(json.dumps({"iteration": 7, "evaluation_solver": 3}))
    assert reported_solver(tmp_path, 7) is None


def test_a_report_without_a_validity_check_keeps_the_evaluation_solver() -> None:
    model = flow()
    made = report(model, get_dataset("8gaussians"), n=1000, validity_n=None)
    assert made.solver == model.eval_solver and made.tried == [] and made.evaluation.n == 1000


def test_validation_solves_at_val_tol_and_records_its_cost(tmp_path) -> None:
    from cnf.training import train

    cfg = config(data="8gaussians", iters=4, eval_every=2, hidden=(8,), batch_size=32,
                 test_size=300, validity_size=100, val_tol=1e-3)  # fmt: skip
    train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    evaluated = [r for r in rows if "val_nll" in r]
    assert [r["iter"] for r in evaluated] == [2, 4] and all(r["val_cpu"] > 0 for r in evaluated)
    from cnf.training.validation import validation_solver

    loose = validation_solver(Solver("dopri5", atol=1e-7, rtol=1e-7), 1e-3)
    assert (loose.atol, loose.rtol) == (1e-3, 1e-3)
    assert validation_solver(Solver("dopri5", atol=1e-7, rtol=1e-7), 0).atol == 1e-7
    assert validation_solver(Solver("rk4", step_size=0.1), 1e-3).step_size == 0.1


def test_eval_every_zero_is_a_twentieth_of_the_run() -> None:
    assert config(iters=1000, eval_every=0).evaluation_interval == 50
    assert config(iters=7, eval_every=0).evaluation_interval == 1
    assert config(iters=1000).evaluation_interval == 250


def test_a_whole_budget_prices_validation_and_the_report_before_training() -> None:
    from cnf.training import budget as budgeting
    from cnf.training import setup

    flat = dict(data="8gaussians", objective="fm", hidden=(16, 16), batch_size=64, budget=20.0,
                eval_every=0)  # fmt: skip
    alone, plan_alone = budgeting.plan(config(**flat), setup(config(**flat)))
    whole, plan = budgeting.plan(config(**flat), setup(config(**flat)), whole=True, spent=5.0)
    assert plan_alone.others == {} and set(plan.others) == {"setup and timing", "validation",
                                                             "report"}  # fmt: skip
    assert plan.others["setup and timing"] >= 5.0
    trained = 20.0 - sum(plan.others.values())
    share = config(**flat).budget_share  # the maximum-likelihood phase's
    assert whole.iters == max(1, round((1 - share) * trained / plan.seconds_per_iter))
    # the training's budget alone is all 20 s (each plan times its own iterations: the two
    # timings differ on a busy machine, so each is checked against its own)
    assert alone.iters == max(1, round((1 - share) * 20.0 / plan_alone.seconds_per_iter))
    for cfg in (alone, whole):  # validation as often as a twentieth of the budget pays for
        assert 1 <= math.ceil(cfg.total_iters / cfg.eval_every) <= 20
    short, made = budgeting.plan(config(**{**flat, "budget": 0.5}),
                                 setup(config(**{**flat, "budget": 0.5})), whole=True,
                                 spent=5.0)  # fmt: skip
    assert short.iters == 1 and "give a larger --budget" in made.describe()


def test_a_whole_budget_prices_a_fixed_validation_interval_into_each_iteration(
    monkeypatch,
) -> None:
    """With --eval-every N the validation NLLs grow with the iterations: the plan's training,
    its validations and the rest fill the budget, however many validations that makes (a
    fixed count of 20 let `--objective fm --budget 120` spend 1.23 times its budget)."""
    from cnf.training import budget as budgeting
    from cnf.training import setup

    seconds = {"fm": 0.01, "mle": 0.1}  # an iteration's, as if timed
    monkeypatch.setattr(
        budgeting, "_time", lambda probe, objective, cfg, n: seconds[objective.name]
    )
    monkeypatch.setattr(budgeting, "_time_validation", lambda probe, cfg: (0.5, 1e-4, None))
    flat = dict(data="8gaussians", objective="fm", hidden=(16, 16), batch_size=64, budget=100.0,
                eval_every=50, finetune_iters=1)  # fmt: skip
    planned, plan = budgeting.plan(config(**flat), setup(config(**flat)), whole=True, spent=2.0)
    assert planned.eval_every == plan.eval_every == 50
    evaluations = math.ceil(planned.total_iters / 50)
    assert evaluations > 20  # more than a fixed count would have priced
    assert plan.others["validation"] == pytest.approx(evaluations * 0.5)
    assert plan.others["report"] == pytest.approx(budgeting.REPORT_SOLVES["toy"] * 1e-4)
    assert plan.finetune_iters > 0
    assert plan.seconds_per_iter == seconds["fm"]
    mle = plan.seconds_per_finetune_iter  # the timed one, times the cost of a sharpening field
    assert mle == seconds["mle"] * budgeting.MLE_COST_AFTER_FM
    training = plan.iters * seconds["fm"] + plan.finetune_iters * mle
    spent = training + sum(plan.others.values())  # the whole command, as planned
    assert abs(spent - 100.0) <= 0.5 + mle  # to within a validation and an iteration
    assert plan.deadline == pytest.approx(100.0 - sum(plan.others.values()))
    assert plan.deadline == pytest.approx(training, abs=0.5 + mle)


def test_a_tables_report_is_planned_from_its_test_split(monkeypatch) -> None:
    """A table's report solves its test split a few times (wine's: 18 rows), not the 10,000 rows
    a toy's draws: priced as 10,000 rows, wine's was planned at 12 CPU s, took 1.4, and a
    --budget 30 run ended at 15 CPU s."""
    from cnf.training import budget as budgeting
    from cnf.training import setup

    solved = []  # the rows of each solve the timing makes
    real = budgeting.evaluate

    def evaluate(model, x, **kwargs):
        solved.append(len(x))
        return real(model, x, **kwargs)

    monkeypatch.setattr(budgeting, "evaluate", evaluate)
    flat = dict(data="wine", hidden=(16,), budget=20.0, test_fraction=0.2)
    run = setup(config(**flat))
    t_split = budgeting._time_validation(budgeting._Probe(run), run.cfg)[2]
    assert len(run.data.test()) == 36 != len(run.data.validation())
    assert 36 in solved and t_split is not None and t_split > 0
    toy = setup(config(data="8gaussians", hidden=(16,), budget=20.0))
    assert budgeting._time_validation(budgeting._Probe(toy), toy.cfg)[2] is None

    # the plan: the cheaper of a split's solves and REPORT_SOLVES rows (as if timed)
    monkeypatch.setattr(budgeting, "_time", lambda probe, objective, cfg, n: 0.01)
    for kind, timings, planned in (
        ("wine", (0.05, 1e-3, 0.05), budgeting.REPORT_SPLIT_SOLVES * 0.05 + budgeting.FIGURES_S),
        ("wine", (0.05, 1e-5, 0.05), budgeting.REPORT_SOLVES["tabular"] * 1e-5),  # a large split
        ("8gaussians", (0.05, 1e-3, None), budgeting.REPORT_SOLVES["toy"] * 1e-3),
    ):
        monkeypatch.setattr(budgeting, "_time_validation", lambda probe, cfg, t=timings: t)
        cfg = config(data=kind, hidden=(16,), budget=100.0)
        _, plan = budgeting.plan(cfg, setup(cfg), whole=True)
        assert plan.others["report"] == pytest.approx(planned)


def test_a_budget_run_goes_on_from_its_timed_iterations() -> None:
    """The timing's flow-matching iterations are the run's first: trained on its own state (the
    same weights as stepping a fresh run through the same batches), logged, and counted in the
    planned iterations, which go on from them."""
    from cnf.runtime import to_tensors
    from cnf.training import budget as budgeting
    from cnf.training import setup
    from cnf.training.loop import step

    flat = dict(data="8gaussians", objective="fm", hidden=(16, 16), batch_size=64, budget=20.0,
                eval_every=0)  # fmt: skip
    run = setup(config(**flat))
    planned, plan = budgeting.plan(config(**flat), run, whole=True, keep=True)
    assert plan.kept == run.state.iteration >= 4 and planned.iters > plan.kept
    assert [r["iter"] for r in plan.rows] == list(range(1, plan.kept + 1))
    assert f"the first {plan.kept} of them the timing's" in plan.describe()
    fresh = setup(config(**flat))
    for it in range(1, plan.kept + 1):
        x, c = to_tensors(fresh.data.train_batch(64, it), torch.device("cpu"), torch.float32)
        step(fresh.state, fresh.cfg.fm, x, fresh.cfg, context=c)
    for name, value in fresh.model.state_dict().items():
        torch.testing.assert_close(run.model.state_dict()[name], value, rtol=0, atol=0)
    untouched = setup(config(**flat))
    _, made = budgeting.plan(config(**flat), untouched, whole=True)  # without keep
    assert made.kept == 0 and made.rows == () and untouched.state.iteration == 0


def test_a_deadline_stops_training_validated_at_the_iteration_that_spends_it() -> None:
    from cnf.training import fit, setup
    from cnf.training.loop import Hooks

    class Seen(Hooks):
        def __init__(self) -> None:
            self.seen: list[int] = []

        def evaluated(self, state, improved: bool) -> None:
            self.seen.append(state.iteration)

    seen = Seen()
    cfg = config(data="8gaussians", objective="fm", iters=100_000, eval_every=10**6,
                 hidden=(8,), batch_size=32)  # fmt: skip
    run = setup(cfg)
    result = fit(run.state, run.data, run.objective, cfg, hooks=seen, seconds=0.3,
                 progress=False, quiet=True)  # fmt: skip
    assert result.stopped == "budget" and 1 <= result.iteration < 100_000
    assert seen.seen == [result.iteration]  # its last weights validated and checkpointed
    from cnf.training.budget import Plan

    plan = Plan(60.0, 10, 0, 1.0, 0.0, others={"report": 10.0, "validation": 5.0})
    assert plan.deadline == pytest.approx(45.0)
    assert Plan(60.0, 10, 0, 1.0, 0.0).deadline is None  # a budget of training alone


def test_each_validation_prices_the_report_again_from_the_trained_model(
    monkeypatch, tmp_path
) -> None:
    """The plan prices a toy's report from a barely trained model's solves (4.0 CPU s planned
    for --objective mle --budget 30, where report and figures took 8.6, and the command 35):
    each validation NLL prices it again, and the training's seconds give way or gain."""
    from cnf.training import budget as budgeting
    from cnf.training import fit, setup, train

    toy, table = get_dataset("8gaussians"), get_dataset("wine")
    plan = budgeting.Plan(30.0, 400, 0, 0.05, 0.0, others={"setup": 4.0, "report": 4.0})
    deadline = budgeting.Deadline(plan, toy)
    assert deadline() == 22.0
    rows = len(toy.validation())
    deadline.validated(2 * 4.0 * rows / budgeting.REPORT_ROWS_TRAINED["toy"])  # twice the price
    assert deadline() == pytest.approx(18.0)
    deadline.validated(0.5 * 4.0 * rows / budgeting.REPORT_ROWS_TRAINED["toy"])  # half of it
    assert deadline() == pytest.approx(24.0)
    deadline.validated(1e3)  # more than the training's share: none is left
    assert deadline() == 0.0
    table_deadline = budgeting.Deadline(plan, table)  # a table keeps the plan's estimate
    table_deadline.validated(1e3)
    assert table_deadline() == 22.0

    # the loop asks a callable deadline at every iteration
    cfg = config(data="8gaussians", objective="fm", iters=50, eval_every=10**6, hidden=(8,),
                 batch_size=32)  # fmt: skip
    run = setup(cfg)
    asked = []
    result = fit(run.state, run.data, run.objective, cfg, progress=False, quiet=True,
                 seconds=lambda: asked.append(1) or (None if len(asked) < 7 else 0.0))  # fmt: skip
    assert result.stopped == "budget" and result.iteration == len(asked) == 7

    # cnf train tells its deadline the seconds of each validation of the last phase's model,
    # the one the report solves (flow matching's field solves at another cost)
    told = []
    monkeypatch.setattr(budgeting.Deadline, "validated", lambda self, cpu: told.append(cpu))
    cost = {"fm": 0.01, "mle": 0.05}  # an iteration's and a validation's, as if timed: a plan
    monkeypatch.setattr(budgeting, "_time", lambda probe, objective, cfg, n: cost[objective.name])
    monkeypatch.setattr(budgeting, "_time_validation", lambda probe, cfg: (0.01, 1e-6, None))
    spent = time.process_time()  # a budget is the whole process's: this one's so far, and 20 s
    flat = dict(data="8gaussians", objective="fm", hidden=(8,), batch_size=32,
                budget=spent + 20.0, eval_every=0, test_size=200, validity_size=50,
                finetune_share=0.5)  # fmt: skip
    out = train(config(**flat), tmp_path / "run", progress=False).out
    fm = json.loads((out / "config.json").read_text())["iters"]
    rows = [r for r in map(json.loads, (out / "log.jsonl").open()) if "val_cpu" in r]
    assert told == [r["val_cpu"] for r in rows if r["iter"] > fm] and told
    assert any(r["iter"] <= fm for r in rows)  # flow matching's, not told
