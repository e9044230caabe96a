"""Distributed training on the CPU (gloo, two processes): one DDP step equals one process's step
on the same global batch, a two-process run equals a one-process run, and a job stops, resumes
and fails as one."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import config

import cnf
from cnf.checkpoint import load_checkpoint
from cnf.evaluate import log_probs
from cnf.runtime import to_tensors
from cnf.seeds import VALIDATION
from cnf.training import setup
from cnf.training.distributed import SINGLE, Distributed, shutdown
from cnf.training.loop import Engine, fit, step
from cnf.validity import solver_validity

TINY = dict(iters=4, batch_size=8, hidden=(8, 8), method="rk4", step_size=0.25,
            eval_method="rk4", eval_step_size=0.25, seed=3, threads=1, device="cpu")  # fmt: skip
CASES = {
    "mle": config(data="8gaussians", **TINY),
    "mle-adjoint": config(data="8gaussians", **TINY, adjoint=True),
    "mle-hutchinson": config(data="8gaussians", **TINY, trace="hutchinson"),
    # the step adapter checks at the first step, on fewer rows than the batch: 3 (shares of 2
    # and 1) and 1 (one process scores none)
    "mle-adapt-3": config(
        data="8gaussians", **TINY, trace="hutchinson", adapt_every=1, adapt_size=3
    ),
    "mle-adapt-1": config(data="8gaussians", **TINY, adapt_every=1, adapt_size=1),
    "fm-ot": config(data="8gaussians", **TINY, objective="fm", coupling="ot"),
    "table-fm": config(data="iris", **TINY, objective="fm"),
    "image-mle": config(data="digits", **{**TINY, "hidden": (4,)}, blocks=1, trace="hutchinson"),
    "image-fm-dropout": config(
        data="digits",
        **TINY,
        objective="fm",
        scales=1,
        blocks=1,
        field="unet",
        unet_width=8,
        unet_dropout=0.3,
    ),
    # p(x | c): labels with the adapter's first check, features under condition dropout
    "cond-labels-mle": config(data="8gaussians-given-component", **TINY, adapt_every=1),
    "cond-features-fm": config(data="rotating-gaussian", **TINY, objective="fm", cond_dropout=0.5),
}


def _one_step(cfg, dist):
    run = setup(cfg, dist=dist)
    p = next(run.model.parameters())
    x, c = to_tensors(run.data.train_batch(cfg.batch_size, 1), p.device, p.dtype)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    row = step(run.state, run.objective, x, cfg, dist, dist.wrap(Engine(run.model)), context=c)
    grads = {n: p.grad.clone() for n, p in run.model.named_parameters()}
    check = row.get("adapt", {})
    return before, grads, run.model.state_dict(), row["loss"], (check.get("gap"), row["step_size"])


def _evaluations(dist) -> dict:
    """The validation log-densities and a validity check of two Hutchinson models, as the loop
    and the report compute them (each process its share)."""
    out = {}
    for name in ("mle-hutchinson", "image-mle"):
        run = setup(CASES[name], dist=dist)
        x = torch.as_tensor(run.data.validation()).to(next(run.model.parameters()))[:40]
        shares = dict(share=dist.share, gather=dist.gather) if dist.active else {}
        logp, _ = log_probs(run.model, x, seed=3, stream=VALIDATION, batch_size=16, **shares)
        check = solver_validity(run.model, x, start=10, batch_size=16, **shares)
        out[name] = (logp, check.delta_nll, check.n)
    return out


def _out_of_time(dist) -> tuple[int, str]:
    """Where a budgeted fit stops when only rank 0's training seconds are spent: every process
    must stop after the same iteration, or the next collective call hangs."""
    cfg = CASES["mle"].replace(iters=50)
    run = setup(cfg, dist=dist)
    seconds = 0.0 if dist.rank == 0 else 1e9
    done = fit(run.state, run.data, run.objective, cfg, progress=False, quiet=True,
               seconds=seconds, dist=dist)  # fmt: skip
    return done.iteration, done.stopped


def _gathered(results: dict, rank: int, world: int) -> dict:
    """Every process's results, merged (rank 0's where they share a key)."""
    every: list = [None] * world
    torch.distributed.all_gather_object(every, results)
    return {k: v for r in reversed(every) for k, v in r.items()}


def _worker(rank: int, world: int, store: str, out: str) -> None:
    # a file rendezvous: a free TCP port picked beforehand can be taken before rank 0 binds it
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=world)  # fmt: skip
    try:
        results = {name: _one_step(cfg, Distributed(rank, world)) for name, cfg in CASES.items()}
        results["evaluations"] = _evaluations(Distributed(rank, world))
        results[f"budget {rank}"] = _out_of_time(Distributed(rank, world))
        results = _gathered(results, rank, world)
        if rank == 0:
            torch.save(results, out)
    finally:
        shutdown()  # as the command line leaves the group


def test_one_ddp_step_equals_one_process_step_on_the_same_global_batch(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    store = tmp_path / "rendezvous"
    mp.start_processes(_worker, args=(2, str(store), str(out)), nprocs=2, start_method="spawn")
    ddp = torch.load(out, weights_only=True)
    for name, (logp, delta, n) in _evaluations(SINGLE).items():  # the same probes, any shares
        d_logp, d_delta, d_n = ddp["evaluations"][name]
        torch.testing.assert_close(d_logp, logp, rtol=0, atol=1e-9, msg=name)
        # the float64 reference (dopri5 at 1e-8) picks its steps for the rows it solves
        assert d_delta == pytest.approx(delta, abs=1e-6) and d_n == n, name
    assert ddp["budget 0"] == ddp["budget 1"] == (1, "budget")  # rank 1 stops with rank 0
    for name, cfg in CASES.items():
        before, grads, after, loss, (gap, step) = _one_step(cfg, SINGLE)
        d_before, d_grads, d_after, d_loss, (d_gap, d_step) = ddp[name]
        for k in before:
            torch.testing.assert_close(d_before[k], before[k], rtol=0, atol=0, msg=name)
        for k in grads:  # the gradient of the global mean, to float32 precision
            torch.testing.assert_close(d_grads[k], grads[k], rtol=1e-4, atol=1e-6, msg=name)
        for k in after:
            torch.testing.assert_close(d_after[k], after[k], rtol=1e-5, atol=1e-6, msg=name)
        assert d_loss == pytest.approx(loss, rel=1e-5), name
        assert (d_gap is None) == (gap is None) and d_step == step, name  # the same check
        if gap is not None:  # of the same rows, whatever their shares; the reference (dopri5
            # at 1e-6) picks its steps for the rows it solves, so agreement is to its tolerance
            assert d_gap == pytest.approx(gap, abs=1e-5), name


# --- the command line under torchrun --------------------------------------------------------

FLAGS = ["--data", "8gaussians", "--iters", "40", "--eval-every", "10", "--batch-size", "64",
         "--hidden", "16,16", "--test-size", "300", "--validity-size", "100", "--threads", "1",
         "--no-progress"]  # fmt: skip


def _torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "cnf", *args]  # fmt: skip


def _files(run: Path) -> set[str]:
    return {p.name for p in run.iterdir()}


def _same_run(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a / "last.pt")["model"], load_checkpoint(b / "last.pt")["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-5, msg=k)
    la, lb = ([json.loads(r) for r in (d / "log.jsonl").read_text().splitlines()] for d in (a, b))
    assert [r["iter"] for r in la] == [r["iter"] for r in lb]
    for ra, rb in zip(la, lb, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "one"
    subprocess.run([sys.executable, "-m", "cnf", "train", *FLAGS, "--out", str(out)], check=True,
                   capture_output=True)  # fmt: skip
    return out


@pytest.mark.slow  # torchrun and whole runs: about a minute each on 2 cores
def test_two_processes_train_the_run_one_process_trains(tmp_path: Path, one_process: Path):
    out = tmp_path / "two"
    done = subprocess.run(_torchrun("train", *FLAGS, "--out", str(out)), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    _same_run(out, one_process)
    assert _files(out) == _files(one_process)  # rank 0's files, and nothing else
    reports = [json.loads((d / "report.json").read_text()) for d in (out, one_process)]
    assert reports[0]["nll"] == pytest.approx(reports[1]["nll"], abs=1e-5)
    assert done.stdout.count("run saved in") == 1  # one summary, from rank 0


@pytest.mark.slow  # torchrun and whole runs: about a minute each on 2 cores
def test_a_sigterm_stops_every_process_and_resume_finishes_the_run(
    tmp_path: Path, one_process: Path
) -> None:
    out = tmp_path / "job"
    job = subprocess.Popen(_torchrun("train", *FLAGS, "--out", str(out)), text=True,
                           stderr=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 12):
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0
    stopped = load_checkpoint(out / "last.pt")["iteration"]
    assert 12 <= stopped < 40, err[-2000:]
    # resume with ONE process: the global batch is the same, so the run is too
    done = subprocess.run([sys.executable, "-m", "cnf", "train", "--resume", str(out),
                           "--no-progress"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    _same_run(out, one_process)


@pytest.mark.slow  # torchrun and whole runs: about a minute each on 2 cores
def test_a_killed_process_ends_the_job_within_bounded_time(tmp_path: Path) -> None:
    out = tmp_path / "job"
    flags = [*FLAGS[:3], "400", *FLAGS[4:]]  # long enough to be killed in the middle
    job = subprocess.Popen(_torchrun("train", *flags, "--out", str(out)), text=True,
                           stderr=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "last.pt").exists():
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split()]
    assert len(pids) == 2, workers
    os.kill(pids[-1], signal.SIGKILL)
    start = time.time()
    job.communicate(timeout=150)
    assert job.returncode != 0 and time.time() - start < 120
    assert load_checkpoint(out / "last.pt")["iteration"] >= 10  # intact


PACKAGE = Path(cnf.__file__).resolve().parent


def _our_frames(stderr: str) -> list[str]:
    """The traceback frames in ``stderr`` that are in the package's own files: by the files'
    location, not by a name in their path (a checkout may itself be called cnf)."""
    frames = re.findall(r'^\s*File "([^"]+)", line \d+', stderr, flags=re.MULTILINE)
    return [f for f in frames if Path(f).resolve().is_relative_to(PACKAGE)]


@pytest.mark.parametrize(
    ("extra", "word"),
    [
        (["--batch-size", "63"], "--batch-size 63 does not divide among 2 processes"),
        (["--device", "cuda"], "CUDA is not available"),
    ],
)
def test_bad_setups_are_one_line_not_a_hang(tmp_path: Path, extra: list, word: str) -> None:
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run(_torchrun("train", *FLAGS, *extra, "--out", str(tmp_path / "x")),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("cnf train:")]
    assert len(ours) == 1 and word in ours[0], done.stderr[-2000:]
    assert not _our_frames(done.stderr), done.stderr[-2000:]  # torchrun prints its own summary
    assert not (tmp_path / "x").exists()
