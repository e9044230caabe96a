"""``cnf animate``: a 2-D flow moving mass, from one solve through all frames."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cnf.cli.common import TRUST_PICKLE, in_range, run_data, threads_flag, use_threads
from cnf.cli.contexts import read_contexts
from cnf.io import check_output
from cnf.runs import load_run
from cnf.runtime import check_memory
from cnf.solvers import Solver
from cnf.transport import check_2d


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "animate",
        help="animate a 2-D flow: particles, density, velocity",
        description="Animate a trained 2-D flow from one solve through all frames.",
    )
    p.add_argument("run", type=Path, help="run directory or checkpoint file")
    p.add_argument("-o", "--output", type=Path, required=True, help="output file: .gif or .mp4")
    p.add_argument("--frames", type=int, default=60, help="frames, ends included (default: 60)")
    p.add_argument("--fps", type=float, default=15, help="frames per second (default: 15)")
    p.add_argument(
        "--direction",
        default="sample",
        choices=("sample", "density"),
        help="sample: noise -> data (t: T -> 0); density: data -> noise (default: sample)",
    )
    p.add_argument(
        "--grid", type=int, default=200, help="density mesh cells per side (default: 200)"
    )
    p.add_argument("--particles", type=int, default=1500, help="particles (default: 1500)")
    p.add_argument(
        "--trails", type=int, default=8, help="frames of trail per particle (default: 8)"
    )
    p.add_argument("--arrows", action="store_true", help="add a panel of velocity arrows")
    p.add_argument("--lim", type=float, help="half-width of the window (default: the dataset's)")
    p.add_argument("--atol", type=float, help="solver tolerance (default: the run's eval solver's)")
    p.add_argument("--rtol", type=float, help="solver tolerance (default: the run's eval solver's)")
    p.add_argument("--dpi", type=float, default=72, help="resolution (default: 72)")
    p.add_argument("--seed", type=int, default=0, help="seed of the particles")
    p.add_argument("--trajectories", type=Path, metavar="PNG", help="also plot whole trajectories")
    p.add_argument("--times", type=Path, metavar="PNG", help="also plot the density at 5 times")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="auto")
    threads_flag(p)
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)
    p.add_argument("--context", metavar="C",
                   help="a model of p(x | c): the condition whose flow to draw, a label (3) or "
                        "the features (0.5 or c0=0.5)")  # fmt: skip


def _check_animate_size(args: argparse.Namespace) -> None:
    """The one solve through every frame holds the mesh and the particles at each frame."""
    points = ((args.grid + 1) ** 2 if args.grid else 0) + args.particles
    check_memory(points * args.frames * 3 * 8 * 4,
                 f"--grid {args.grid}, --particles {args.particles} and --frames {args.frames}",
                 "give a smaller --grid, --particles or --frames")  # fmt: skip


def _check_animate_options(args: argparse.Namespace) -> None:
    in_range("--frames", args.frames, integer=True, low=2)
    in_range("--threads", args.threads, integer=True)
    in_range("--fps", args.fps)
    in_range("--grid", args.grid, integer=True, low=2)
    in_range("--particles", args.particles, integer=True, low=1)
    in_range("--trails", args.trails, integer=True, low=0)
    in_range("--dpi", args.dpi)
    for flag in ("lim", "atol", "rtol"):
        in_range(f"--{flag}", getattr(args, flag))
    if args.fps > 100:
        raise ValueError(f"--fps must be at most 100, got {args.fps:g}")
    _check_animate_size(args)


def _animate_solver(model: Any, args: argparse.Namespace) -> Solver:
    """The run's evaluation solver, with the tolerances given (which a fixed step ignores)."""
    tolerances = {k: v for k, v in (("atol", args.atol), ("rtol", args.rtol)) if v is not None}
    if tolerances and model.eval_solver.fixed_step:
        raise ValueError(
            f"--{next(iter(tolerances))} has no effect: the run's evaluation solver, "
            f"{model.eval_solver.describe()}, takes fixed steps; drop it"
        )
    return model.eval_solver.replace(**tolerances)


