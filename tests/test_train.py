"""The trainer: runs end to end, resumes exactly, never loses what the user has."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SMALL, config

from cnf import viz
from cnf.checkpoint import KEYS, CheckpointError, load_checkpoint, save_checkpoint
from cnf.runs import load_run
from cnf.solvers import Solver, SolverError
from cnf.training import TrainConfig, lr_factor, train
from cnf.training.presets import QUICK_FINETUNE, QUICK_ITERS


def _states_equal(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_training_run_writes_everything(tmp_path: Path) -> None:
    result = train(config(data="8gaussians", **SMALL), tmp_path / "run", progress=False)
    run = result.out
    for name in ("config.json", "best.pt", "last.pt", "log.jsonl", "report.json", ".cnf-run"):
        assert (run / name).is_file(), name
    assert not list(run.glob("*.png"))  # the training layer draws nothing: its caller does
    written = viz.plot_run(run, data=result.data)
    assert sorted(p.name for p in written) == [
        "density.png",
        "samples.png",
        "solver.png",
        "training.png",
    ]
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == list(range(1, 13))
    assert {"loss", "nll", "nfe", "nfe_backward", "grad_norm", "lr", "time"} <= rows[0].keys()
    assert "val_nll" in rows[5] and "val_nll" in rows[11]
    assert rows[0]["nfe"] == 16  # rk4, 4 steps
    assert set(result.report) >= {"nll", "nll_se", "nfe", "entropy", "kl"}
    assert result.report["kl"] == pytest.approx(result.report["nll"] - result.report["entropy"])
    assert load_checkpoint(run / "last.pt")["iteration"] == 12


def test_training_lowers_the_loss(tmp_path: Path) -> None:
    cfg = config(data="8gaussians", **{**SMALL, "iters": 60, "eval_every": 60}, lr=5e-3)
    train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    first = sum(r["nll"] for r in rows[:10]) / 10
    last = sum(r["nll"] for r in rows[-10:]) / 10
    assert last < first - 0.3


def test_seeded_runs_reproduce(tmp_path: Path) -> None:
    cfg = config(data="moons", **SMALL)
    train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False)
    _states_equal(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")


def test_sigterm_saves_and_resume_ends_where_an_uninterrupted_run_would(tmp_path: Path) -> None:
    args = ["--data", "8gaussians", "--iters", "300", "--batch-size", "64", "--eval-every", "100",
            "--hidden", "16,16", "--method", "rk4", "--step-size", "0.25", "--eval-method", "rk4",
            "--eval-step-size", "0.25", "--test-size", "300"]  # fmt: skip
    run = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "cnf", "train", *args, "--out", str(run),
                             "--no-progress"], stderr=subprocess.PIPE, text=True)  # fmt: skip
    log = run / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 20):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "--resume" in err
    stopped = load_checkpoint(run / "last.pt")["iteration"]
    assert 20 <= stopped < 300
    assert len(log.read_text().splitlines()) == stopped  # the log matches the checkpoint

    resumed = train(TrainConfig(), run, resume=True, progress=False)
    assert resumed.iteration == 300
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    train(cfg, tmp_path / "straight", progress=False)
    _states_equal(run / "last.pt", tmp_path / "straight" / "last.pt")
    _states_equal(run / "best.pt", tmp_path / "straight" / "best.pt")


def test_existing_run_directory_is_refused(tmp_path: Path) -> None:
    cfg = config(data="8gaussians", **SMALL)
    train(cfg, tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "best.pt").read_bytes()
    with pytest.raises(FileExistsError, match=r"already exists.*--resume.*--force"):
        train(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "best.pt").read_bytes() == before
    train(cfg, tmp_path / "run", force=True, progress=False)  # --force overwrites a cnf run...
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_text("precious")
    with pytest.raises(FileExistsError, match="does not look like a cnf run"):
        train(cfg, other, force=True, progress=False)  # ...but nothing else
    assert (other / "holiday.jpg").read_text() == "precious"


def test_unwritable_run_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match=r"cannot write to run directory.*is a file"):
        train(config(**SMALL), blocker / "run", progress=False)


def test_resume_needs_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot resume"):
        train(TrainConfig(), tmp_path, resume=True, progress=False)


def test_checkpoint_writes_are_atomic(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {**dict.fromkeys(KEYS), "iteration": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {**dict.fromkeys(KEYS), "iteration": 2})
    assert load_checkpoint(path)["iteration"] == 1  # the old file survives whole
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left behind


def test_corrupt_and_foreign_checkpoints(tmp_path: Path) -> None:
    train(config(data="8gaussians", **SMALL), tmp_path / "run", progress=False)
    good = (tmp_path / "run" / "best.pt").read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt or not a cnf checkpoint"):
        load_run(bad)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or not a cnf checkpoint"):
        load_run(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a cnf checkpoint"):
        load_run(foreign)
    code = tmp_path / "code.pt"
    torch.save(torch.nn.Linear(2, 2), code)  # a pickled module: weights_only refuses to run it
    with pytest.raises(CheckpointError, match=r"not a cnf checkpoint: it holds code .*Linear"):
        load_run(code)


def test_checkpoint_of_another_dimension(tmp_path: Path) -> None:
    train(config(data="8gaussians", **SMALL), tmp_path / "run", progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    ckpt["data"]["event_shape"] = [3]
    save_checkpoint(tmp_path / "other.pt", {k: v for k, v in ckpt.items()
                                            if k not in ("format", "version")})  # fmt: skip
    with pytest.raises(CheckpointError, match=r"does not fit this cnf model.*size mismatch"):
        load_run(tmp_path / "other.pt")


def test_loaded_model_matches_the_trained_one(tmp_path: Path) -> None:
    train(config(data="8gaussians", **SMALL), tmp_path / "run", progress=False)
    loaded = load_run(tmp_path / "run")
    model = loaded.model
    assert not model.training and loaded.meta["name"] == "8gaussians"
    assert model.eval_solver.describe() == "rk4(h=0.25)"
    x = torch.randn(5, 2)
    with torch.no_grad():
        assert torch.isfinite(model.log_prob(x)).all()


def test_schedule_is_cosine_to_one_percent() -> None:
    assert lr_factor(0, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(50, 100, "cosine") == pytest.approx(0.505)
    assert lr_factor(100, 100, "cosine") == pytest.approx(0.01) == lr_factor(150, 100, "cosine")
    assert lr_factor(70, 100, "constant") == 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(iters=0), "iters must be a positive integer"),
        (dict(lr=-1.0), "lr must be a positive finite number, got -1.0"),
        (dict(lr=math.inf), "lr must be a finite number, got inf"),
        (dict(T=math.nan), "T must be a finite number, got nan"),
        (dict(T=0), "T must be a positive finite number, got 0"),
        (dict(kinetic=math.inf), "kinetic must be a finite number"),
        (dict(seed=-1), r"seed must be an integer in 0..2\*\*63-1, got -1"),
        (dict(seed=10**22), "seed must be an integer in 0..2"),
        (dict(hidden=(0, 16)), r"hidden must hold positive widths, got \[0, 16\]"),
        (dict(schedule="linear"), r"schedule 'linear' is unknown; valid choices: \['cosine'"),
        (dict(dtype="float16"), "dtype 'float16' is unknown"),
        (dict(activation="gelu"), "activation 'gelu' is unknown"),
        (dict(extra={"trust_pickle": True}), "extra cannot hold trust_pickle"),
        (dict(adjoint="no"), "adjoint must be true or false, got 'no'"),
        (dict(unet_scale_shift=1), "unet_scale_shift is for images, and these data are not"),
        (dict(dequantize="false"), "dequantize must be true or false, got 'false'"),
    ],
)
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        config(**kwargs)


def test_presets_per_kind_of_data() -> None:
    quick = TrainConfig.for_data("8gaussians")  # given no length, the quick recipe
    assert (quick.objective, quick.iters, quick.finetune_iters, quick.eval_every) == (
        "fm", QUICK_ITERS, QUICK_FINETUNE, 0)  # fmt: skip
    assert quick.evaluation_interval == math.ceil((QUICK_ITERS + QUICK_FINETUNE) / 20)
    for given in (dict(iters=100), dict(objective="mle")):
        assert TrainConfig.for_data("8gaussians", **given) == config(data="8gaussians", **given)
    assert TrainConfig.for_data("8gaussians", objective="mle").iters == 3000
    image = TrainConfig.for_data("digits")  # flow matching on one U-Net field
    assert (image.objective, image.model.image.field.kind, image.model.image.scales) == (
        "fm", "unet", 1)  # fmt: skip
    assert (image.fm.time_sampling, image.model.image.field.dropout, image.finetune_share) == (
        "logit-normal", 0.1, 0.0)  # fmt: skip
    with pytest.raises(ValueError, match="unet_scale_shift must be true or false, got 1"):
        TrainConfig.for_data("digits", unet_scale_shift=1)
    multiscale = TrainConfig.for_data("digits", objective="mle")
    assert (multiscale.batch_size, multiscale.model.hidden, multiscale.validity_size) == (
        64, (32, 32), 64)  # fmt: skip
    assert multiscale.model.image.field.kind == "conv"
    assert multiscale.fm.time_sampling == "uniform"
    assert TrainConfig.for_data("digits", batch_size=8).batch_size == 8  # given flags win
    with pytest.raises(ValueError, match="unknown dataset 'digitz'"):
        TrainConfig.for_data("digitz")


def test_bad_config_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown config keys \['lerning_rate'\]"):
        TrainConfig.from_dict({"lerning_rate": 1.0})


def test_cuda_requested_without_cuda(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available here; use --device cpu or auto"):
        train(config(device="cuda", **SMALL), tmp_path / "r", progress=False)


def test_diverging_training_stops_with_advice(tmp_path: Path) -> None:
    small = {**SMALL, "iters": 40, "method": "dopri5", "step_size": None}
    cfg = config(data="8gaussians", **small, lr=1e4, grad_clip=0.0, max_nfe=300)
    with pytest.raises(SolverError, match=r"diverged at iteration \d+: .*max_nfe=300") as info:
        train(cfg, tmp_path / "run", progress=False)
    assert os.path.getsize(tmp_path / "run" / "log.jsonl") < 100_000  # stopped, no runaway log
    # the advice fits: no checkpoint exists yet, so it says to start again, not to resume
    assert not (tmp_path / "run" / "last.pt").exists()
    assert "no checkpoint was saved yet" in str(info.value) and "--force" in str(info.value)
    assert "--resume" not in str(info.value)


def test_divergence_after_a_checkpoint_advises_a_resume_that_works(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(config(data="8gaussians", **SMALL), run, progress=False)
    changes = {"iters": 40, "max_nfe": 5}  # the next iteration exceeds it
    with pytest.raises(SolverError, match=r"last good checkpoint is .*last.pt \(iteration 12\)"):
        train(TrainConfig(), run, resume=True, progress=False, changes=changes)
    train(TrainConfig(), run, resume=True, progress=False, changes={"iters": 14, "lr": 1e-3})
    assert load_checkpoint(run / "last.pt")["iteration"] == 14


def _tree(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}  # fmt: skip


def test_force_refuses_a_folder_that_merely_has_a_config(tmp_path: Path) -> None:
    project = tmp_path / "thesis"
    (project / "src").mkdir(parents=True)
    (project / "config.json").write_text("{}")
    (project / "thesis.tex").write_text("\\documentclass{article}")
    (project / "src" / "main.py").write_text("print()")
    before = _tree(tmp_path)
    with pytest.raises(FileExistsError, match="does not look like a cnf run"):
        train(config(data="8gaussians", **SMALL), project, force=True, progress=False)
    assert _tree(tmp_path) == before


def test_force_deletes_a_run_but_never_a_file_it_did_not_write(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = config(data="8gaussians", **SMALL)
    train(cfg, run, progress=False)
    (run / "notes.md").write_text("mine")
    (run / "plots").mkdir()
    before = _tree(tmp_path)
    with pytest.raises(FileExistsError, match=r"besides a cnf run it holds notes.md, plots/"):
        train(cfg, run, force=True, progress=False)
    assert _tree(tmp_path) == before
    (run / "notes.md").unlink()
    (run / "plots").rmdir()
    train(dataclasses.replace(cfg, seed=1), run, force=True, progress=False)
    assert json.loads((run / "config.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the swap left nothing behind


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(data="missing.csv"), "no data file at"),
        (dict(method="bogus"), "method 'bogus' is unknown"),
        (dict(hidden=(16, 0)), "hidden must hold positive widths"),
        (dict(device="cuda:99"), "device"),
    ],
)
def test_force_checks_everything_before_it_replaces_a_run(tmp_path: Path, change, match) -> None:
    run = tmp_path / "run"
    cfg = config(data="8gaussians", **SMALL)
    train(cfg, run, progress=False)
    before = _tree(tmp_path)
    with pytest.raises((ValueError, OSError), match=match):
        train(cfg.replace(**change), run, force=True, progress=False)
    assert _tree(tmp_path) == before


def test_a_run_directory_is_marked_as_ours(tmp_path: Path) -> None:
    from cnf.training.rundir import MARKER, is_run

    train(config(data="8gaussians", **SMALL), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / MARKER).is_file() and is_run(tmp_path / "run")
    (tmp_path / "run" / MARKER).unlink()  # a run of an older cnf: its checkpoints prove it
    assert is_run(tmp_path / "run")
    assert not is_run(tmp_path)


def test_maximum_likelihood_from_scratch_starts_at_the_largest_valid_step(tmp_path: Path):
    """rk4 without a given step: the first iteration starts at the largest step (in halvings
    from one step over T) whose NLL agrees with the float64 reference on its batch, then checks
    1, 2, 4, ... iterations in; an untrained field is valid at one step."""
    import copy

    from cnf.runtime import to_tensors
    from cnf.training import setup

    cfg = config(data="8gaussians", iters=20, batch_size=128, eval_every=20, test_size=300,
                 validity_size=200, hidden=(16, 16), adapt_every=25)  # fmt: skip
    assert cfg.model.solver.step_size is None and cfg.model.solver.fixed_step
    start = setup(cfg)
    model = copy.deepcopy(start.model).double()
    x, _ = to_tensors(start.data.train_batch(128, 1), torch.device("cpu"), torch.float64)
    train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert rows[0]["adapt"][0]["event"] == "start" and rows[0]["step_size"] == 1.0
    assert [r["iter"] for r in rows if "adapt" in r] == [1, 2, 3, 5, 9, 17]
    with torch.no_grad():  # one rk4 step of the initial field against dopri5 in float64
        one = model.log_prob(x, solver=model.solver.replace(step_size=1.0)).mean()
        exact = model.log_prob(x, solver=Solver("dopri5", atol=1e-9, rtol=1e-9)).mean()
    assert abs(float(one - exact)) <= cfg.adaptation.threshold


def test_a_budget_times_maximum_likelihood_at_the_step_the_run_starts_at(monkeypatch) -> None:
    import cnf.training.budget as budgeting
    from cnf.training import fit, setup

    seen = []
    real = budgeting._time

    def spy(probe, objective, cfg, n):
        seen.append(probe.state.model.solver.step_size)
        return real(probe, objective, cfg, n)

    monkeypatch.setattr(budgeting, "_time", spy)
    flat = dict(data="8gaussians", objective="mle", hidden=(16, 16), batch_size=64, seed=2)
    planned, plan = budgeting.plan(config(**flat, budget=5), setup(config(**flat, budget=5)))
    run = setup(config(**flat, iters=1))
    hairer = run.model.solver.step_size  # where setup leaves it, before the first iteration
    fit(run.state, run.data, run.objective, run.cfg, progress=False, quiet=True)
    assert seen == [run.model.solver.step_size] and seen[0] != hairer
    assert plan.iters == planned.iters and plan.seconds_per_iter > 0


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("clip", [0.0, 1e-3, 1e6])
def test_the_step_clips_gradients_as_clip_grad_norm_does(clip: float) -> None:
    """The step reads the norm once and scales only above --grad-clip: the gradients the
    optimizer sees, and the logged norm, are torch's clip_grad_norm_'s on the same loss."""
    import copy

    from cnf.runtime import to_tensors
    from cnf.seeds import PROBES, generator
    from cnf.training import setup
    from cnf.training.loop import step

    cfg = config(data="8gaussians", objective="fm", batch_size=64, hidden=(8,), grad_clip=clip,
                 iters=1, seed=4)  # fmt: skip
    run = setup(cfg)
    twin = copy.deepcopy(run.model)
    seen = {}
    real = run.state.optimizer.step

    def capture(*args, **kwargs):
        seen.update({n: p.grad.clone() for n, p in run.model.named_parameters()})
        return real(*args, **kwargs)

    run.state.optimizer.step = capture
    x, c = to_tensors(run.data.train_batch(64, 1), torch.device("cpu"), torch.float32)
    row = step(run.state, run.objective, x, run.cfg, context=c)
    loss, _ = run.objective.loss(twin, x, generator(x.device, cfg.seed, PROBES, 1))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), clip or math.inf)
    assert row["grad_norm"] == pytest.approx(float(norm), rel=1e-6)
    for name, p in twin.named_parameters():
        torch.testing.assert_close(seen[name], p.grad, rtol=1e-6, atol=0, msg=name)
    if clip == 1e-3:  # it did clip
        clipped = torch.linalg.vector_norm(torch.cat([g.flatten() for g in seen.values()]))
        assert float(clipped) == pytest.approx(clip, rel=1e-3)


def test_the_report_shows_its_progress(tmp_path: Path, capsys) -> None:
    """The test NLL and the validity check each get a bar of rows when training shows one."""
    train(config(data="8gaussians", **SMALL), tmp_path / "bars", progress=True)
    err = capsys.readouterr().err
    assert "test NLL" in err and "validity" in err and "rows" in err
    train(config(data="8gaussians", **SMALL), tmp_path / "quiet", progress=False)
    assert "rows" not in capsys.readouterr().err
