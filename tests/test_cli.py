"""The cnf command: thin layers over the API, one-line errors, nothing overwritten."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from conftest import SMALL, cli_flags, config

from cnf.cli import main
from cnf.training import train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    train(config(data="8gaussians", **SMALL), out, progress=False)
    return out


def test_train_command(tmp_path: Path, capsys) -> None:
    out = tmp_path / "r"
    argv = ["train", "--data", "moons", "--out", str(out), "--no-progress", *cli_flags(**SMALL)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("moons: test NLL") and printed[1].startswith(("VALID", "INVALID"))
    assert (
        printed[-1].startswith(f"run saved in {out}: report.json") and "training.png" in printed[-1]
    )
    assert len(printed) <= 6  # a summary, not a dump
    assert printed[-3].startswith("report: ") and " CPU s (validity check " in printed[-3]
    assert printed[-2].startswith("CPU seconds: ") and "the run's training " in printed[-2]
    report = json.loads((out / "report.json").read_text())
    assert {"nll", "nll_se", "nfe"} <= report.keys() and "kl" not in report  # moons: no truth
    assert main([*argv[:4], str(tmp_path / "r2"), *argv[5:], "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(
        (tmp_path / "r2" / "report.json").read_text()
    )
    assert json.loads((out / "config.json").read_text())["model"]["hidden"] == [16, 16]


def test_eval_json(run: Path, capsys) -> None:
    assert main(["eval", str(run), "--n", "500", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"nll", "nll_se", "nfe", "entropy", "kl"} <= result.keys()
    assert result["n"] == 500 and result["entropy"] == pytest.approx(2.8319, abs=1e-3)


def test_eval_text(run: Path, capsys) -> None:
    assert main(["eval", str(run), "--n", "200"]) == 0
    out = capsys.readouterr().out
    assert "nll" in out and "kl" in out


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_sample_files(run: Path, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"s{suffix}"
    assert main(["sample", str(run), "-n", "50", "-o", str(path), "--with-log-prob"]) == 0
    table = np.load(path) if suffix == ".npy" else np.loadtxt(path, delimiter=",", skiprows=1)
    assert table.shape == (50, 3) and np.isfinite(table).all()
    if suffix == ".csv":
        assert path.read_text().splitlines()[0] == "x0,x1,log_prob"
    assert main(["sample", str(run), "-n", "5", "-o", str(path)]) == 1  # refuses to overwrite
    assert main(["sample", str(run), "-n", "5", "-o", str(path), "--force"]) == 0


def test_sample_log_prob_matches_model(run: Path, tmp_path: Path) -> None:
    import torch

    from cnf.runs import load_run

    path = tmp_path / "s.npy"
    main(["sample", str(run), "-n", "20", "-o", str(path), "--with-log-prob"])
    table = np.load(path)
    model = load_run(run).model
    with torch.no_grad():
        logp = model.log_prob(torch.as_tensor(table[:, :2], dtype=torch.float32)).numpy()
    np.testing.assert_allclose(logp, table[:, 2], atol=2e-2)


def test_datasets_command(capsys) -> None:
    assert main(["datasets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["checkerboard"][1:4] == ["toy", "2", "yes"]
    assert rows["swissroll"][3] == "no"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--data", "gaussians", "--out", "{tmp}/x"],
            "unknown dataset 'gaussians'; valid names:",
        ),
        (
            ["train", "--data", "moons", "--out", "{tmp}/x", "--method", "rk5"],
            "method 'rk5' is unknown",
        ),
        (
            [
                "train",
                "--data",
                "moons",
                "--out",
                "{tmp}/x",
                "--method",
                "dopri5",
                "--step-size",
                "0.1",
            ],
            "is for fixed-step methods",
        ),
        (
            ["train", "--data", "moons", "--out", "{tmp}/x", "--trace", "exakt"],
            "--trace 'exakt' is unknown; valid choices",
        ),
        (["eval", "{tmp}/nothing"], "no checkpoint at"),
        (["sample", "{run}", "-n", "5", "-o", "{tmp}/s.txt"], "use a .npy or .csv file"),
        (["train", "--resume", "{run}", "--hidden", "8"], "--hidden cannot change when resuming"),
        (["train", "--data", "moons", "--out", "{run}"], "already exists and is not empty"),
    ],
)
def test_errors_are_one_line(run: Path, tmp_path: Path, capsys, argv: list, message: str) -> None:
    argv = [a.format(tmp=tmp_path, run=run) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("cnf ")


def test_usage_errors_are_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--iters", "many"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid int value: 'many'" in err


def test_corrupt_checkpoint_from_the_shell(tmp_path: Path) -> None:
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"\x00garbage")
    proc = subprocess.run([sys.executable, "-m", "cnf", "eval", str(tmp_path)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "corrupt or not a cnf checkpoint" in proc.stderr


def test_plot_redraws_a_runs_figures(run: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for png in copy.glob("*.png"):
        png.unlink()
    assert main(["plot", str(copy)]) == 0
    names = {"training.png", "solver.png", "density.png", "samples.png"}
    assert {p.name for p in copy.glob("*.png")} == names
    printed = capsys.readouterr().out
    assert all(name in printed for name in names)


class _FakeWriter:
    """Stands for TensorBoard's SummaryWriter: records what it is given."""

    made: ClassVar[list] = []

    def __init__(self, logdir: str) -> None:
        self.logdir, self.scalars, self.closed = logdir, [], False
        self.made.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        self.closed = True


def test_tensorboard_gets_every_row(tmp_path: Path, monkeypatch) -> None:
    import cnf.training.run

    monkeypatch.setattr(cnf.training.run, "_summary_writer", lambda: _FakeWriter)
    out = tmp_path / "r"
    assert main(["train", "--data", "moons", "--out", str(out), "--tensorboard",
                 *cli_flags(**SMALL, log_every=4), "--no-progress"]) == 0  # fmt: skip
    writer = _FakeWriter.made[-1]
    assert writer.logdir == str(out / "tensorboard") and writer.closed
    losses = [(step, value) for tag, value, step in writer.scalars if tag == "loss"]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [4, 6, 8, 12]  # a row per 4, and at each evaluation
    assert losses == [(r["iter"], r["loss"]) for r in rows]
    assert {"val_nll", "nfe", "lr", "step_size"} <= {tag for tag, _, _ in writer.scalars}


def test_tensorboard_without_the_package_is_one_line(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    assert main(["train", "--data", "moons", "--out", str(tmp_path / "r"), "--tensorboard",
                 *cli_flags(**SMALL), "--no-progress"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the tensorboard package" in err
    assert not (tmp_path / "r").exists()  # refused before the run directory was made
