"""Regenerate figures/toy_grid.png: data, model density and model samples for the toy datasets.

    python examples/toy_figures.py [--runs runs/bench-toy] [--data 8gaussians checkerboard ...]

Uses the run directories that `bench/bench_toy.py` (or `cnf train --data NAME --out RUNS/NAME`)
wrote; a missing run is trained first with the default configuration.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from cnf import viz
from cnf.runs import load_run
from cnf.training import TrainConfig, train

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--runs", type=Path, default=Path("runs/bench-toy"))
parser.add_argument(
    "--data",
    nargs="+",
    default=["8gaussians", "checkerboard", "rings", "2spirals", "moons", "pinwheel"],
)
parser.add_argument("--out", type=Path, default=Path("figures/toy_grid.png"))
parser.add_argument("--grid", type=int, default=200, help="density grid resolution")
args = parser.parse_args()

fig, axes = plt.subplots(3, len(args.data), figsize=(2.3 * len(args.data), 7.0), squeeze=False)
for col, name in enumerate(args.data):
    run = args.runs / name
    if not (run / "best.pt").is_file():
        print(f"training {name} into {run}", flush=True)
        train(TrainConfig(data=name), run, force=run.exists())
    trained = load_run(run)
    model, data = trained.model, trained.dataset()
    lim = data.density.support
    with torch.no_grad():
        samples = model.sample(5000, generator=torch.Generator().manual_seed(0)).numpy()
    density = viz.model_density(model, lim, args.grid)
    test = data.test(5000)
    top, middle, bottom = axes[0, col], axes[1, col], axes[2, col]
    top.scatter(*test.T, s=0.5, alpha=0.3, color="C0", rasterized=True)
    middle.imshow(density, extent=(-lim, lim, -lim, lim), origin="lower", cmap="magma")
    bottom.scatter(*samples.T, s=0.5, alpha=0.3, color="C3", rasterized=True)
    top.set_title(name)
    for ax in (top, middle, bottom):
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[], aspect="equal")
for ax, label in zip(axes[:, 0], ["data", "model density", "model samples"], strict=True):
    ax.set_ylabel(label)
fig.tight_layout()
args.out.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(args.out, dpi=110)
print(f"wrote {args.out}")
