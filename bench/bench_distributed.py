"""Distributed training throughput: iterations and samples per second against the number of
processes, through ``torchrun -m cnf train`` itself.

    python bench/bench_distributed.py                  # CPU, gloo: 1 and 2 processes
    python bench/bench_distributed.py --gpu --procs 1 2 4 8   # one GPU per process, nccl

Each row is one ``torchrun --standalone --nproc_per_node=N -m cnf train`` of a fixed global
batch; the rate is rank 0's iterations over the iterations' own time (``log.jsonl``: evaluation
and start-up excluded). The scaling efficiency is ``(samples/s with N) / (N x samples/s with
1)``. Models: the 2-D toy (8gaussians, the default field and solver, exact trace) and the
multiscale image preset (digits, ``--objective mle``, Hutchinson); on a GPU, Fashion-MNIST with
FFJORD's configuration. On a CPU the processes share the machine's cores (torchrun sets one
thread each), so two processes on two cores gain at most what the second core adds, minus the
gradient all-reduce. The rates are of wall time (throughput); "CPU s" is the CPU time of the
whole torchrun job, all processes, start-up and evaluation included.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import harness
import torch
from harness import Column

from cnf.runs import read_log

COLUMNS = [
    Column("model", "model"),
    Column("procs", "processes"),
    Column("batch", "global batch"),
    Column("rate", "it/s", "{:.2f}", "it/s", "rank 0's iterations over their own wall time"),
    Column("samples", "samples/s", "{:.0f}", "samples/s"),
    Column("efficiency", "scaling efficiency", "{:.0%}", about="samples/s over N x 1 process's"),
    Column("cpu", "CPU s", "{:.0f}", "s", "CPU time of the whole job, every process"),
]

MODELS = {
    "cpu": {
        "toy 8gaussians": ["--data", "8gaussians", "--batch-size", "512", "--iters", "60"],
        "image digits": [
            "--data",
            "digits",
            "--objective",
            "mle",
            "--batch-size",
            "64",
            "--iters",
            "30",
        ],
    },
    "gpu": {
        "toy 8gaussians": ["--data", "8gaussians", "--batch-size", "4096", "--iters", "100"],
        "image fashion-mnist": [
            "--data",
            "fashion-mnist",
            "--objective",
            "mle",
            "--batch-size",
            "256",
            "--iters",
            "20",
            "--hidden",
            "64,64,64",
            "--blocks",
            "2",
            "--method",
            "rk4",
            "--step-size",
            "0.25",
        ],
    },
}


def run(flags: list[str], procs: int, device: str) -> float:
    """Iterations per second of rank 0 over the iterations' own wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        iters = int(flags[flags.index("--iters") + 1])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={procs}", "-m", "cnf", "train", *flags, "--out", str(out),
               "--device", device, "--eval-every", str(iters), "--test-size", "100",
               "--validity-size", "20", "--no-adapt", "--no-progress"]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
        rows = read_log(out / "log.jsonl").rows  # a row per interval, its seconds summed
        rows = rows[len(rows) // 5 :]  # after the warm-up
        return sum(r.get("iters", 1) for r in rows) / sum(r["time"] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--gpu", action="store_true", help="one GPU per process (nccl)")
    harness.add_arguments(parser)
    args = parser.parse_args()
    results = harness.start(__file__, parser, args)
    if args.gpu and torch.cuda.device_count() < max(args.procs):
        parser.error(f"--gpu with {max(args.procs)} processes needs as many GPUs")
    device, kind = ("cuda", "gpu") if args.gpu else ("cpu", "cpu")
    name = torch.cuda.get_device_name() if args.gpu else "CPU, one thread per process"
    print(f"torch {torch.__version__}; {name}")
    rows = []
    for model, flags in MODELS[kind].items():
        batch = int(flags[flags.index("--batch-size") + 1])
        base = None
        for procs in args.procs:
            with harness.timed() as t:
                rate = run(flags, procs, device)
            base = base or rate * batch / procs
            rows.append(dict(model=model, procs=procs, batch=batch, rate=rate,
                             samples=rate * batch, efficiency=rate * batch / (procs * base),
                             cpu=t.cpu))  # fmt: skip
            print(f"  {model}, {procs} process(es): {rate:.2f} it/s", file=sys.stderr, flush=True)
    results.table("scaling", f"torchrun -m cnf train, {name}", COLUMNS, rows)
    results.write()


if __name__ == "__main__":
    main()
