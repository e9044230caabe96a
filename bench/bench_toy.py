"""Toy-density quality: `cnf train --objective mle` on each 2-D dataset, timed, with test NLL and
KL.

    python bench/bench_toy.py                       # all 8 datasets (about 40 minutes on 2 cores)
    python bench/bench_toy.py --data 8gaussians checkerboard

Each dataset runs `cnf train --data NAME --objective mle` in a fresh process (maximum likelihood
alone: 3,000 iterations, rk4 with Ott et al.'s step adaptation, exact trace, batch 512, lr 5e-3,
RNODE penalties 0.01) and reports the training time, the report's test NLL (fresh samples under
the evaluation solver), its standard error, the true entropy and KL = NLL - H where the density
is known, and the solver validity verdict. "train min" is the iterations' own wall time
(``log.jsonl``), "CPU s" the CPU time of the whole ``cnf train`` process (evaluation included).
Runs are kept in --runs for the figures (examples/toy_figures.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import harness
import torch
from harness import Column

from cnf.data.toy import TOY
from cnf.runs import read_log

COLUMNS = [
    Column("dataset", "dataset"),
    Column("iters", "iters"),
    Column("train_min", "train min", "{:.1f}", "min", "the training iterations' own wall time"),
    Column("cpu_s", "CPU s", "{:.0f}", "s", "CPU time of the whole cnf train process"),
    Column("nll", "NLL (nats)", "{:.3f}", "nats", "test NLL on 20,000 fresh samples"),
    Column("nll_se", "± SE", "{:.3f}", "nats", "its standard error"),
    Column("entropy", "entropy", "{:.3f}", "nats", "the true density's entropy, where known"),
    Column("kl", "KL", "{:.3f}", "nats", "NLL - entropy"),
    Column("valid", "valid", about="the solver validity verdict"),
    Column("train_nfe", "train NFE", "{:.0f}", about="mean forward NFE per training iteration"),
    Column("eval_nfe", "eval NFE", about="forward NFE of the evaluation"),
]


def run(name: str, runs: Path, extra: list[str]) -> dict:
    out = runs / name
    cmd = [sys.executable, "-m", "cnf", "train", "--data", name, "--out", str(out), "--force",
           "--no-progress", "--objective", "mle", *extra]  # fmt: skip
    with harness.timed() as t:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    log = read_log(out / "log.jsonl")  # a row per interval: its seconds summed, NFE averaged
    r = json.loads((out / "report.json").read_text())
    return dict(dataset=name, iters=log.iterations, train_min=log.total("time") / 60,
                cpu_s=t.cpu, nll=r["nll"], nll_se=r["nll_se"], entropy=r.get("entropy"),
                kl=r.get("kl"), valid=r["validity"]["valid"], train_nfe=log.mean("nfe"),
                eval_nfe=r["nfe"])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=list(TOY))
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-toy"))
    parser.add_argument("extra", nargs="*", help="extra `cnf train` flags, after --")
    harness.add_arguments(parser)
    args = parser.parse_args()
    results = harness.start(__file__, parser, args, ignore=("runs",))
    train = " ".join(["cnf train --data NAME", *args.extra])
    print(f"torch {torch.__version__}; `{train}`")
    rows = []
    for name in args.data:
        rows.append(run(name, args.runs, args.extra))
        print(f"  {name}: NLL {rows[-1]['nll']:.3f}, {rows[-1]['cpu_s']:.0f} CPU s",
              file=sys.stderr, flush=True)  # fmt: skip
    results.table("toy", f"`{train}`, one run at a time", COLUMNS, rows)
    results.write()


if __name__ == "__main__":
    main()
