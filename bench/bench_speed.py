"""What a user waits for and what the engine costs: the whole ``cnf train`` command's CPU
seconds, split into training, validation, the report and the rest, with the KL it reaches
against the peers' plain flow matching for the same seconds; and the CPU milliseconds per
iteration of ``cnf.training.fit`` against a bare loop on the same model.

    python bench/bench_speed.py                     # all three parts on 8gaussians (~25 min)
    python bench/bench_speed.py --parts engine      # the engine against a bare loop (~4 min)
    python bench/bench_speed.py --parts quickstart  # cnf train --data 8gaussians alone
    python bench/bench_speed.py --parts budgets --data checkerboard
    python bench/bench_speed.py --budgets 30 60 --objectives recipe fm
    python bench/bench_speed.py --quick             # a smoke run (seconds)

**The quick start and the budgets** (``--parts quickstart budgets``). Every run is a
``cnf train ... --threads 1`` subprocess, as a user runs it (report and figures included); its
CPU seconds are the child process's (user + system), its training and validation seconds the
sums of ``log.jsonl``'s ``cpu`` and ``val_cpu``, its report's those of ``report.json``'s
``cost`` (each part, with the rows it solved, under "report's parts"); "other" is the rest
(start-up, a table's ``--log-columns auto`` pilot, the budget's timing, the figures).
``--objectives``: ``recipe`` is ``cnf train --budget B`` as it is (flow matching, then maximum
likelihood), ``fm`` and ``mle`` add ``--objective``; ``--data`` picks the toys, or tables
(``--data wine diabetes``: their test NLL instead of a KL, and no baseline). "ended" says what
ended the training: its planned iterations, its share of the budget spent (``deadline``), or the
validation NLL's ``--patience`` (a table's recipe stops early: its run ends under budget), in
the last phase or the first (whose unspent iterations are then not trained).

The baseline is Meta's flow_matching and TorchCFM's toy recipe: an MLP 64-64-64 with SiLU and
the time concatenated to its input (``cnf.CNF(2, mlp="concat")``), Adam at 1e-3, batch 512,
the independent coupling, a bare loop in this process on one thread, for as many CPU seconds of
training as the cnf command's whole budget, with no validation. Both are scored by the float64
evaluator of ``bench/bench_objectives.py`` (exact trace, dopri5 at 1e-7, the same 10,000 seeded
test points): KL = mean of ``log p_true - log q``.

**The engine** (``--parts engine``, on 8gaussians, in this process on one thread) is everything
``fit`` does around the objective's loss and the optimizer's step: the batch of ``(seed,
iteration)``, the probes' generator, clipping the gradient and checking it is finite, the
schedule, the log row's numbers, the phase and stop checks, the progress bar (off here). The
bare loop is what the peers' toy examples run: ``AdamW`` at torch's defaults on the same model,
a batch from the same dataset, the same loss (flow matching: the regression written out,
``x_t = t z + (1 - t) x`` against ``z - x``; maximum likelihood: the objective's own ``loss``,
the same solver and RNODE penalties), backward, step. Each side runs ``--short`` and ``--long``
iterations from a fresh model, and the row reports the difference's CPU seconds per iteration
(the marginal cost: a run's one-off costs, the final validation among them, cancel), the median
over ``--repeats`` alternating rounds. Maximum likelihood runs with a fixed step
(``--no-adapt``, the step Hairer's rule starts from), so that both sides solve with the same
solver; the adapter's own checks (every 25 iterations by default) are the training recipe's,
priced by the budgets' rows rather than here.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
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
from cnf.data import dataset_kind, get_dataset
from cnf.runs import load_run
from cnf.runtime import to_tensors
from cnf.training import TrainConfig, fit, setup

PARTS = ("engine", "quickstart", "budgets")
OBJECTIVES = {"recipe": [], "fm": ["--objective", "fm"], "mle": ["--objective", "mle"]}
ENGINE = {
    "fm": dict(objective="fm", activation="silu", lr=5e-3, batch_size=512),
    "mle": dict(objective="mle", adapt=False, batch_size=512),
}
LENGTHS = {"fm": (500, 4000), "mle": (5, 25)}  # (short, long) where --short/--long are not given
ENGINE_COLUMNS = [
    Column("objective", "objective"),
    Column("bare", "bare loop ms/it", "{:.2f}", "ms", "a loop of loss, backward, AdamW step"),
    Column("engine", "fit ms/it", "{:.2f}", "ms", "cnf.training.fit, the same model and loss"),
    Column("ratio", "fit / bare", "{:.2f}x", about="the engine's cost over the work it drives"),
    Column("rounds", "per round (fit / bare)", about="each round's ratio"),
]


def config(objective: str, iters: int) -> TrainConfig:
    return TrainConfig.for_data("8gaussians", **ENGINE[objective], iters=iters,
                                eval_every=10**9, threads=1, device="cpu", seed=0)  # fmt: skip


def bare(objective: str, iters: int) -> float:
    """CPU seconds of ``iters`` iterations of the bare loop."""
    run = setup(config(objective, iters))
    model, data, loss_of = run.model, run.data, run.objective.loss
    field = model.ode_blocks()[0].field
    opt = torch.optim.AdamW(model.parameters(), lr=run.cfg.lr)
    gen = torch.Generator().manual_seed(0)
    start = time.process_time()
    for it in range(1, iters + 1):
        x, _ = to_tensors(data.train_batch(run.cfg.batch_size, it), torch.device("cpu"),
                          torch.float32)  # fmt: skip
        if objective == "fm":
            z = torch.randn(x.shape, generator=gen)
            t = torch.rand(len(x), 1, generator=gen)
            loss = (field(t, t * z + (1 - t) * x) - (z - x)).square().mean()
        else:
            loss, _ = loss_of(model, x, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.process_time() - start


def engine(objective: str, iters: int) -> float:
    """CPU seconds of ``fit`` for ``iters`` iterations (one final validation included)."""
    run = setup(config(objective, iters))
    start = time.process_time()
    fit(run.state, run.data, run.objective, run.cfg, progress=False, quiet=True)
    return time.process_time() - start


def marginal(measure, objective: str, short: int, long: int) -> float:
    """Milliseconds per iteration between a short and a long run."""
    return (measure(objective, long) - measure(objective, short)) / (long - short) * 1e3


REPORT_PARTS = ("CPU s of the validity check (on its rows), the evaluation solver's choice and "
                "the test NLL (on its rows)")  # fmt: skip
BUDGET_COLUMNS = [
    Column("data", "dataset"),
    Column("command", "command"),
    Column("whole", "whole CPU s", "{:.1f}", "s", "the cnf train process, user + system"),
    Column("of_budget", "/ budget", "{:.2f}", about="whole CPU over --budget"),
    Column("training", "training", "{:.1f}", "s", "log.jsonl's cpu, summed"),
    Column("validation", "validation", "{:.1f}", "s", "log.jsonl's val_cpu, summed"),
    Column("report", "report", "{:.1f}", "s", "report.json's cost, summed"),
    Column("other", "other", "{:.1f}", "s", "start-up, the budget's timing, the figures"),
    Column("report_share", "report / training", "{:.2f}"),
    Column("report_parts", "report's parts", about=REPORT_PARTS),
    Column("ended", "ended", about="iterations, deadline or patience"),
    Column("kl", "KL", "{:.4f}", "nats", "the float64 evaluator's"),
    Column("nll", "test NLL", "{:.3f}", "nats", "a table's, from report.json"),
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
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    said = done.stderr  # what ended the training is said there (cnf.training.loop's words)
    if done.returncode:
        sys.exit(f"{' '.join(argv)} failed ({done.returncode}):\n{said}")
    whole = children_cpu() - before
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    report = json.loads((out / "report.json").read_text())
    split = dict(training=sum(r.get("cpu", 0.0) for r in rows),
                 validation=sum(r.get("val_cpu", 0.0) for r in rows),
                 report=sum(report.get("cost", {}).values()))  # fmt: skip
    split["other"] = whole - sum(split.values())
    ended = ("deadline" if "CPU s are spent" in said else
             "patience" if "early stop at iteration" in said else "iterations")  # fmt: skip
    if "(--patience):" in said:  # a first phase stopped early, and the next began
        ended = f"first phase's patience, then {ended}"
    cost, checked = report.get("cost", {}), report.get("validity") or {}
    parts = (f"validity {cost.get('validity check', 0):.1f} ({checked.get('n', 0):,} rows), "
             f"solver {cost.get('evaluation solver', 0):.1f}, "
             f"NLL {cost.get('test NLL', 0):.1f} ({report.get('n', 0):,} rows)")  # fmt: skip
    model = load_run(out / "best.pt").model
    return dict(whole=whole, **split, report_parts=parts, ended=ended, nll=report["nll"],
                model=model)  # fmt: skip


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


def engine_rows(args, parser) -> list[dict]:
    rows = []
    for objective in ENGINE:
        short, long = LENGTHS[objective]
        short, long = args.short or short, args.long or long
        if long <= short:
            parser.error(f"--long {long} must be more than --short {short}")
        pairs = []
        for _ in range(args.repeats):
            pairs.append((marginal(engine, objective, short, long),
                          marginal(bare, objective, short, long)))  # fmt: skip
            print(f"  {objective}: fit {pairs[-1][0]:.2f} ms/it, bare {pairs[-1][1]:.2f}",
                  file=sys.stderr, flush=True)  # fmt: skip
        fit_ms = statistics.median(p[0] for p in pairs)
        bare_ms = statistics.median(p[1] for p in pairs)
        rows.append(dict(objective=objective, bare=bare_ms, engine=fit_ms, ratio=fit_ms / bare_ms,
                         rounds=", ".join(f"{f / b:.2f}" for f, b in pairs)))  # fmt: skip
    return rows


def budget_rows(args) -> list[dict]:
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
            row = dict(data=data, command=command,
                       **{k: v for k, v in out.items() if k not in ("model", "nll")})  # fmt: skip
            row["of_budget"] = None if budget is None else out["whole"] / budget
            row["report_share"] = out["report"] / max(out["training"], 1e-9)
            toy = dataset_kind(data) == "toy"
            row["kl"], row["nll"] = (kl(out["model"], data, args.n), None) if toy else (
                None, out["nll"])  # fmt: skip
            if toy and not args.no_baseline:
                row["baseline"] = kl(baseline(data, budget or out["whole"], args.quick), data,
                                     args.n)  # fmt: skip
            rows.append(row)
            cells = (f"{c.key} {harness.format_cell(c, row.get(c.key))}" for c in BUDGET_COLUMNS)
            print("  " + ", ".join(cells), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--data", nargs="+", default=["8gaussians"],
                        help="the budgets' toys or tables")  # fmt: skip
    parser.add_argument("--budgets", nargs="+", type=float, default=[30, 60, 120, 240])
    parser.add_argument("--objectives", nargs="+", default=["recipe"], choices=list(OBJECTIVES),
                        help="the budgets' objectives")  # fmt: skip
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline's runs")
    parser.add_argument("--n", type=int, default=10_000, help="test points of the evaluator")
    parser.add_argument("--repeats", type=int, default=5, help="the engine's alternating rounds")
    parser.add_argument("--short", type=int, help="iterations of the engine's short runs")
    parser.add_argument("--long", type=int, help="iterations of the engine's long runs")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: tiny fields, 2 s budgets, 2 and 4 engine iterations",
    )
    harness.add_arguments(parser)
    args = parser.parse_args()
    results = harness.start(__file__, parser, args, smoke=args.quick)
    if args.quick:
        args.budgets, args.n, args.data = [2.0], 500, args.data[:1]
        args.repeats, args.short, args.long = 1, 2, 4
    results.settings.update(budgets=args.budgets, n=args.n)
    torch.set_num_threads(1)
    if "engine" in args.parts:
        results.table("engine", "CPU ms per iteration on 8gaussians (batch 512, one thread), "
                      f"the median of {args.repeats} rounds", ENGINE_COLUMNS,
                      engine_rows(args, parser))  # fmt: skip
    if {"quickstart", "budgets"} & set(args.parts):
        results.table("budget", "The whole cnf train command (one thread), CPU seconds by "
                      "phase, and the KL it reaches against plain flow matching for the same "
                      "seconds (a table: its test NLL)", BUDGET_COLUMNS,
                      budget_rows(args))  # fmt: skip
    results.write()


if __name__ == "__main__":
    main()
