"""KL to the truth against training time, per objective: what each way of training gives for a
budget, on the 2-D toys with a known density.

    python bench/bench_objectives.py                        # 3 datasets x 4 systems x 4 budgets
    python bench/bench_objectives.py --budgets 30 60 --data 8gaussians
    python bench/bench_objectives.py --fields concatsquash concat --systems fm fm+mle
    python bench/bench_objectives.py --quick                # a smoke run (seconds)

Each row trains from scratch, in this process, on one thread, with the same field (ConcatSquash
MLP 64-64-64, or each of ``--fields``, the model's ``--mlp``: ``concat`` is the plain MLP with
the time concatenated to its input once) through ``cnf.training`` (``setup``, the budget plan,
``fit``): the recipe that ``cnf train --budget B`` plans for B seconds of training, for each
system:

* ``mle``: maximum likelihood (the default recipe: rk4 with the adapted step, RNODE 0.01,
  lr 5e-3 cosine), its iterations planned for the budget;
* ``fm``: flow matching, independent coupling; ``fm-ot``: with the minibatch OT coupling (lr
  2e-3, cosine);
* ``fm+mle``: ``cnf train --budget B`` as it is (flow matching for half the budget, then
  maximum likelihood from the largest valid step for the other half).

Every model (the best by validation NLL, as ``cnf train`` keeps) is scored by one evaluator:
exact trace, dopri5 at atol = rtol = 1e-7 in float64, on the same 10,000 seeded test points;
KL = mean of ``log p_true - log q``. "CPU s" is the training CPU time actually spent
(the iterations' own, evaluations excluded). Writes the table, and the curves to
``--figure`` (figures/objectives.png).

First, what each field costs: CPU milliseconds of one flow-matching iteration (the objective's
loss, backward, an AdamW step; SiLU, as ``fm+mle`` trains) on 8gaussians at batch 512 on one
thread, the mean over 3 alternating rounds of 100 iterations after one round of warm-up.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import harness
import torch
from harness import Column

from cnf.data import get_dataset
from cnf.fields import MLPS
from cnf.runtime import to_tensors
from cnf.solvers import Solver
from cnf.training import KeepBest, TrainConfig, fit, setup
from cnf.training import budget as budgeting

SYSTEMS = {
    "mle": dict(objective="mle"),
    "fm": dict(objective="fm", finetune_share=0.0, lr=2e-3, eval_every=1000),
    "fm-ot": dict(objective="fm", coupling="ot", finetune_share=0.0, lr=2e-3, eval_every=1000),
    "fm+mle": {},  # cnf train --budget B as it is
}
EVALUATOR = Solver("dopri5", atol=1e-7, rtol=1e-7, max_nfe=200_000)
# the timed flow-matching iteration: bench/bench_speed.py's (the budget recipe's SiLU and lr)
TIMED = dict(objective="fm", activation="silu", lr=5e-3, batch_size=512)


def fm_round(field: str, iters: int) -> Callable[[], float]:
    """A function that runs ``iters`` flow-matching iterations of the field ``field`` (the
    model's ``mlp``) on batches drawn beforehand, and returns their CPU seconds."""
    cfg = TrainConfig.for_data("8gaussians", **TIMED, mlp=field, iters=iters, eval_every=10**9,
                               threads=1, device="cpu", seed=0)  # fmt: skip
    run = setup(cfg)
    opt = torch.optim.AdamW(run.model.parameters(), lr=cfg.lr)
    cpu = torch.device("cpu")
    batches = [to_tensors(run.data.train_batch(cfg.batch_size, it), cpu, torch.float32)[0]
               for it in range(iters)]  # fmt: skip
    gen = torch.Generator().manual_seed(0)

    def one_round() -> float:
        start = time.process_time()
        for x in batches:
            loss, _ = run.objective.loss(run.model, x, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.process_time() - start

    return one_round


def field_timings(fields: list[str], iters: int, rounds: int = 3) -> list[dict]:
    """Milliseconds per flow-matching iteration of each field: the mean over ``rounds``
    rounds of ``iters`` iterations, the fields alternating, after one round of warm-up."""
    timers = {field: fm_round(field, iters) for field in fields}
    for timer in timers.values():
        timer()
    spent = {field: 0.0 for field in fields}
    for _ in range(rounds):
        for field, timer in timers.items():
            spent[field] += timer()
    return [dict(field=f, ms=spent[f] / (rounds * iters) * 1e3, ratio=spent[f] / spent[fields[0]],
                 params=sum(p.numel() for p in MLPS[f](2, (64, 64, 64)).parameters()))
            for f in fields]  # fmt: skip


def train_one(data_name: str, system: str, field: str, seconds: float, quick: bool) -> dict:
    flat = {**SYSTEMS[system], "budget": seconds, "seed": 0, "threads": 1, "device": "cpu",
            "mlp": field}  # fmt: skip
    if quick:
        flat.update(hidden=(16, 16), eval_every=50)
    cfg = TrainConfig.for_data(data_name, **flat)
    first = setup(cfg)
    cfg, plan = budgeting.plan(cfg, first)
    run = setup(cfg, data=first.data)
    keep = KeepBest()
    fit(run.state, run.data, run.objective, cfg, hooks=keep, progress=False, quiet=True)
    keep.restore(run.state)
    return dict(model=run.model, cpu=keep.cpu, plan=plan)


@torch.no_grad()
def kl(model: torch.nn.Module, data_name: str, n: int) -> float:
    data = get_dataset(data_name)
    x = data.test(n)
    exact = copy.deepcopy(model).double().eval()
    logq = exact.log_prob(torch.as_tensor(x), solver=EVALUATOR, trace="exact")
    return float((torch.as_tensor(data.log_prob(x)) - logq).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=["8gaussians", "checkerboard", "rings"])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--fields", nargs="+", default=["concatsquash"], choices=list(MLPS),
                        help="the vector fields to compare (the model's --mlp)")  # fmt: skip
    parser.add_argument("--budgets", nargs="+", type=float, default=[30, 60, 120, 240])
    parser.add_argument("--n", type=int, default=10_000, help="test points of the evaluator")
    parser.add_argument("--quick", action="store_true", help="tiny fields, 2 s budgets")
    parser.add_argument("--figure", type=Path, default=Path("figures/objectives.png"))
    harness.add_arguments(parser)
    args = parser.parse_args()
    results = harness.start(__file__, parser, args, ignore=("figure",), smoke=args.quick)
    if args.quick:
        args.budgets, args.n = [2.0], 500
    results.settings.update(budgets=args.budgets, n=args.n)
    torch.set_num_threads(1)
    iters = 20 if args.quick else 100
    results.table("speed", "CPU ms per flow-matching iteration of each field on 8gaussians "
                  f"(batch 512, one thread), the mean of 3 rounds of {iters}", SPEED_COLUMNS,
                  field_timings(args.fields, iters))  # fmt: skip
    runs = [run_one(*combo, args) for combo in itertools.product(
        args.data, args.systems, args.fields, args.budgets)]  # fmt: skip
    results.table("kl", "KL (nats) to the true density after a budget of training CPU seconds, "
                  "by system and field, one thread", COLUMNS + budget_columns(args.budgets),
                  table_rows(runs, args))  # fmt: skip
    results.write()
    if not args.quick:
        draw(runs, args)


def run_one(
    data_name: str, system: str, field: str, seconds: float, args: argparse.Namespace
) -> dict:
    """Train one system for a budget, score it, and say so on stderr."""
    with harness.timed() as t:
        out = train_one(data_name, system, field, seconds, args.quick)
        value = kl(out["model"], data_name, args.n)
    run = dict(data=data_name, system=system, field=field, budget=seconds, cpu=out["cpu"],
               kl=value, plan=out["plan"].describe())  # fmt: skip
    print(f"{data_name} {system} {field} {seconds:g} s: KL {value:.4f} after {out['cpu']:.0f} "
          f"CPU s ({run['plan']}; {t.cpu:.0f} CPU s in all)", file=sys.stderr,
          flush=True)  # fmt: skip
    return run


COLUMNS = [Column("dataset", "dataset"), Column("system", "system"), Column("field", "field")]
SPEED_COLUMNS = [
    Column("field", "field"),
    Column("ms", "ms/iteration", "{:.2f}", "ms", "CPU ms of one flow-matching iteration"),
    Column("ratio", "relative", "{:.2f}x", about="against the first field's"),
    Column("params", "parameters", "{}", about="of the 2-D field 64-64-64"),
]


def budget_columns(budgets: list[float]) -> list[Column]:
    about = "KL after a budget of {:g} s of training CPU time"
    kls = [Column(f"kl_{b:g}", f"{b:g} s", "{:.4f}", "nats", about.format(b)) for b in budgets]
    return [*kls, Column("cpu", "CPU s actually spent", "{:.0f}", "s", "per budget, in order")]


def table_rows(runs: list[dict], args: argparse.Namespace) -> list[dict]:
    """One row per dataset, system and field, a column per budget (and, in the results file
    alone, each budget's plan)."""
    rows = []
    for key in itertools.product(args.data, args.systems, args.fields):
        mine = [r for r in runs if (r["data"], r["system"], r["field"]) == key]
        rows.append(dict(zip(("dataset", "system", "field"), key, strict=True),
                         cpu=[r["cpu"] for r in mine], plans=[r["plan"] for r in mine],
                         **{f"kl_{r['budget']:g}": r["kl"] for r in mine}))  # fmt: skip
    return rows


def draw(results: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.data), figsize=(4.2 * len(args.data), 3.4),
                             squeeze=False)  # fmt: skip
    for ax, data_name in zip(axes[0], args.data, strict=True):
        for system, field in itertools.product(args.systems, args.fields):
            key = (data_name, system, field)
            rows = [r for r in results if (r["data"], r["system"], r["field"]) == key]
            label = system if len(args.fields) == 1 else f"{system}, {field}"
            ax.plot([r["cpu"] for r in rows], [max(r["kl"], 1e-4) for r in rows], "o-",
                    label=label)  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="training CPU seconds", ylabel="KL (nats)",
               title=data_name)  # fmt: skip
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=110)
    print(f"\nwrote {args.figure}")


if __name__ == "__main__":
    main()
