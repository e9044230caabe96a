"""Animation benchmark: one solve through every frame, then drawing and encoding the GIF.

    python bench/bench_animate.py runs/bench-toy/8gaussians  # the toy table's model (bench_toy.py)
    python bench/bench_animate.py RUN_DIR --quick   # one small configuration, for a smoke run
    python bench/bench_animate.py                   # no run: an untrained default CNF (few NFE)

Each row is one ``cnf.viz.animate`` call writing a GIF: ``solve`` is the time inside the single
:func:`cnf.transport.transport` solve (mesh nodes and particles together), ``render + encode`` the
rest (drawing every frame with matplotlib/Agg and PillowWriter's encoding); ``CPU s`` is the
process's CPU time for the whole call, which on a busy machine says more than wall time does (one
thread: on a quiet machine, wall time is about the CPU time). The target is 60 frames with a
200 x 200 density mesh in under a minute on 2 CPU cores. Threads are chosen as ``cnf animate``
does (one thread for a 2-D model on a CPU). ``mass error`` is the largest relative error over the
frames of ``sum(p_t * cell area)`` on the transported mesh (:meth:`cnf.transport.Transport.mass`,
from the log-determinants) against its exact value; ``shown mass error`` the same for what the
density panel draws (:meth:`cnf.transport.Transport.shown_density`, torn cells spread).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import torch
from harness import Column

from cnf import CNF, Solver, viz
from cnf.runs import load_run
from cnf.runtime import configure_threads
from cnf.transport import LATENT_LIM, Transport
from cnf.viz import motion

COLUMNS = [
    Column("configuration", "configuration"),
    Column("frames", "frames"),
    Column("grid", "grid"),
    Column("nfe", "NFE"),
    Column("solves", "solves"),
    Column("solve", "solve s", "{:.1f}", "s", "wall time inside the transport solve"),
    Column("render", "render + encode s", "{:.1f}", "s", "wall time of the rest"),
    Column("total", "total s", "{:.1f}", "s", "wall time of the animate call"),
    Column("cpu", "CPU s", "{:.1f}", "s", "CPU time of the animate call"),
    Column("mb", "GIF MB", "{:.2f}", "MiB"),
    Column("mass", "mass error", "{:.2%}", about="largest relative error of the mesh's mass"),
    Column("shown", "shown mass error", "{:.2%}", about="the same for the density drawn"),
]


class TimedTransport:
    """Wraps :func:`cnf.transport.transport` to time its solve and count the calls."""

    def __init__(self) -> None:
        self.inner, self.seconds, self.calls, self.last = motion.transport, 0.0, 0, None

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        self.last = self.inner(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return self.last


def mass_errors(tr: Transport) -> tuple[float, float]:
    """Largest relative errors over the frames of the mesh's mass, from the log-det density and
    as shown: against the latent square's Gaussian mass for ``"sample"``, against the first
    frame's for ``"density"`` (conservation)."""
    raw = tr.mass()
    shown = np.array([(tr.shown_density(k) * tr.cell_area(k)).sum() for k in range(len(raw))])
    exact = math.erf(LATENT_LIM / math.sqrt(2)) ** 2 if tr.direction == "sample" else raw[0]
    return float(np.abs(raw / exact - 1).max()), float(np.abs(shown / exact - 1).max())


def run_one(flow: torch.nn.Module, lim: float, **options) -> dict:
    timed = TimedTransport()
    motion.transport = timed  # the one solve that animate makes
    try:
        with tempfile.TemporaryDirectory() as tmp, harness.timed() as t:
            path = Path(tmp) / "flow.gif"
            viz.animate(flow, path, lim=lim, **options)
            size = path.stat().st_size / 2**20
    finally:
        motion.transport = timed.inner
    mass, shown = mass_errors(timed.last)
    return dict(frames=options["frames"], grid=options["grid"], nfe=flow.nfe.forward,
                solves=timed.calls, solve=timed.seconds, render=t.wall - timed.seconds,
                total=t.wall, cpu=t.cpu, mb=size, mass=mass, shown=shown)  # fmt: skip


def configurations(eval_solver: Solver, quick: bool) -> list[tuple[str, dict]]:
    loose = eval_solver.replace(atol=1e-5, rtol=1e-5) if not eval_solver.fixed_step else None
    rows = [("default", dict(frames=60, grid=200))]
    if quick:
        return [("quick", dict(frames=10, grid=50, particles=300))]
    rows += [
        ("--arrows", dict(frames=60, grid=200, arrows=True)),
        ("--direction density", dict(frames=60, grid=200, direction="density")),
        ("--grid 100", dict(frames=60, grid=100)),
        ("--frames 120", dict(frames=120, grid=200)),
    ]
    if loose is not None:
        rows.append(("solver atol=rtol=1e-5", dict(frames=60, grid=200, solver=loose)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", nargs="?", type=Path, help="a trained 2-D run directory")
    parser.add_argument("--quick", action="store_true", help="one small configuration")
    harness.add_arguments(parser)
    args = parser.parse_args()
    results = harness.start(__file__, parser, args, smoke=args.quick)
    if args.run is not None:
        run = load_run(args.run)
        flow, name, lim = run.model, run.meta["name"], run.dataset().density.support
    else:
        torch.manual_seed(0)
        flow, name, lim = CNF(2).eval(), "untrained CNF(2)", 4.0
    threads = configure_threads(0, torch.device("cpu"), 2)
    cpu = platform.processor() or platform.machine()
    solver = flow.eval_solver.describe()
    print(f"model: {name}, eval solver {solver}; torch {torch.__version__}, "
          f"{threads} thread(s), {os.cpu_count()} CPUs, {cpu}")  # fmt: skip
    rows = []
    for label, options in configurations(flow.eval_solver, args.quick):
        rows.append(dict(configuration=label, **run_one(flow, lim, **options)))
        print(f"  {label}: {rows[-1]['cpu']:.1f} CPU s", file=sys.stderr, flush=True)
    results.table("animate", f"{name}, evaluation solver {solver}, {threads} thread(s)", COLUMNS,
                  rows)  # fmt: skip
    results.write()


if __name__ == "__main__":
    main()
