"""CPU threads for small CNFs: iterations per second with 1 or 2 threads, alone and shared.

    python bench/bench_threads.py              # 60 timed iterations per job
    python bench/bench_threads.py --iters 20   # fewer

One training iteration of the default 2-D CNF (ConcatSquash MLP 64-64-64, exact trace, rk4 with 8
steps, batch 512), timed in fresh processes: one job alone, then two identical jobs at once (a
shared machine: two runs, or a run beside other work). The rates are of wall time, on purpose:
what two jobs at once lose to each other is the point. The trainer's ``--threads 0`` (automatic)
picks from this table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import harness
import torch
from harness import Column

from cnf import CNF, Solver

COLUMNS = [
    Column("threads", "threads per job"),
    Column("alone", "it/s, one job alone", "{:.2f}", "it/s"),
    Column("shared", "it/s per job, two jobs at once", "{:.2f}", "it/s", "mean of the two jobs"),
]


def child(threads: int, iters: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    flow = CNF(2, solver=Solver("rk4", step_size=0.125))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    x = torch.randn(512, 2)
    for i in range(iters + 5):
        if i == 5:  # warm-up done
            start = time.perf_counter()
        opt.zero_grad()
        (-flow.log_prob(x).mean()).backward()
        opt.step()
    print(iters / (time.perf_counter() - start))


def spawn(threads: int, iters: int, jobs: int) -> list[float]:
    cmd = [sys.executable, __file__, "--child", str(threads), "--iters", str(iters)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
    return [float(p.communicate()[0]) for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    harness.add_arguments(parser)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.iters)
        return
    results = harness.start(__file__, parser, args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} cores available")
    rows = []
    for threads in (1, 2):
        alone = spawn(threads, args.iters, 1)[0]
        shared = spawn(threads, args.iters, 2)
        rows.append(dict(threads=threads, alone=alone, shared=sum(shared) / 2))
        print(f"  {threads} thread(s): {alone:.2f} it/s alone", file=sys.stderr, flush=True)
    results.table("threads", f"One training iteration of the default 2-D CNF, {args.iters} "
                  "iterations per job", COLUMNS, rows)  # fmt: skip
    results.write()


if __name__ == "__main__":
    main()
