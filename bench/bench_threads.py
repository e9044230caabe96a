"""CPU threads by model size: calls per second with one thread, torch's default, and cnf's rule,
on the machine as found and beside a busy process.

    python bench/bench_threads.py                 # 5 s of each job
    python bench/bench_threads.py --seconds 2     # quicker, noisier
    python bench/bench_threads.py --quick         # a smoke run

Each job is a fresh process doing what a command does with the model that ``cnf train --data
NAME`` builds (its preset, untrained): a training iteration (``cnf train``) or the log-density
of a batch under the model's evaluation solver (``cnf eval``). It runs at ``--threads`` 1, at
torch's default (as many threads as cores), and at 0, cnf's rule (one thread up to 16
dimensions; above, as many as the machine has idle cores when the job starts), on the machine
as found (its load is in the results' header) and with a process spinning on one core besides,
as another user's job would. The rates are of wall time, on purpose: what a job loses to the
other is the point.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import harness
import torch
from harness import Column

from cnf.runtime import to_tensors
from cnf.training import setup
from cnf.training.config import TrainConfig
from cnf.training.loop import step

# (name, dataset, what): what a command does with the model of that dataset's preset
JOBS = [
    ("toy train", "8gaussians", "train"),  # maximum likelihood, exact trace (--objective mle)
    ("toy eval", "8gaussians", "eval"),
    ("table train", "breast_cancer", "train"),
    ("image train", "digits", "train"),
    ("image eval", "digits", "eval"),
]
EVAL_ROWS = {"toy": 512, "tabular": 512, "image": 16}
COLUMNS = [
    Column("job", "job"),
    Column("dim", "dim"),
    Column(
        "machine",
        "machine",
        about="as found (its load in the header), or with a process spinning on one core besides",
    ),
    Column("one", "1 thread", "{:.2f}", "calls/s"),
    Column("default", "torch's default", "{:.2f}", "calls/s", "as many threads as cores"),
    Column("rule", "cnf's rule", "{:.2f}", "calls/s", "--threads 0"),
    Column("chose", "threads chosen", about="by the rule"),
    Column("rule_vs_one", "rule / 1 thread", "{:.2f}"),
]


def child(data: str, what: str, threads: int, seconds: float, quick: bool) -> None:
    given = dict(objective="mle") if data == "8gaussians" else {}
    if quick:
        given.update(hidden=(8,), batch_size=16)
    cfg = TrainConfig.for_data(data, threads=threads, **given)
    run = setup(cfg)  # applies --threads
    p = next(run.model.parameters())
    if what == "eval":
        rows = run.data.validation()[: EVAL_ROWS[run.data.kind]]
        x, _ = to_tensors(rows, p.device, p.dtype)

        def call(i: int) -> None:
            with torch.no_grad():
                run.model.log_prob(x, solver=run.model.eval_solver)
    else:

        def call(i: int) -> None:
            x, c = to_tensors(run.data.train_batch(cfg.batch_size, i), p.device, p.dtype)
            step(run.state, run.objective, x, cfg, context=c)

    call(1)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 2:
        n += 1
        call(n + 1)
    rate = n / (time.perf_counter() - start)
    print(json.dumps({"rate": rate, "threads": torch.get_num_threads(), "dim": run.model.dim}))


def job(data: str, what: str, threads: int, seconds: float, busy: bool, quick: bool) -> dict:
    spin = None
    if busy:  # another user's job, started before this one as it would be
        spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
    try:
        argv = [sys.executable, __file__, "--child", data, what, str(threads), "--seconds",
                str(seconds), *(["--quick"] if quick else [])]  # fmt: skip
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="wall seconds of each job")
    parser.add_argument(
        "--quick", action="store_true", help="the toy's training alone, tiny, 0.5 s"
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    harness.add_arguments(parser)
    args = parser.parse_args()
    if args.child:
        data, what, threads = args.child
        child(data, what, int(threads), args.seconds, args.quick)
        return
    seconds = 0.5 if args.quick else args.seconds
    results = harness.start(__file__, parser, args, smoke=args.quick)
    cores = torch.get_num_threads()
    rows = []
    for name, data, what in JOBS[:1] if args.quick else JOBS:
        for busy in (False, True):
            seen = {t: job(data, what, t, seconds, busy, args.quick) for t in (1, cores, 0)}
            one, rule = seen[1]["rate"], seen[0]["rate"]
            machine = "+ busy process" if busy else "as found"
            row = dict(job=name, dim=seen[1]["dim"], machine=machine,
                       one=one, default=seen[cores]["rate"], rule=rule,
                       chose=seen[0]["threads"], rule_vs_one=rule / one)  # fmt: skip
            rows.append(row)
            print(harness.format_table(COLUMNS, [row]).splitlines()[-1], file=sys.stderr,
                  flush=True)  # fmt: skip
    results.table("threads", f"Calls per second (wall) of each job, {seconds:g} s each; "
                  f"torch's default here: {cores} threads", COLUMNS, rows)  # fmt: skip
    results.write()


if __name__ == "__main__":
    main()
