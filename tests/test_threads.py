"""Threads that cannot hurt: every command takes ``--threads`` (0: one thread for a small model,
where a second mostly contends); the Python entry points apply the same rule inside their calls
and restore the caller's count, and a count the caller set is theirs to keep."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, config

import cnf.runtime
from cnf import CNFDensity
from cnf.cli import main
from cnf.training import train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("threads") / "run"
    train(config(data="8gaussians", **SMALL), out, progress=False)
    return out


@pytest.fixture
def threads(monkeypatch):
    """torch at 3 threads, as if it had started with them (so not the caller's choice);
    the test process's count restored after."""
    before = torch.get_num_threads()
    monkeypatch.setattr(cnf.runtime, "_IMPORT_THREADS", 3)
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def _seen(monkeypatch, owner, name: str) -> list[int]:
    """Record torch's thread count at every call of ``owner.name``."""
    seen, real = [], getattr(owner, name)

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return seen


def test_the_estimator_scores_on_one_thread_and_restores_the_callers(threads, monkeypatch):
    X = np.random.default_rng(0).normal(size=(200, 2))
    est = CNFDensity(hidden=(8,), max_iter=10, finetune_iter=0, random_state=0).fit(X)
    assert torch.get_num_threads() == 3  # fit restored it
    log_prob = _seen(monkeypatch, est.model_, "log_prob")
    sample = _seen(monkeypatch, est.model_, "sample")
    est.score_samples(X[:5])
    est.sample(5, random_state=0)
    assert log_prob == [1] and sample == [1] and torch.get_num_threads() == 3
    torch.set_num_threads(2)  # the caller's own count wins
    est.score_samples(X[:5])
    assert log_prob[-1] == 2 and torch.get_num_threads() == 2


@pytest.mark.parametrize("given", [0, 2])
def test_commands_take_threads(run: Path, tmp_path: Path, threads, given: int) -> None:
    """0: the rule (one thread for a 2-D model), else the count asked for; for every command."""
    gif = f"-o {tmp_path / 'a.gif'} --frames 2 --particles 20 --grid 8 --force --no-progress"
    commands = [
        ["eval", str(run), "--n", "50", "--json"],
        ["sample", str(run), "-n", "5", "-o", str(tmp_path / "s.npy"), "--force"],
        ["animate", str(run), *gif.split()],
        ["plot", str(run)],
    ]
    for argv in commands:
        torch.set_num_threads(3)
        assert main([*argv, "--threads", str(given)]) == 0, argv[0]
        assert torch.get_num_threads() == (given or 1), argv[0]


@pytest.mark.parametrize("command", ["eval", "sample", "animate", "plot"])
def test_a_negative_thread_count_is_one_line(run: Path, tmp_path: Path, capsys, command: str):
    out = ["-o", str(tmp_path / ("a.gif" if command == "animate" else "s.npy"))]
    argv = [command, str(run), *(out if command in ("sample", "animate") else [])]
    argv += ["-n", "5"] if command == "sample" else []
    assert main([*argv, "--threads", "-1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--threads" in err, err
    assert not (tmp_path / "s.npy").exists() and not (tmp_path / "a.gif").exists()


@pytest.mark.parametrize(("idle", "expected"), [(0.2, 1), (1.4, 1), (1.6, 2), (2.9, 3), (8.0, 3),
                                                (None, 3)])  # fmt: skip
def test_a_large_model_takes_the_idle_cores(threads, monkeypatch, idle, expected: int) -> None:
    """Above 16 dimensions, as many threads as cores are idle (at least one, at most torch's
    default; torch's default where the system does not say); a small model, one."""
    monkeypatch.setattr(cnf.runtime, "idle_cores", lambda: idle)
    cpu = torch.device("cpu")
    assert cnf.runtime.configure_threads(0, cpu, 64) == expected == torch.get_num_threads()
    assert cnf.runtime.configure_threads(0, cpu, 2) == 1
    assert cnf.runtime.configure_threads(2, cpu, 64) == 2  # asked for: always


def test_training_from_python_keeps_the_callers_own_count(threads, monkeypatch, tmp_path):
    """``train`` keeps a count the caller set (``bench/`` sets one thread), for any model size;
    a count the rule itself set before is the rule's to change."""
    monkeypatch.setattr(cnf.runtime, "idle_cores", lambda: 3.0)
    monkeypatch.setattr(cnf.runtime, "_SET", [])
    cpu = torch.device("cpu")
    torch.set_num_threads(2)  # the caller's own
    assert cnf.runtime.configure_threads(0, cpu, 64) == 2 == torch.get_num_threads()
    seen = _seen(monkeypatch, cnf.training.loop, "step")
    train(config(data="8gaussians", **{**SMALL, "iters": 2}), tmp_path / "run", progress=False)
    assert set(seen) == {2} and torch.get_num_threads() == 2
    torch.set_num_threads(3)  # torch's count at import again: the rule's
    assert cnf.runtime.configure_threads(0, cpu, 2) == 1
    assert cnf.runtime.configure_threads(0, cpu, 64) == 3  # the 1 it set is not the caller's


def test_idle_cores_counts_a_busy_core(monkeypatch) -> None:
    """/proc/stat over a short window: a process that spins holds about a core."""
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat on this system: the rule falls back to torch's default")
    monkeypatch.setattr(cnf.runtime, "_IDLE", [])
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        idle = cnf.runtime.idle_cores()
    finally:
        spin.kill()
    assert idle is not None and 0 <= idle <= (os.cpu_count() or 1) - 0.5


def test_a_loaded_flow_runs_under_the_rule_from_python(run, threads, monkeypatch) -> None:
    """``cnf.load_run(...).model`` called from a user's own code (the rule not set by a command):
    its 2-D flow's log_prob and sample run on one thread and leave the caller's count; a count
    the caller set, and a model in training mode, keep theirs."""
    monkeypatch.setattr(cnf.runtime, "_SET", [])
    model = cnf.load_run(run).model
    inside = _seen(monkeypatch, model, "base_log_prob")
    drawn = _seen(monkeypatch, model, "_base_noise")
    x = torch.zeros(3, 2)
    model.log_prob(x)
    model.sample(4)
    assert inside == [1] and drawn == [1] and torch.get_num_threads() == 3
    torch.set_num_threads(2)  # the caller's own choice
    model.log_prob(x)
    model.train()
    torch.set_num_threads(3)
    model.log_prob(x)
    assert inside == [1, 2, 3] and torch.get_num_threads() == 3
