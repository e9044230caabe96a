"""Regenerate the flow animations in figures/: GIFs and their static companions for 2-D toys.

    python examples/animate_flows.py --runs runs --train   # train missing runs (4-9 min each)
    python examples/animate_flows.py --runs runs/bench-toy # draw from bench/bench_toy.py's runs

For each dataset this writes, from the run in RUNS/DATASET:

* figures/flow_DATASET.gif: base noise flowing to the data (particles with trails, density p_t);
* figures/trajectories_DATASET.png: whole particle paths coloured by time;
* figures/density_times_DATASET.png: p_t at five times;

and, for the first dataset, figures/flow_DATASET_density.gif (data flowing to noise, with the
velocity field). Missing models are trained as `cnf train --data DATASET` would (its defaults).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cnf import viz
from cnf.runs import load_run
from cnf.runtime import configure_threads
from cnf.training import TrainConfig, train

DATASETS = ("8gaussians", "checkerboard", "moons")
FIGURES = Path(__file__).resolve().parent.parent / "figures"
# small GIFs for the README: 48 frames at 64 dpi stay under 2 MB
GIF = dict(frames=48, fps=12, dpi=64, particles=1200)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--runs", type=Path, default=Path("runs"), help="where the runs are")
parser.add_argument("--train", action="store_true", help="train the runs that are missing")
parser.add_argument("--datasets", nargs="+", default=DATASETS, help="which datasets")
parser.add_argument("--out", type=Path, default=FIGURES, help="where the figures go")
args = parser.parse_args()
args.out.mkdir(parents=True, exist_ok=True)

for i, name in enumerate(args.datasets):
    run = args.runs / name
    if not (run / "best.pt").is_file():
        if not args.train:
            raise SystemExit(f"no trained run in {run}: pass --train to train it (4-9 min)")
        train(TrainConfig.for_data(name), run)
    trained = load_run(run)
    flow, data = trained.model, trained.dataset()
    configure_threads(0, next(flow.parameters()).device, 2)
    kw = dict(lim=data.density.support, data=data.test(GIF["particles"]))

    # noise -> data: what sampling does
    viz.animate(flow, args.out / f"flow_{name}.gif", overwrite=True, **GIF, **kw)
    viz.plot_trajectories(flow, args.out / f"trajectories_{name}.png", overwrite=True, **kw)
    viz.plot_density_times(flow, args.out / f"density_times_{name}.png", overwrite=True, **kw)
    if i == 0:  # data -> noise with the velocity field: what density evaluation does
        path = args.out / f"flow_{name}_density.gif"
        viz.animate(flow, path, direction="density", arrows=True, overwrite=True, **GIF, **kw)
    print(f"{name}: figures in {args.out} (NFE of the last solve {flow.nfe.forward})")
