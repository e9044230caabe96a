"""Conditional densities p(x | c) through the one training loop: datasets of pairs, both
objectives, the report (conditional NLL, KL to the closed form, the validity verdict), the
checkpoint and the command line. The loop's distributed step with conditions is checked against
one process in test_distributed.py."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import config

from cnf import Solver
from cnf.cli import main
from cnf.data import get_dataset, is_conditional
from cnf.data.conditional import GaussiansGivenComponent
from cnf.evaluate import evaluate
from cnf.runs import load_run
from cnf.runtime import to_tensors
from cnf.training import fit, setup, train

FAST = dict(objective="fm", batch_size=256, hidden=(32, 32), lr=5e-3, eval_every=10**6,
            threads=1, device="cpu")  # fmt: skip
RK4 = Solver("rk4", step_size=0.05)


def _trained(data: str, iters: int, **given):
    run = setup(config(data=data, iters=iters, **{**FAST, **given}))
    fit(run.state, run.data, run.objective, run.cfg, progress=False, quiet=True)
    return run


def _test_pairs(run, n: int = 2000):
    p = next(run.model.parameters())
    data = run.data if hasattr(run, "data") else run.dataset()
    return to_tensors(data.test(n), p.device, p.dtype)


def test_the_datasets_give_seeded_pairs_and_describe_their_condition() -> None:
    labels = get_dataset("8gaussians-given-component", seed=1)
    a, b = labels.train_batch(16, 3), labels.train_batch(16, 3)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.c, b.c)
    assert a.c.dtype == np.int64 and a.x.shape == (16, 2)
    assert labels.meta()["context"] == {"kind": "categorical", "classes": 8}
    # the entropy is H(X | C), the Gaussian's: log(2 pi e sigma^2)
    assert labels.entropy == pytest.approx(math.log(2 * math.pi * math.e * 0.5**2 / 1.414**2))
    sims = get_dataset("gaussian-linear", seed=0, n_train=100)  # a simulation budget
    rows = {tuple(r) for r in sims.train_batch(500, 1).x.round(12)}
    assert len(rows) <= 100  # drawn from the fixed 100 pairs
    assert sims.meta()["context"] == {"kind": "continuous", "features": 10}
    assert is_conditional("rotating-gaussian") and not is_conditional("8gaussians")


def test_flow_matching_learns_p_x_given_a_label_not_the_marginal() -> None:
    run = _trained("8gaussians-given-component", 400)
    assert run.model.num_classes == 8
    x, c = _test_pairs(run)
    ev = evaluate(run.model, x, context=c, entropy=run.data.entropy, solver=RK4)
    # a model of p(x) alone would be I(X; C) = about log 8 = 2.08 nats from p(x | c)
    assert ev.kl < 0.25, ev
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        xs = run.model.eval().sample(2000, generator=gen, context=torch.tensor(3), solver=RK4)
    centre = torch.as_tensor(GaussiansGivenComponent.centres[3], dtype=xs.dtype)
    assert (xs.mean(0) - centre).norm() < 0.1  # samples given 3 sit on component 3


def test_a_continuous_condition_is_used_and_a_shuffled_one_costs_likelihood() -> None:
    run = _trained("rotating-gaussian", 400)
    assert run.model.context_features == 1
    x, c = _test_pairs(run)
    true = evaluate(run.model, x, context=c, solver=RK4)
    shuffled = evaluate(run.model, x, context=c[torch.randperm(len(c))], solver=RK4)
    assert shuffled.nll > true.nll + 1.0  # the density follows c


def test_maximum_likelihood_with_labels_steps_and_adapts() -> None:
    run = _trained("8gaussians-given-component", 3, objective="mle", method="rk4",
                   step_size=None, adapt_every=1)  # fmt: skip
    assert run.state.iteration == 3 and run.model.solver.step_size is not None  # Hairer, adapted


def test_condition_dropout_trains_a_null_condition() -> None:
    run = _trained("8gaussians-given-component", 300, cond_dropout=0.5)
    x, c = _test_pairs(run)
    null = torch.ones(len(x), dtype=torch.bool)
    with torch.no_grad():
        marginal = run.model.eval().log_prob(x, context=c, drop=null, solver=RK4)
        conditional = run.model.log_prob(x, context=c, solver=RK4)
    true_marginal = get_dataset("8gaussians").log_prob(x.double().numpy())
    # the null condition models the marginal (a mixture of all 8, harder than one of them:
    # within 1.5 nats of its entropy after these few iterations; a standard normal is 3 off)
    assert abs(-marginal.double().mean().item() + float(np.mean(true_marginal))) < 1.5
    assert conditional.mean() > marginal.mean() + 1.0  # and knowing c is worth I(X; C)


def test_a_conditional_run_reports_its_kl_and_verdict_and_reloads(tmp_path: Path) -> None:
    cfg = config(data="8gaussians-given-component", iters=30, **{**FAST, "eval_every": 15},
                 test_size=500, validity_size=100, eval_method="rk4",
                 eval_step_size=0.05)  # fmt: skip
    result = train(cfg, tmp_path / "run", progress=False)
    report = result.report
    assert report["kl"] == pytest.approx(report["nll"] - report["entropy"])
    assert report["validity"]["verdict"] in ("VALID", "INVALID", "UNDECIDED")
    run = load_run(tmp_path / "run")
    assert run.model.num_classes == 8 and run.meta["context"]["classes"] == 8
    x, c = _test_pairs(run, 500)
    assert evaluate(run.model, x, context=c).nll == pytest.approx(report["nll"], abs=1e-9)


def test_the_command_line_trains_samples_given_a_condition_and_refuses_a_wrong_one(
    tmp_path: Path, capsys
) -> None:
    out = tmp_path / "rot"
    argv = ["train", "--data", "rotating-gaussian", "--objective", "fm", "--iters", "20",
            "--eval-every", "10", "--test-size", "200", "--validity-size", "20", "--hidden",
            "16,16", "--cond-dropout", "0.2", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert (out / "conditional.png").is_file()
    samples = tmp_path / "s.csv"
    assert main(["sample", str(out), "-n", "7", "-o", str(samples), "--context", "0.5"]) == 0
    assert samples.read_text().count("\n") == 8  # header and 7 rows
    capsys.readouterr()
    for extra, message in [
        ([], "models p(x | c): give --context, 1 feature value(s) in order, or NAME=VALUE for c0"),
        (["--context", "0.5,1"], "--context '0.5,1' is not 1 feature value(s)"),
        (["--context", "nan"], "is not 1 feature value(s)"),
        (["--context", "c1=0.5"], "'c1' is not a condition of this model; its conditions: c0"),
    ]:
        assert main(["sample", str(out), "-n", "3", "-o", str(tmp_path / "t.csv"), *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    # rows of a file with their conditions: each row's log-density is the model's
    x = np.loadtxt(samples, delimiter=",", skiprows=1)
    rows = tmp_path / "rows.csv"
    np.savetxt(rows, np.column_stack([np.full(len(x), 0.5), x]), delimiter=",",
               header="c0,x0,x1", comments="")  # fmt: skip
    assert main(["eval", str(out), "--data", str(rows), "--per-row", str(tmp_path / "p.csv")]) == 0
    model = load_run(out).model
    logp = model.log_prob(torch.as_tensor(x, dtype=torch.float32), context=torch.tensor([0.5]))
    got = np.loadtxt(tmp_path / "p.csv", skiprows=1)
    np.testing.assert_allclose(got, logp.detach().numpy(), rtol=1e-4, atol=1e-4)
    argv = ["animate", str(out), "-o", str(tmp_path / "a.gif"), "--context", "c0=-0.5",
            "--frames", "3", "--grid", "12", "--particles", "20", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "a.gif").stat().st_size > 0
    assert main(["train", "--data", "moons", "--objective", "fm", "--cond-dropout", "0.2",
                 "--out", str(tmp_path / "m")]) == 1  # fmt: skip
    assert "--cond-dropout has no effect" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["validity"]["n"] >= 20


def test_the_command_line_classifies_and_guides_a_label_model(tmp_path: Path, capsys) -> None:
    out = tmp_path / "labels"
    argv = ["train", "--data", "8gaussians-given-component", "--objective", "fm", "--iters",
            "30", "--eval-every", "30", "--test-size", "100", "--validity-size", "10",
            "--hidden", "16,16", "--cond-dropout", "0.2", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--classify", "--n", "40", "--json", "--method", "rk4",
                 "--steps", "8"]) == 0  # fmt: skip
    found = json.loads(capsys.readouterr().out)["classification"]
    confusion = np.array(found["confusion"])
    assert confusion.shape == (8, 8) and confusion.sum() == found["n"] == 40
    assert found["accuracy"] == pytest.approx(np.trace(confusion) / 40)
    assert 0.99 < found["bayes_accuracy"] <= 1.0
    guided = tmp_path / "g.csv"
    argv = ["sample", str(out), "-n", "5", "-o", str(guided), "--context", "2", "--guidance",
            "1.5", "--with-log-prob", "--method", "rk4", "--steps", "8"]  # fmt: skip
    assert main(argv) == 0
    assert guided.read_text().splitlines()[0] == "x0,x1,guided_log_prob"
    capsys.readouterr()
    for argv, message in [
        (["sample", str(out), "-n", "2", "-o", str(tmp_path / "h.csv"), "--context", "2",
          "--guidance", "-1"], "--guidance must be a finite number >= 0"),
        (["eval", str(out), "--classify", "--data", str(guided)], "--classify classifies the"),
    ]:  # fmt: skip
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_a_table_models_its_target_given_the_other_columns() -> None:
    from cnf.training import TrainConfig

    cfg = TrainConfig.for_data("diabetes", target="target", iters=300, finetune_iters=0,
                               eval_every=10**6, threads=1, device="cpu")  # fmt: skip
    run = setup(cfg)
    fit(run.state, run.data, run.objective, run.cfg, progress=False, quiet=True)
    meta = run.data.meta()
    assert meta["columns"] == ["target"] and meta["context"]["features"] == 10
    assert "bmi" in meta["context"]["columns"] and "plan" not in meta
    x, c = _test_pairs(run)
    # the features are standardized inside the model: conditions in original units
    train_c = torch.as_tensor(run.data.train_data().c)
    torch.testing.assert_close(run.model.context_normalizer.loc, train_c.mean(0).float())
    true = evaluate(run.model, x, context=c)
    shuffled = evaluate(run.model, x, context=c[torch.randperm(len(c))])
    assert true.nll < shuffled.nll - 0.1  # the features explain part of the target


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("glucose", "target 'glucose' is not a column of diabetes"),
        ("target,target", "must name distinct columns"),
        ("age,sex,bmi,bp,s1,s2,s3,s4,s5,s6,target", "leave at least one column"),
    ],
)
def test_a_bad_target_is_named_with_the_columns_to_choose_from(target, message) -> None:
    with pytest.raises(ValueError, match=message):
        get_dataset("diabetes", target=target)


def test_an_ot_coupling_is_refused_for_a_conditional_model() -> None:
    # minibatch OT pairs noise across conditions: the base given c would no longer be N(0, I)
    with pytest.raises(ValueError, match="coupling 'ot' pairs noise with data across rows"):
        _trained("rotating-gaussian", 1, coupling="ot")