def _check_outputs(args: argparse.Namespace) -> list[Path]:
    """The files to write, each checked before any work."""
    from cnf import viz

    if args.output.is_dir():
        raise IsADirectoryError(f"-o {args.output} is a directory: name a .gif or .mp4 file")
    outputs = [p for p in (args.output, args.trajectories, args.times) if p is not None]
    viz.animation_writer(args.output, args.fps)  # a bad format or missing ffmpeg fails first
    for path in outputs[1:]:
        if path.suffix.lower() != ".png":
            raise ValueError(f"{path}: the static figures are written as .png files")
    for path, flag in zip(outputs, ("-o", "--trajectories", "--times"), strict=False):
        check_output(path, flag=flag, force=args.force)
    return outputs


def _particles(data: Any, contexts: Any, n: int) -> Any:
    """Test points to start ``--direction density`` from: given the condition, if there is one
    (drawn from the true conditional where the data know it, else the test pairs with it)."""
    if contexts is None:
        return data.test(n)
    c = contexts.row(0).numpy()
    if hasattr(getattr(data, "task", None), "sample_x"):
        return data.task.sample_x(np.repeat(c[None], n, 0), np.random.default_rng(0))
    x, cs = data.test()
    return x[(np.asarray(cs).reshape(len(x), -1) == c.reshape(1, -1)).all(1)][:n]


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from cnf import viz  # matplotlib only when drawing

    _check_animate_options(args)
    outputs = _check_outputs(args)
    run = load_run(args.run, args.device)
    model = run.model
    contexts = read_contexts(run.meta, args.context, args.run)
    if contexts is not None and contexts.from_file:
        raise ValueError(f"--context {args.context}: cnf animate draws one condition; give it "
                         "as a label or its values, not a file")  # fmt: skip
    check_2d(model)
    use_threads(model, args)
    data = run_data(run, args)
    lim = args.lim if args.lim is not None else data.support
    samples = _particles(data, contexts, max(args.particles, 1))
    if contexts is not None:  # the flow of p(x | c) for the one condition
        from cnf.guidance import given

        model = given(model, contexts.for_model(model, 0))
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
    solver = _animate_solver(model, args)
    kw = dict(direction=args.direction, lim=lim, data=samples, solver=solver)
    say = (lambda text: None) if args.no_progress else (lambda text: print(text, file=sys.stderr))
    mesh = f"a mesh of {(args.grid + 1) ** 2:,} points and " if args.grid else ""
    say(f"solving the flow once through all {args.frames} frame times ({mesh}"
        f"{args.particles} particles, {solver.describe()})")  # fmt: skip
    bars: list = []  # the frames' bar starts with the first frame, after the solve

    def progress(i: int, n: int) -> None:
        if not bars:
            bars.append(tqdm(total=n, desc="drawing frames", disable=args.no_progress,
                             leave=False, unit="frame"))  # fmt: skip
        bars[0].update(1)

    try:
        viz.animate(
            model, args.output, frames=args.frames, fps=args.fps, grid=args.grid,
            particles=args.particles, trails=args.trails, arrows=args.arrows, seed=args.seed,
            dpi=args.dpi, progress=progress, overwrite=args.force, **kw,
        )  # fmt: skip
    finally:
        for bar in bars:
            bar.close()
    print(f"wrote {args.frames} frames to {args.output} (one solve, NFE {model.nfe.forward})")
    if args.trajectories:
        say(f"solving the particles' trajectories for {args.trajectories}")
        viz.plot_trajectories(model, args.trajectories, seed=args.seed, overwrite=args.force, **kw)
        print(f"wrote {args.trajectories}")
    if args.times:
        say(f"solving the density at 5 times for {args.times}")
        viz.plot_density_times(model, args.times, grid=args.grid, overwrite=args.force, **kw)
        print(f"wrote {args.times}")
    return 0
