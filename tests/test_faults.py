"""Faults: a run killed, interrupted or out of disk at any point resumes to exactly the run that
was never stopped (parameters, optimizer state, the log row for row), and loses nothing."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import config

import cnf.training.objectives
import cnf.training.run
from cnf.checkpoint import load_checkpoint
from cnf.io import DiskFullError, save_figure, write_bytes
from cnf.training import FlowMatching, MaximumLikelihood, TrainConfig, lr_factor, train
from cnf.training.state import TrainState

# 60 iterations with checkpoints at 20, 40, 60 and a step-size check at 50
CONFIG = dict(data="8gaussians", iters=60, batch_size=64, eval_every=20, hidden=(16, 16),
              method="rk4", step_size=0.25, eval_method="rk4", eval_step_size=0.25,
              test_size=300, validity_size=300, adapt_every=25)  # fmt: skip
FLAGS = ["--data", "8gaussians", "--iters", "60", "--batch-size", "64", "--eval-every", "20",
         "--hidden", "16,16", "--method", "rk4", "--step-size", "0.25", "--eval-method", "rk4",
         "--eval-step-size", "0.25", "--test-size", "300", "--validity-size", "300",
         "--adapt-every", "25", "--no-progress"]  # fmt: skip


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs (not even ``except Exception`` handlers)."""


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "straight"
    train(config(**CONFIG), out, progress=False)
    return out


