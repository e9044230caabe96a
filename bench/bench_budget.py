"""What a user waits for: the whole ``cnf train`` command's CPU seconds, split into training,
validation, the report and the rest (start-up, the budget's timing, the figures), and the KL
it reaches, against a plain flow-matching baseline trained the way the peers' toy examples
train, for the same CPU seconds.

    python bench/bench_budget.py                     # the quick start, then --budget 30..240
    python bench/bench_budget.py --parts quickstart  # cnf train --data 8gaussians alone
    python bench/bench_budget.py --budgets 30 60 --data 8gaussians --objectives recipe fm
    python bench/bench_budget.py --quick             # a smoke run (seconds)

Every run is a ``cnf train ... --threads 1`` subprocess, as a user runs it (report and figures
included); its CPU seconds are the child process's (user + system), its training and
validation seconds the sums of ``log.jsonl``'s ``cpu`` and ``val_cpu``, its report's those of
``report.json``'s ``cost``. ``--objectives``: ``recipe`` is ``cnf train --budget B`` as it is
(flow matching, then maximum likelihood), ``fm`` and ``mle`` add ``--objective``.

The baseline is Meta's flow_matching and TorchCFM's toy recipe: an MLP 64-64-64 with SiLU and
the time concatenated to its input (``cnf.CNF(2, mlp="concat")``), Adam at 1e-3, batch 512,
the independent coupling, a bare loop in this process on one thread, for as many CPU seconds of
training as the cnf command's whole budget, with no validation. Both are scored by the float64
evaluator of ``bench/bench_objectives.py`` (exact trace, dopri5 at 1e-7, the same 10,000 seeded
test points): KL = mean of ``log p_true - log q``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import torch
from bench_objectives import kl
from harness import Column

from cnf import CNF
from cnf.data import get_dataset
from cnf.runs import load_run
from cnf.runtime import to_tensors

OBJECTIVES = {"recipe": [], "fm": ["--objective", "fm"], "mle": ["--objective", "mle"]}
COLUMNS = [
    Column("data", "dataset"),
    Column("command", "command"),
    Column("whole", "whole CPU s", "{:.1f}", "s", "the cnf train process, user + system"),
    Column("of_budget", "/ budget", "{:.2f}", about="whole CPU over --budget"),
    Column("training", "training", "{:.1f}", "s", "log.jsonl's cpu, summed"),
    Column("validation", "validation", "{:.1f}", "s", "log.jsonl's val_cpu, summed"),
    Column("report", "report", "{:.1f}", "s", "report.json's cost, summed"),
    Column("other", "other", "{:.1f}", "s", "start-up, the budget's timing, the figures"),
    Column("report_share", "report / training", "{:.2f}"),
    Column("kl", "KL", "{:.4f}", "nats", "the float64 evaluator's"),
    Column("baseline", "baseline KL", "{:.4f}", "nats", "plain flow matching, same CPU s"),
]


def children_cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def run_cnf(data: str, extra: list[str], out: Path, smoke: bool) -> dict:
    """``cnf train`` as a user runs it; its CPU seconds, split, and its best model."""
    argv = [sys.executable, "-m", "cnf", "train", "--data", data, "--threads", "1", "--out",
            str(out), "--no-progress", *extra]  # fmt: skip
    if smoke:
        argv += ["--hidden", "8", "--test-size", "500", "--validity-size", "100"]
    before = children_cpu()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    whole = children_cpu() - before
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    report = json.loads((out / "report.json").read_text())
    split = dict(training=sum(r.get("cpu", 0.0) for r in rows),
                 validation=sum(r.get("val_cpu", 0.0) for r in rows),
                 report=sum(report.get("cost", {}).values()))  # fmt: skip
    split["other"] = whole - sum(split.values())
    return dict(whole=whole, **split, model=load_run(out / "best.pt").model)


def baseline(data_name: str, seconds: float, smoke: bool) -> torch.nn.Module:
    """The peers' toy recipe for ``seconds`` of training CPU (a bare loop, one thread)."""
    torch.manual_seed(0)
    hidden = (8,) if smoke else (64, 64, 64)
    model = CNF(2, mlp="concat", hidden=hidden, activation="silu")
    field = model.ode_blocks()[0].field
    data = get_dataset(data_name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    start, it = time.process_time(), 0
    while time.process_time() - start < seconds:
        it += 1
        x, _ = to_tensors(data.train_batch(512, it), torch.device("cpu"), torch.float32)
        z = torch.randn(x.shape, generator=gen)
        t = torch.rand(len(x), 1, generator=gen)  # data at t = 0, noise at t = 1, as cnf's
        loss = (field(t, t * z + (1 - t) * x) - (z - x)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["quickstart", "budgets"],
                        choices=["quickstart", "budgets"])  # fmt: skip
    parser.add_argument("--data", nargs="+", default=["8gaussians", "checkerboard"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[30, 60, 120, 240])
    parser.add_argument("--objectives", nargs="+", default=["recipe"], choices=list(OBJECTIVES))
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline's runs")
    parser.add_argument("--n", type=int, default=10_000, help="test points of the evaluator")
    parser.add_argument("--quick", action="store_true", help="tiny fields, 2 s budgets")
    harness.add_arguments(parser)
    args = parser.parse_args()
    results = harness.start(__file__, parser, args, smoke=args.quick)
    if args.quick:
        args.budgets, args.n, args.data = [2.0], 500, args.data[:1]
    results.settings.update(budgets=args.budgets, n=args.n)
    torch.set_num_threads(1)
    runs = [("8gaussians", "cnf train --data 8gaussians", [], None)] * ("quickstart" in args.parts)
    if "budgets" in args.parts:
        runs += [(d, f"--budget {b:g}" + (f" --objective {o}" if o != "recipe" else ""),
                  ["--budget", f"{b:g}", *OBJECTIVES[o]], b)
                 for d in args.data for o in args.objectives for b in args.budgets]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (data, command, extra, budget) in enumerate(runs):
            if args.quick and budget is None:
                extra = ["--iters", "200", "--objective", "fm", "--finetune-iters", "5"]
            out = run_cnf(data, extra, Path(tmp) / f"run{k}", args.quick)
            row = dict(data=data, command=command, **{k: v for k, v in out.items() if k != "model"})
            row["of_budget"] = None if budget is None else out["whole"] / budget
            row["report_share"] = out["report"] / max(out["training"], 1e-9)
            row["kl"] = kl(out["model"], data, args.n)
            if not args.no_baseline:
                row["baseline"] = kl(baseline(data, budget or out["whole"], args.quick), data,
                                     args.n)  # fmt: skip
            rows.append(row)
            print("  " + ", ".join(f"{c.key} {harness.format_cell(c, row.get(c.key))}"
                                   for c in COLUMNS), file=sys.stderr, flush=True)  # fmt: skip
    results.table("budget", "The whole cnf train command (one thread), CPU seconds by phase, "
                  "and the KL it reaches against plain flow matching for the same seconds",
                  COLUMNS, rows)  # fmt: skip
    results.write()


if __name__ == "__main__":
    main()
