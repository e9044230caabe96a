"""Does a CNF trained with a coarse solver stay a flow? (Ott et al. 2021, for CNF likelihoods)

    python examples/validity_experiment.py [--iters 1500] [--runs runs/validity] [--reuse]

Trains 8gaussians four times with the same seed and budget: euler at a coarse fixed step (2 steps),
euler at a fine fixed step (64 steps), euler with the adaptive step scheme starting from the coarse
step, and the default (rk4, adaptive, Hairer's starting step). For each it reports the test NLL
under the model's own training solver and under the reference (dopri5 at 1e-8 in float64), the
x -> z -> x reconstruction error, the validity verdict and the NFE per training iteration; prints
a markdown table and writes figures/validity.png.
"""

import argparse
import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from cnf.runs import read_log
from cnf.training import TrainConfig, train

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--iters", type=int, default=1500)
parser.add_argument("--runs", type=Path, default=Path("runs/validity"))
parser.add_argument("--figure", type=Path, default=Path("figures/validity.png"))
parser.add_argument("--reuse", action="store_true", help="redraw from finished runs in --runs")
args = parser.parse_args()

RUNS = {
    "euler, 2 steps": dict(method="euler", step_size=0.5, adapt=False),
    "euler, 64 steps": dict(method="euler", step_size=1 / 64, adapt=False),
    "euler, adaptive from 2 steps": dict(method="euler", step_size=0.5, adapt=True),
    "rk4, adaptive (default)": dict(method="rk4", adapt=True),
}

results = {}
for name, solver in RUNS.items():
    out = args.runs / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    cfg = TrainConfig.for_data("8gaussians", iters=args.iters, eval_every=args.iters, seed=0,
                               test_size=5000, validity_size=2000, **solver)  # fmt: skip
    if args.reuse and (out / "report.json").is_file():
        report = json.loads((out / "report.json").read_text())
    else:
        print(f"training {name} -> {out}", flush=True)
        report = train(cfg, out, force=out.exists(), progress=False).report
    results[name] = dict(report=report, log=read_log(out / "log.jsonl"))

print(
    "\n| training solver | NLL, own solver | NLL, reference | valid | x->z->x error (own) "
    "| NFE / iteration (fwd) | final step | time / iteration |"
)
print("|---|---:|---:|---|---:|---:|---:|---:|")
for name, r in results.items():
    v, log = r["report"]["validity"], r["log"]
    nfe = log.mean("nfe")  # a log row averages its iterations' NFE and sums their seconds
    sec = log.total("time") / log.iterations
    print(f"| {name} | {v['train']['nll']:.3f} | {v['reference']['nll']:.3f} | "
          f"{'yes' if v['valid'] else 'NO'} | {v['train']['recon_max']:.1e} | {nfe:.1f} | "
          f"{log.rows[-1]['step_size']:.4f} | {sec * 1e3:.0f} ms |")  # fmt: skip
print("8gaussians entropy (the best possible NLL): 2.832 nats")

fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(15, 4.0))
names = list(results)
validity = [results[n]["report"]["validity"] for n in names]
own = [v["train"]["nll"] for v in validity]
ref = [v["reference"]["nll"] for v in validity]
pos = np.arange(len(names))
labels = [textwrap.fill(n, 16) for n in names]
ax1.bar(pos - 0.2, own, 0.4, label="own training solver")
ax1.bar(pos + 0.2, ref, 0.4, label="reference (dopri5 1e-8, float64)")
ax1.axhline(2.832, color="k", lw=1, ls="--", label="true entropy")
ax1.set_xticks(pos, labels, fontsize=8)
ax1.set(ylabel="test NLL (nats)", title="likelihood under two solvers")
ax1.legend(fontsize=8)
gaps = [abs(v["delta_nats_per_dim"]) for v in validity]
ax3.bar(pos, gaps, 0.5, color=["C2" if v["valid"] else "C3" for v in validity])
ax3.axhline(0.01, color="k", lw=1, ls="--", label="validity threshold (0.01 nats/dim)")
ax3.set_xticks(pos, labels, fontsize=8)
ax3.set(yscale="log", ylabel="|NLL own - NLL reference| (nats/dim)",
        title="solver dependence (green: valid)")  # fmt: skip
ax3.legend(fontsize=8)
for name in names:
    rows = results[name]["log"].rows
    ax2.plot([r["iter"] for r in rows], [r["step_size"] for r in rows], label=name)
ax2.set(xlabel="iteration", ylabel="training step size", yscale="log",
        title="step size during training")  # fmt: skip
ax2.legend(fontsize=8)
fig.tight_layout()
args.figure.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(args.figure, dpi=120)
print(f"wrote {args.figure}")