def _log(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    for row in rows:
        for key in ("time", "cpu", "val_cpu"):  # seconds: the columns that may differ
            row.pop(key, None)
    return rows


def assert_same_run(run: Path, straight: Path) -> None:
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(run / name), load_checkpoint(straight / name)
        assert a["iteration"] == b["iteration"], name
        for part in ("model", "optimizer", "scheduler", "training_model", "average_start"):
            assert _equal(a.get(part), b.get(part)), f"{name}: {part} differs"
    assert _log(run) == _log(straight)  # every iteration exactly once, the same numbers
    report, expected = (json.loads((r / "report.json").read_text()) for r in (run, straight))
    assert report["nll"] == expected["nll"]


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# where each fault strikes: the object whose attribute is replaced
WHERE = {"loss": (MaximumLikelihood, "loss"), "fm_loss": (FlowMatching, "loss"),
         "save_checkpoint": (cnf.training.run, "save_checkpoint"),
         "batch_nll_metric": (cnf.training.objectives, "batch_nll_metric")}  # fmt: skip


def _kill_on(monkeypatch, name: str, call: int, *, after: bool = False) -> None:
    """Make the ``call``-th call of ``name`` (see :data:`WHERE`) die, before it runs or after."""
    owner, name = WHERE[name]
    real = getattr(owner, name)
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call and not after:
            raise Killed
        result = real(*args, **kwargs)
        if calls["n"] == call:
            raise Killed
        return result

    monkeypatch.setattr(owner, name, dying)


@pytest.mark.parametrize(
    ("name", "call", "after"),
    [
        ("loss", 27, False),  # mid-iteration, after the first checkpoint
        ("save_checkpoint", 3, False),  # at iteration 40, log row written, best.pt not yet
        ("save_checkpoint", 3, True),  # best.pt of iteration 40 written, last.pt not yet
        ("save_checkpoint", 4, True),  # right after last.pt of iteration 40
        ("batch_nll_metric", 2, False),  # during the step-size check of iteration 50
    ],
    ids=["mid-iteration", "before-best", "between-best-and-last", "after-last", "in-adaptation"],
)
def test_a_killed_run_resumes_to_the_uninterrupted_one(
    tmp_path: Path, monkeypatch, straight: Path, name: str, call: int, after: bool
) -> None:
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _kill_on(m, name, call, after=after)
        with pytest.raises(Killed):
            train(config(**CONFIG), run, progress=False)
    saved = load_checkpoint(run / "last.pt")["iteration"]
    assert len(_log(run)) >= saved  # the log never lacks a checkpointed row
    train(TrainConfig(), run, resume=True, progress=False)
    assert_same_run(run, straight)


def test_killed_before_the_first_checkpoint_says_to_start_again(tmp_path: Path, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _kill_on(m, "loss", 5)
        with pytest.raises(Killed):
            train(config(**CONFIG), run, progress=False)
    with pytest.raises(Exception, match=r"cannot resume: .*last.pt does not exist.*--force"):
        train(TrainConfig(), run, resume=True, progress=False)
    train(config(**CONFIG), run, force=True, progress=False)  # a started run is ours
    assert load_checkpoint(run / "last.pt")["iteration"] == 60


def _interruptible() -> None:
    """Ctrl-C's default in the child: a shell's background job (``pytest &``) starts with SIGINT
    ignored, which its children inherit, and Python then installs no KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(run: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cnf", "train", *FLAGS, "--out", str(run)],
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=_interruptible)  # fmt: skip


def _wait_for_rows(run: Path, rows: int, proc: subprocess.Popen) -> None:
    log, deadline = run / "log.jsonl", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= rows:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run did not reach {rows} log rows")


@pytest.mark.parametrize(
    ("sig", "rows"),
    [(signal.SIGKILL, 25), (signal.SIGINT, 3), (signal.SIGTERM, 45)],
    ids=["kill-9", "sigint-before-first-checkpoint", "sigterm"],
)
def test_signals_from_outside(tmp_path: Path, straight: Path, sig: int, rows: int) -> None:
    run = tmp_path / "run"
    proc = _start(run)
    _wait_for_rows(run, rows, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig), err
    if sig != signal.SIGKILL:  # a clean stop: saved, one line of advice, no traceback
        assert "Traceback" not in err and f"--resume {run}" in err
    assert len(_log(run)) >= load_checkpoint(run / "last.pt")["iteration"]
    train(TrainConfig(), run, resume=True, progress=False)
    assert_same_run(run, straight)


# A Ctrl-C inside torch's import used to abort the process now and then (pybind11 rethrowing the
# KeyboardInterrupt: SIGABRT) or let it die by SIGINT after its one line; the import takes about
# a second, so the signal lands at several points of it.
@pytest.mark.parametrize("delay", [0.1, 0.3, 0.5, 0.7, 0.9, 1.2])
def test_ctrl_c_while_starting_is_one_line(tmp_path: Path, delay: float) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "cnf", "train", *FLAGS, "--out",
                             str(tmp_path / "run")], stderr=subprocess.PIPE, text=True,
                            preexec_fn=_interruptible)  # fmt: skip
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and err.count("\n") == 1, err


def test_resume_of_a_finished_run_does_not_redo_it(straight: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = train(TrainConfig(), run, resume=True, progress=False)
    assert result.report == json.loads((run / "report.json").read_text())
    assert "has finished" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_resume_may_lower_the_learning_rate(straight: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    train(TrainConfig(), run, resume=True, progress=False, changes={"iters": 70, "lr": 1e-3})
    rows = _log(run)
    assert [r["iter"] for r in rows] == list(range(1, 71))
    assert json.loads((run / "config.json").read_text())["lr"] == 1e-3  # the config says so
    # the cosine had reached 1%: the extension continues from there, at the new lr
    assert rows[60]["lr"] == pytest.approx(1e-3 * 0.01)


def test_more_iterations_continue_the_schedule_without_a_jump(tmp_path: Path, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _kill_on(m, "loss", 31)  # iteration 31, after the checkpoint of iteration 30
        with pytest.raises(Killed):
            train(config(**{**CONFIG, "iters": 60, "eval_every": 10}), run, progress=False)
    train(TrainConfig(), run, resume=True, progress=False, changes={"iters": 120})
    lr = [r["lr"] for r in _log(run)]
    assert lr[29] == pytest.approx(5e-3 * lr_factor(30, 60, "cosine"))  # halfway: 0.505
    assert lr[30] == pytest.approx(lr[29], rel=0.01)  # no jump (1/120 of the cosine on)
    assert lr[-1] == pytest.approx(5e-3 * 0.01)  # and down to 1% at the new end


# --- full disks ---------------------------------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_error_and_leaves_no_empty_file(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.pyplot as plt

    target = tmp_path / "figure.png"
    target.write_bytes(b"the old figure")
    monkeypatch.setattr(os, "write", _enospc)
    fig = plt.figure()
    with pytest.raises(DiskFullError, match=r"no space left on the disk holding .* free"):
        save_figure(fig, target)
    plt.close(fig)
    assert target.read_bytes() == b"the old figure"
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]  # no temporary left


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """An 8 MB tmpfs (needs root and mount; skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                              capture_output=True)  # fmt: skip
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()[:80]})")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_resume_on_a_full_disk_keeps_the_run_and_says_so(tiny_disk: Path, straight: Path, capsys):
    from cnf.cli import main

    run = tiny_disk / "run"
    shutil.copytree(straight, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    filler = _fill(tiny_disk)
    assert main(["train", "--resume", str(run), "--iters", "80", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left on the disk holding" in err, err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    filler.unlink()
    assert main(["train", "--resume", str(run), "--iters", "80", "--no-progress"]) == 0
    assert load_checkpoint(run / "last.pt")["iteration"] == 80


def test_figures_on_a_full_disk(tiny_disk: Path) -> None:
    import matplotlib.pyplot as plt

    _fill(tiny_disk)
    fig = plt.figure(figsize=(8, 8))
    fig.add_subplot().imshow(torch.rand(300, 300).numpy())
    with pytest.raises(DiskFullError):
        save_figure(fig, tiny_disk / "f.png")
    plt.close(fig)
    with pytest.raises(DiskFullError):
        write_bytes(tiny_disk / "g.bin", b"x" * 100_000)
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler"]


def test_checkpoints_get_the_permissions_of_the_rest_of_the_run(straight: Path) -> None:
    modes = {p.name: p.stat().st_mode & 0o777 for p in straight.iterdir()}
    assert modes["last.pt"] == modes["config.json"] == modes["log.jsonl"], modes


# --- flow matching, then maximum likelihood --------------------------------------------------

FM_MLE = {**CONFIG, "objective": "fm", "iters": 40, "finetune_iters": 20, "eval_every": 10,
          "finetune_lr": 2e-3}  # fmt: skip


FM_MLE_EMA = {**FM_MLE, "ema": 0.9}  # the same with an average of the weights
RECIPES = {"fm+mle": FM_MLE, "fm+mle ema": FM_MLE_EMA}


@pytest.fixture(scope="module")
def straights(tmp_path_factory) -> dict[str, Path]:
    """Each recipe of :data:`RECIPES` trained without a stop."""
    runs = {name: tmp_path_factory.mktemp("faults-fm") / "straight" for name in RECIPES}
    for name, out in runs.items():
        train(config(**RECIPES[name]), out, progress=False)
    return runs


@pytest.fixture(scope="module")
def straight_fm(straights) -> Path:
    return straights["fm+mle"]


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize(
    ("name", "call"),
    [("fm_loss", 25), ("loss", 1), ("loss", 12)],
    ids=["in-flow-matching", "at-the-switch", "in-maximum-likelihood"],
)
def test_fm_then_mle_resumes_exactly(tmp_path: Path, monkeypatch, straights, recipe, name, call):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _kill_on(m, name, call)
        with pytest.raises(Killed):
            train(config(**RECIPES[recipe]), run, progress=False)
    train(TrainConfig(), run, resume=True, progress=False)
    assert_same_run(run, straights[recipe])
    if "ema" in recipe:  # the average restarted where maximum likelihood began
        assert load_checkpoint(run / "last.pt")["average_start"] == 40


# --- a first phase that stops improving -----------------------------------------------------

FM_PATIENCE = {**FM_MLE, "patience": 2}


def _plateau(monkeypatch) -> None:
    """Every validation after iteration 10 is worse than the one at 10 (the same in every
    process of a run and its resume: a function of the iteration)."""
    real = TrainState.record
    fake = lambda self, nll, keep=False: real(self, 1.0 if self.iteration <= 10 else 2.0, keep)  # noqa: E731
    monkeypatch.setattr(TrainState, "record", fake)


@pytest.fixture(scope="module")
def straight_plateau(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults-plateau") / "straight"
    with pytest.MonkeyPatch.context() as m:
        _plateau(m)
        train(config(**FM_PATIENCE), out, progress=False)
    return out


def test_a_stale_first_phase_ends_and_the_next_starts_from_its_best(
    straight_plateau, straight_fm
) -> None:
    rows = _log(straight_plateau)
    # evaluations at 10 (the best), 20 and 30 (stale twice: --patience 2), then maximum
    # likelihood from iteration 41, the schedule's restart, from the weights of iteration 10
    assert [r["iter"] for r in rows] == [*range(1, 31), *range(41, 61)]
    assert rows[30]["objective"] == "mle" and rows[30]["from_best"] is True
    assert not any(r.get("from_best") for r in rows[:30] + rows[31:])
    full = {r["iter"]: r for r in _log(straight_fm)}  # the same recipe without the plateau
    assert all(r["lr"] == pytest.approx(full[r["iter"]]["lr"], rel=1e-9) for r in rows)
    assert "phase_best" not in load_checkpoint(straight_plateau / "last.pt")


def test_the_next_phase_starts_from_the_best_weights(tmp_path: Path, monkeypatch) -> None:
    """Killed at the first maximum-likelihood iteration, the run's saved first-phase best is the
    checkpoint of iteration 10's weights (best.pt), which the next phase loads."""
    run = tmp_path / "run"
    _plateau(monkeypatch)
    _kill_on(monkeypatch, "loss", 1)
    with pytest.raises(Killed):
        train(config(**FM_PATIENCE), run, progress=False)
    saved = load_checkpoint(run / "last.pt")
    best = load_checkpoint(run / "best.pt")
    assert saved["iteration"] == 30 and best["iteration"] == 10
    assert _equal(saved["phase_best"], best["model"])


@pytest.mark.parametrize(
    ("name", "call"), [("fm_loss", 15), ("loss", 1), ("loss", 12)],
    ids=["in-flow-matching", "at-the-switch", "in-maximum-likelihood"],
)  # fmt: skip
def test_a_first_phase_ended_early_resumes_exactly(
    tmp_path: Path, monkeypatch, straight_plateau, name, call
) -> None:
    run = tmp_path / "run"
    _plateau(monkeypatch)
    with monkeypatch.context() as m:
        _kill_on(m, name, call)
        with pytest.raises(Killed):
            train(config(**FM_PATIENCE), run, progress=False)
    train(TrainConfig(), run, resume=True, progress=False)
    assert_same_run(run, straight_plateau)
