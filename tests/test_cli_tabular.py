"""`cnf train/eval/sample` on tables: bundled sets, user files, early stopping."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL, cli_flags, config

from cnf.checkpoint import load_checkpoint
from cnf.cli import main
from cnf.runs import load_run
from cnf.training import train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tab") / "run"
    assert main(["train", "--data", "breast_cancer", "--out", str(out), "--no-progress",
                 *cli_flags(**SMALL)]) == 0  # fmt: skip
    return out


def test_the_tabular_preset_trains_with_its_default_solver(tmp_path: Path) -> None:
    # no --method or --step-size: rk4 with the adapted step, starting at T/8 (identity start)
    out = tmp_path / "run"
    flags = ["--iters", "4", "--eval-every", "2", "--hidden", "8", "--test-size", "40"]
    assert main(["train", "--data", "iris", "--out", str(out), "--no-progress", *flags]) == 0
    first = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert first["step_size"] == pytest.approx(1 / 8)
    assert json.loads((out / "config.json").read_text())["model"]["table"]["preprocess"] == "whiten"


def test_train_then_eval_on_the_same_test_split(run: Path, capsys) -> None:
    report = json.loads((run / "report.json").read_text())
    assert report["n"] == 57  # 10% of 569 rows, the seeded test split
    assert (run / "marginals.png").is_file()
    assert main(["eval", str(run), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["n"] == 57 and again["nll"] == pytest.approx(report["nll"], rel=1e-6)
    meta = load_checkpoint(run / "best.pt")["data"]
    assert meta["kind"] == "tabular" and meta["columns"][0] == "mean radius"


def test_samples_come_back_in_original_units_with_column_names(run: Path, tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    assert main(["sample", str(run), "-n", "200", "-o", str(path), "--with-log-prob"]) == 0
    lines = path.read_text().splitlines()
    assert lines[0].startswith("mean radius,mean texture,") and lines[0].endswith(",log_prob")
    table = np.loadtxt(path, delimiter=",", skiprows=1)
    assert table.shape == (200, 31)
    assert 10 < np.median(table[:, 0]) < 20  # mean radius in millimetres, not standardized


def test_user_csv_with_columns(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.normal(size=200), rng.gamma(2.0, size=200) * 30, rng.random(200)])
    np.savetxt(tmp_path / "mine.csv", x, delimiter=",", header="a,b,c", comments="")
    out = tmp_path / "r"
    argv = ["train", "--data", str(tmp_path / "mine.csv"), "--columns", "b,a", "--out", str(out),
            "--no-progress", *cli_flags(**SMALL)]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    loaded = load_run(out)
    meta = loaded.meta
    assert meta["columns"] == ["b", "a"] and loaded.spec.options == {"columns": "b,a"}
    assert meta["name"] == str((tmp_path / "mine.csv").resolve())
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 20


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "{tmp}/mine.csv", "--columns", "a,zz"], "unknown column 'zz'"),
        (["--data", "{tmp}/absent.csv"], "no data file at"),
        (
            ["--data", "moons", "--columns", "a"],
            "dataset 'moons' (toy data) takes no option columns (--columns)",
        ),
        (["--data", "{tmp}", "--iters", "5"], "is not a MAF dataset directory"),
        (["--data", "wine", "--test-fraction", "1.5"], "--test-fraction must be in (0, 1)"),
    ],
)
def test_tabular_errors_are_one_line(tmp_path: Path, capsys, argv: list, message: str) -> None:
    np.savetxt(tmp_path / "mine.csv", np.ones((5, 2)), delimiter=",", header="a,b", comments="")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(["train", *argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_samples_put_back_the_columns_that_were_dropped(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2))
    table = np.column_stack([x[:, 0], np.full(200, 7.5), x[:, 1], x[:, 0]])  # const, copy
    np.savetxt(tmp_path / "t.csv", table, delimiter=",", header="a,c,b,a2", comments="")
    out = tmp_path / "r"
    assert main(["train", "--data", str(tmp_path / "t.csv"), "--out", str(out), "--no-progress",
                 *cli_flags(**SMALL)]) == 0  # fmt: skip
    path = tmp_path / "s.csv"
    assert main(["sample", str(out), "-n", "30", "-o", str(path), "--with-log-prob"]) == 0
    assert path.read_text().splitlines()[0] == "a,c,b,a2,log_prob"
    samples = np.loadtxt(path, delimiter=",", skiprows=1)
    assert samples.shape == (30, 5)
    assert (samples[:, 1] == 7.5).all() and (samples[:, 3] == samples[:, 0]).all()


@pytest.mark.parametrize("preprocess", ["standardize", "whiten"])
def test_values_beyond_the_dtypes_range_name_the_column(tmp_path: Path, capsys, preprocess):
    x = np.random.default_rng(0).normal(size=(50, 2))
    x[3, 1] = 1e300
    np.savetxt(tmp_path / "t.csv", x, delimiter=",", header="small,huge", comments="")
    argv = ["train", "--data", str(tmp_path / "t.csv"), "--preprocess", preprocess,
            "--out", str(tmp_path / "r"), "--no-progress"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "column 'huge' has values up to 1e+300" in err and "rescale the column" in err
    assert not (tmp_path / "r").exists()
    x[3, 1] = 1e35  # fits float64, not float32: the advice says so, and it works
    np.savetxt(tmp_path / "t.csv", x, delimiter=",", header="small,huge", comments="")
    assert main(argv) == 1
    assert "--dtype float64" in capsys.readouterr().err
    assert main([*argv, "--dtype", "float64", *cli_flags(**SMALL)]) == 0


def test_resume_refuses_a_table_whose_values_changed(tmp_path: Path, capsys) -> None:
    x = np.random.default_rng(0).normal(size=(100, 2))
    np.savetxt(tmp_path / "t.csv", x, delimiter=",", header="a,b", comments="")
    out = tmp_path / "r"
    flags = [*cli_flags(**{**SMALL, "iters": 6}), "--objective", "mle"]
    assert main(["train", "--data", str(tmp_path / "t.csv"), "--out", str(out), "--no-progress",
                 *flags]) == 0  # fmt: skip
    x[10, 0] += 1.0  # same shape, same header, other values
    np.savetxt(tmp_path / "t.csv", x, delimiter=",", header="a,b", comments="")
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--iters", "12", "--no-progress"]) == 1
    assert "the training data changed since" in capsys.readouterr().err


def test_early_stopping_on_validation_nll(tmp_path: Path) -> None:
    # a learning rate too small to move float32 weights: no evaluation beats the first
    cfg = config(data="iris", **{**SMALL, "iters": 60, "eval_every": 5}, lr=1e-12, patience=2)
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.iteration == 15 and result.report is not None
    rows = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(rows) == 15
    assert load_checkpoint(tmp_path / "run" / "best.pt")["iteration"] == 5
