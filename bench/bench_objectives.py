"""KL to the truth against training time, per objective: what each way of training gives for a
budget, on the 2-D toys with a known density.

    python bench/bench_objectives.py                        # 3 datasets x 4 systems x 4 budgets
    python bench/bench_objectives.py --budgets 30 60 --data 8gaussians
    python bench/bench_objectives.py --quick                # a smoke run (seconds)

Each row trains from scratch, in this process, on one thread, with the same field (ConcatSquash
MLP 64-64-64) through ``cnf.training`` (``setup``, the budget plan, ``fit``): the recipe that
``cnf train --budget B`` plans for B seconds of training, for each system:

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
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import harness
import torch
from harness import Column

from cnf.data import get_dataset
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


def train_one(data_name: str, system: str, seconds: float, quick: bool) -> dict:
    flat = {**SYSTEMS[system], "budget": seconds, "seed": 0, "threads": 1, "device": "cpu"}
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
    runs = []
    for data_name in args.data:
        for system in args.systems:
            for seconds in args.budgets:
                with harness.timed() as t:
                    out = train_one(data_name, system, seconds, args.quick)
                    value = kl(out["model"], data_name, args.n)
                runs.append(dict(data=data_name, system=system, budget=seconds, cpu=out["cpu"],
                                 kl=value, plan=out["plan"].describe()))  # fmt: skip
                print(f"{data_name} {system} {seconds:g} s: KL {value:.4f} after {out['cpu']:.0f} "
                      f"CPU s ({runs[-1]['plan']}; {t.cpu:.0f} CPU s in all)", file=sys.stderr,
                      flush=True)  # fmt: skip
    results.table("kl", "KL (nats) to the true density after a budget of training CPU seconds, "
                  "by system, one thread", COLUMNS + budget_columns(args.budgets),
                  table_rows(runs, args))  # fmt: skip
    results.write()
    if not args.quick:
        draw(runs, args)


COLUMNS = [Column("dataset", "dataset"), Column("system", "system")]


def budget_columns(budgets: list[float]) -> list[Column]:
    about = "KL after a budget of {:g} s of training CPU time"
    kls = [Column(f"kl_{b:g}", f"{b:g} s", "{:.4f}", "nats", about.format(b)) for b in budgets]
    return [*kls, Column("cpu", "CPU s actually spent", "{:.0f}", "s", "per budget, in order")]


def table_rows(runs: list[dict], args: argparse.Namespace) -> list[dict]:
    """One row per dataset and system, a column per budget."""
    rows = []
    for data_name in args.data:
        for system in args.systems:
            mine = [r for r in runs if r["data"] == data_name and r["system"] == system]
            rows.append(dict(dataset=data_name, system=system, cpu=[r["cpu"] for r in mine],
                             **{f"kl_{r['budget']:g}": r["kl"] for r in mine}))  # fmt: skip
    return rows


def draw(results: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.data), figsize=(4.2 * len(args.data), 3.4),
                             squeeze=False)  # fmt: skip
    for ax, data_name in zip(axes[0], args.data, strict=True):
        for system in args.systems:
            rows = [r for r in results if r["data"] == data_name and r["system"] == system]
            ax.plot([r["cpu"] for r in rows], [max(r["kl"], 1e-4) for r in rows], "o-",
                    label=system)  # fmt: skip
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
