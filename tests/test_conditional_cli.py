"""The command line of conditional models beyond one condition: a toy trained given its labels
(``--condition label``), conditions by name and from a CSV file (one sample set per row), rows
of a file scored with their conditions, a table's condition columns, and the one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cnf.cli import main
from cnf.runs import load_run
from cnf.solvers import Solver

SMALL = ["--objective", "fm", "--iters", "30", "--eval-every", "30", "--test-size", "200",
         "--validity-size", "10", "--hidden", "16,16", "--no-progress"]  # fmt: skip
RK4 = ["--method", "rk4", "--steps", "8"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "8g"
    assert main(["train", "--data", "8gaussians", "--condition", "label", *SMALL,
                 "--out", str(out)]) == 0  # fmt: skip
    return out


def test_a_toy_given_its_labels_reports_its_kl_and_classifies(labelled: Path, capsys) -> None:
    report = json.loads((labelled / "report.json").read_text())
    assert report["entropy"] == pytest.approx(0.7587, abs=1e-3)  # H(X | label), not H(X)
    assert report["kl"] == pytest.approx(report["nll"] - report["entropy"])
    assert (labelled / "conditional.png").is_file()
    capsys.readouterr()
    assert main(["eval", str(labelled), "--classify", "--n", "40", "--json", *RK4]) == 0
    found = json.loads(capsys.readouterr().out)["classification"]
    assert np.array(found["confusion"]).shape == (8, 8)
    assert 0.99 < found["bayes_accuracy"] <= 1.0


def test_a_csv_of_conditions_draws_a_sample_set_for_each_row(labelled: Path, tmp_path) -> None:
    conditions = tmp_path / "c.csv"
    conditions.write_text("digit\n3\n0\n3\n")
    out = tmp_path / "s.csv"
    argv = ["sample", str(labelled), "-n", "4", "-o", str(out), "--context", str(conditions),
            "--with-log-prob", *RK4]  # fmt: skip
    assert main(argv) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "row,label,x0,x1,log_prob" and len(lines) == 13
    table = np.loadtxt(out, delimiter=",", skiprows=1)
    np.testing.assert_array_equal(table[:, 0], np.repeat([0, 1, 2], 4))
    np.testing.assert_array_equal(table[:, 1], np.repeat([3, 0, 3], 4))
    model = load_run(labelled).model
    for k, label in enumerate((3, 0, 3)):  # each set is the model's sample given its row
        gen = torch.Generator().manual_seed(0)
        x = model.sample(4, generator=gen, context=label, solver=Solver("rk4", step_size=1 / 8))
        np.testing.assert_allclose(table[4 * k : 4 * k + 4, 2:4], x.detach().numpy(), atol=1e-5)
    one = tmp_path / "one.csv"
    assert main(["sample", str(labelled), "-n", "4", "-o", str(one), "--context", "label=3",
                 *RK4]) == 0  # fmt: skip
    np.testing.assert_allclose(np.loadtxt(one, delimiter=",", skiprows=1), table[:4, 2:4],
                               atol=1e-6)  # fmt: skip


def test_rows_of_a_file_are_scored_given_their_labels(labelled: Path, tmp_path) -> None:
    rng = np.random.default_rng(0)
    x, c = rng.normal(size=(6, 2)), rng.integers(0, 8, 6)
    rows = tmp_path / "rows.csv"
    np.savetxt(rows, np.column_stack([c, x]), delimiter=",", header="label,x0,x1", comments="")
    per_row = tmp_path / "p.csv"
    assert main(["eval", str(labelled), "--data", str(rows), "--per-row", str(per_row)]) == 0
    model = load_run(labelled).model
    logp = model.log_prob(torch.as_tensor(x, dtype=torch.float32), context=torch.as_tensor(c))
    np.testing.assert_allclose(np.loadtxt(per_row, skiprows=1), logp.detach().numpy(), atol=1e-4)


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ("8", "--context '8' is not a label in 0..7"),
        ("label=1,label=2", "gives label twice"),
        ("missing.csv", "missing.csv: no such file; give a .csv file of conditions"),
        ("bad.csv", "bad.csv, line 2: 'x' is not all numbers"),
        ("wide.csv", "its header must name the model's conditions, label; missing label"),
    ],
)
def test_a_bad_condition_is_one_line(labelled: Path, tmp_path, capsys, context, message) -> None:
    (tmp_path / "bad.csv").write_text("3\nx\n")
    (tmp_path / "wide.csv").write_text("a,b\n1,2\n")
    given = context if "=" in context or context.isdigit() else str(tmp_path / context)
    argv = ["sample", str(labelled), "-n", "2", "-o", str(tmp_path / "o.csv"), "--context", given]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.csv").exists()


def test_rows_with_an_unknown_label_are_refused(labelled: Path, tmp_path, capsys) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("label,x0,x1\n1,0.5,0.5\n9,0,0\n")
    capsys.readouterr()
    assert main(["eval", str(labelled), "--data", str(rows)]) == 1
    assert "row 2 has label 9, not a class 0..7" in capsys.readouterr().err


def test_a_table_given_its_condition_column_samples_by_name(tmp_path, capsys) -> None:
    out = tmp_path / "wine"
    argv = ["train", "--data", "wine", "--condition", "target", *SMALL, "--out", str(out)]
    assert main(argv) == 0
    meta = load_run(out).meta
    assert meta["context"]["columns"] == ["target"] and len(meta["columns"]) == 13
    samples = tmp_path / "s.csv"
    assert main(["sample", str(out), "-n", "3", "-o", str(samples), "--context", "target=2",
                 *RK4]) == 0  # fmt: skip
    assert samples.read_text().splitlines()[0].split(",")[0] == "alcohol"
