"""What the third reliability pass fixed, beyond the hostile tables: evaluations that repeat
exactly, logs and runs that recover, outputs that a signal does not leave behind, rows of the
user's own scored, and a surface that says what it means."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, cli_flags

import cnf
import cnf.training.run
from cnf.cli import main
from cnf.runs import load_run, read_log

FLAGS = [*cli_flags(**SMALL), "--no-progress"]


@pytest.fixture(scope="module")
def hutch(tmp_path_factory) -> Path:
    """A toy run whose densities are Hutchinson estimates: every evaluation draws probes."""
    out = tmp_path_factory.mktemp("rel") / "hutch"
    assert main(["train", "--data", "8gaussians", "--out", str(out), "--trace", "hutchinson",
                 *FLAGS]) == 0  # fmt: skip
    return out


def _json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


# --- repeatable evaluation ---------------------------------------------------------------------


def test_eval_repeats_exactly_and_matches_the_report(hutch: Path, capsys) -> None:
    first = _json(capsys, ["eval", str(hutch), "--json"])
    again = _json(capsys, ["eval", str(hutch), "--json"])
    first.pop("cost"), again.pop("cost")  # CPU seconds, which vary
    assert first == again  # the same probes every time, from the run's seed
    made = json.loads((hutch / "report.json").read_text())
    assert (first["nll"], first["n"], first["solver"]) == (made["nll"], made["n"], made["solver"])
    other = load_run(hutch).model
    x = torch.randn(50, 2)
    with torch.no_grad():  # the probes really are random: unseeded estimates differ
        assert not torch.equal(other.log_prob(x), other.log_prob(x))


class Killed(BaseException):
    """A hard kill, as far as the run can tell."""


def test_a_resumed_run_logs_the_uninterrupted_validation(hutch, tmp_path, monkeypatch) -> None:
    real, calls = cnf.training.run.save_checkpoint, []

    def save_then_die(*args, **kwargs):  # killed right after iteration 6's checkpoints
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise Killed

    monkeypatch.setattr(cnf.training.run, "save_checkpoint", save_then_die)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        main(["train", "--data", "8gaussians", "--out", str(run), "--trace", "hutchinson", *FLAGS])
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    resumed, straight = (read_log(r / "log.jsonl").rows for r in (run, hutch))
    assert [r.get("val_nll") for r in resumed] == [r.get("val_nll") for r in straight]
    assert sum("val_nll" in r for r in resumed) == 2


# --- logs and runs that recover ----------------------------------------------------------------


def test_a_partial_last_log_line_is_dropped_on_resume(hutch: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for p in hutch.iterdir():
        if p.is_file():
            (run / p.name).write_bytes(p.read_bytes())
    with open(run / "log.jsonl", "a") as f:
        f.write('{"iter": 13, "lo')  # what a kill in the middle of a write leaves
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--iters", "14", "--no-progress"]) == 0
    assert "dropped an incomplete last line" in capsys.readouterr().err
    assert [r["iter"] for r in read_log(run / "log.jsonl").rows] == list(range(1, 15))


def test_eval_of_a_run_without_best_uses_last_and_says_so(hutch: Path, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes((hutch / "last.pt").read_bytes())
    capsys.readouterr()
    assert main(["eval", str(run), "--n", "50"]) == 0
    assert "no best.pt" in capsys.readouterr().err


def test_plot_without_a_log_draws_the_rest(hutch: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "last.pt"):
        (run / name).write_bytes((hutch / name).read_bytes())
    (run / "log.jsonl").write_text("")  # a run killed before its first row
    capsys.readouterr()
    assert main(["plot", str(run)]) == 0
    assert "no rows yet" in capsys.readouterr().err
    assert (run / "density.png").is_file() and not (run / "training.png").exists()


# --- signals and one-line errors ---------------------------------------------------------------


def test_sigterm_during_sampling_removes_the_partial_file(hutch: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CNF_DEBUG"}
    out = tmp_path / "s.npy"
    job = subprocess.Popen([sys.executable, "-m", "cnf", "sample", str(hutch), "-n", "10000000",
                            "-o", str(out), "--no-progress"], cwd=tmp_path, env=env,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 60
    while not list(tmp_path.glob(".s.*")) and time.time() < deadline:  # writing has begun
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    err = job.communicate(timeout=60)[1]
    assert job.returncode == 143 and err.strip().splitlines()[-1] == "cnf: terminated", err
    assert list(tmp_path.iterdir()) == []  # neither the output nor its hidden temporary


def test_out_of_memory_is_one_line(hutch: Path, monkeypatch, capsys) -> None:
    def allocate(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 40000000000000 bytes."
        )

    monkeypatch.setattr("cnf.cli.evaluate.report", allocate)
    assert main(["eval", str(hutch)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory (an allocation of 4e+04 GB)" in err
    assert "internal error" not in err


@pytest.mark.parametrize(
    ("env", "argv", "words"),
    [
        ({"WORLD_SIZE": "2"}, ["train", "--data", "8gaussians"], "RANK is not"),
        ({"WORLD_SIZE": "two", "RANK": "0"}, ["train", "--data", "8gaussians"], "WORLD_SIZE"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, ["sample", "{run}", "-n", "5", "-o", "{tmp}/s.npy"],
         "one process"),
    ],
    ids=["world-without-rank", "world-not-a-number", "sample-under-torchrun"],
)  # fmt: skip
def test_leftover_distributed_environment(hutch, tmp_path, monkeypatch, capsys, env, argv, words):
    monkeypatch.chdir(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = [a.format(run=hutch, tmp=tmp_path) for a in argv]
    assert main([*argv, *(FLAGS if argv[0] == "train" else [])]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "internal error" not in err, err
    assert list(tmp_path.iterdir()) == []


# --- rows of the user's own ----------------------------------------------------------------------


def test_eval_scores_a_new_file_by_column_name(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.normal(size=300), rng.normal(size=300) * 2, np.full(300, 7.0)])
    np.savetxt(tmp_path / "t.csv", x, delimiter=",", header="a,b,k", comments="")
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "t.csv"), "--out", str(run), *FLAGS]) == 0
    new = np.column_stack([np.full(5, 7.0), rng.normal(size=5) * 2, rng.normal(size=5)])
    np.savetxt(tmp_path / "new.csv", new, delimiter=",", header="k,b,a", comments="")  # reordered
    result = _json(capsys, ["eval", str(run), "--data", str(tmp_path / "new.csv"), "--per-row",
                            str(tmp_path / "rows.csv"), "--json"])  # fmt: skip
    per_row = np.loadtxt(tmp_path / "rows.csv", skiprows=1)
    model = load_run(run).model  # the constant column k is not modelled
    with torch.no_grad():
        expected = model.log_prob(torch.tensor(new[:, [2, 1]], dtype=torch.float32)).double()
    np.testing.assert_allclose(per_row, expected.numpy(), rtol=0, atol=1e-6)
    assert result["n"] == 5 and result["nll"] == pytest.approx(-per_row.mean(), abs=1e-9)
    assert (tmp_path / "rows.csv").read_text().splitlines()[0] == "log_prob"


# --- the surface ---------------------------------------------------------------------------------


def test_dir_lists_the_public_names_once() -> None:
    cnf.CNF  # noqa: B018  (a looked-up name becomes a global too)
    names = dir(cnf)
    assert len(names) == len(set(names)) and "CNF" in names
    assert not {"Any", "annotations", "importlib"} & set(names)


def test_sampled_csv_has_the_digits_of_the_model(hutch: Path, tmp_path: Path) -> None:
    assert main(["sample", str(hutch), "-n", "20", "-o", str(tmp_path / "s.csv")]) == 0
    rows = (tmp_path / "s.csv").read_text().splitlines()[1:]
    assert max(len(v) for row in rows for v in row.split(",")) <= 15, rows[0]  # not %.18e
    exact = np.load(_npy(hutch, tmp_path)).astype(np.float32)  # the model's float32 samples
    written = np.loadtxt(tmp_path / "s.csv", delimiter=",", skiprows=1).astype(np.float32)
    np.testing.assert_array_equal(written, exact)  # every digit there is, and no more


def _npy(run: Path, tmp_path: Path) -> Path:
    assert main(["sample", str(run), "-n", "20", "-o", str(tmp_path / "s.npy")]) == 0
    return tmp_path / "s.npy"


def test_flow_matching_is_judged_with_the_solver_it_samples_with(tmp_path: Path, capsys):
    small = {k: v for k, v in SMALL.items() if k not in ("method", "step_size")}
    small["eval_step_size"] = 0.125
    out = tmp_path / "fm"
    capsys.readouterr()
    assert main(["train", "--data", "8gaussians", "--out", str(out), "--objective", "fm",
                 *cli_flags(**small), "--json"]) == 0  # fmt: skip
    printed = capsys.readouterr()
    report = json.loads(printed.out)
    assert report["validity"]["train"]["solver"] == "rk4(h=0.125)"  # its evaluation solver
    assert "val NLL" in printed.err and "training solver" not in printed.err
    assert math.isfinite(report["validity"]["delta_nll"])
