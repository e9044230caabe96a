"""Toy-density quality: the default `cnf train` on each 2-D dataset, timed, with test NLL and KL.

    python bench/bench_toy.py                       # all 8 datasets (about 40 minutes on 2 cores)
    python bench/bench_toy.py --data 8gaussians checkerboard

Each dataset runs `cnf train --data NAME` with the default configuration in a fresh process (rk4
with Ott et al.'s step adaptation, exact trace, batch 512, lr 5e-3, RNODE penalties 0.01) and
reports the training time, the test NLL on 20,000 fresh samples under the evaluation solver
(dopri5 at atol = rtol = 1e-7), its standard error, the true entropy and KL = NLL - H where the
density is known, and the solver validity verdict. Runs are kept in --runs for the figures
(examples/toy_figures.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from cnf.data.toy import TOY


def run(name: str, runs: Path, extra: list[str]) -> dict:
    out = runs / name
    cmd = [sys.executable, "-m", "cnf", "train", "--data", name, "--out", str(out), "--force",
           "--no-progress", *extra]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    report = json.loads((out / "report.json").read_text())
    train_s = sum(r["time"] for r in rows)
    train_nfe = sum(r["nfe"] for r in rows) / len(rows)
    return dict(name=name, iters=len(rows), train_s=train_s, wall_s=wall, train_nfe=train_nfe,
                **report)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=list(TOY))
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-toy"))
    parser.add_argument("extra", nargs="*", help="extra `cnf train` flags, after --")
    args = parser.parse_args()
    print(f"torch {torch.__version__}; `cnf train --data NAME` defaults {' '.join(args.extra)}")
    print(
        "\n| dataset | iters | train time | NLL (nats) | ± SE | entropy | KL | valid "
        "| train NFE | eval NFE |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for name in args.data:
        r = run(name, args.runs, args.extra)
        entropy = f"{r['entropy']:.3f}" if "entropy" in r else "-"
        kl = f"{r['kl']:.3f}" if "kl" in r else "-"
        valid = "yes" if r["validity"]["valid"] else "NO"
        cells = [
            name,
            r["iters"],
            f"{r['train_s'] / 60:.1f} min",
            f"{r['nll']:.3f}",
            f"{r['nll_se']:.3f}",
            entropy,
            kl,
            valid,
            f"{r['train_nfe']:.0f}",
            r["nfe"],
        ]
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
