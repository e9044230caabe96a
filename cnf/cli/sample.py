"""``cnf sample``: samples as .npy or .csv (in chunks, with progress), or a .png grid."""

from __future__ import annotations

import argparse
import functools
import math
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnf.cli.common import (
    in_range,
    note,
    solver_flags,
    solver_from_flags,
    threads_flag,
    use_threads,
)
from cnf.cli.contexts import Contexts, read_contexts
from cnf.data.columns import ColumnPlan
from cnf.flow import evaluating
from cnf.io import atomic_path, check_output
from cnf.runs import load_run
from cnf.runtime import SAMPLE_CHUNK
from cnf.solvers import Solver


def add_parser(sub: Any) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained flow")
    p.add_argument("run", type=Path, help="run directory or checkpoint file")
    p.add_argument("-n", type=int, required=True, help="number of samples")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output: .npy or .csv (a row per sample), .png (image grid)")  # fmt: skip
    p.add_argument("--with-log-prob", action="store_true", help="add the log-density column")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="auto")
    threads_flag(p)
    p.add_argument("--context", metavar="C",
                   help="a model of p(x | c): the condition of every sample, a label (3) or the "
                        "features, comma-separated (0.5,-1) or by name (age=50,bmi=31); or a "
                        ".csv file of conditions, one per row: -n samples for each, each "
                        "output row led by its condition's row number and values")  # fmt: skip
    p.add_argument("--guidance", type=float, metavar="W",
                   help="with --context: classifier-free guidance of weight W >= 0, the field "
                   "(1 + W) f(c) - W f(null) (for a model trained with --cond-dropout); "
                   "--with-log-prob is then the guided sampler's density, not "
                   "p(x | c)")  # fmt: skip
    solver_flags(p, "sample with")


GRID_MAX = 1024  # images in one .png grid


def run(args: argparse.Namespace) -> int:
    if args.output.is_dir():
        raise IsADirectoryError(f"-o {args.output} is a directory: name a .npy, .csv or .png file")
    suffix = args.output.suffix.lower()
    if suffix not in (".npy", ".csv", ".png"):
        raise ValueError(
            f"unknown output format {suffix or '(none)'!r}: use a .npy or .csv file (one row per "
            "sample) or .png (a grid of images)"
        )
    if suffix == ".png" and args.with_log_prob:
        raise ValueError("--with-log-prob needs a .npy or .csv output; a .png grid has no column")
    in_range("-n", args.n, integer=True, low=1)
    in_range("--threads", args.threads, integer=True)
    if suffix == ".png" and args.n > GRID_MAX:
        raise ValueError(f"-n {args.n} is too many images for one .png grid: at most {GRID_MAX}")
    check_output(args.output, flag="-o", force=args.force)
    run = load_run(args.run, args.device)
    use_threads(run.model, args)
    model, meta = run.model, run.meta
    contexts = read_contexts(meta, args.context, args.run)
    if args.guidance is not None:
        model = _guided(run, model, args.guidance)
    if suffix == ".png":
        return _sample_grid(model, args, contexts)
    plan = ColumnPlan.from_meta(meta["plan"]) if "plan" in meta else None
    names = (
        meta.get("all_columns")
        or meta.get("columns")
        or [f"x{i}" for i in range(math.prod(model.event_shape))]
    )
    lead = ["row", *contexts.names] if contexts is not None and contexts.from_file else []
    width = len(lead) + len(names) + args.with_log_prob
    total = args.n * (len(contexts) if lead else 1)
    _check_room(args.output, total * width * (8 if suffix == ".npy" else 25), "-n", args.n)
    solver = solver_from_flags(model, args)
    chunks = _per_condition(model, args, plan, solver, contexts)
    chunks = _with_progress(chunks, total, not args.no_progress)
    column = "guided_log_prob" if args.guidance is not None else "log_prob"
    header = lead + list(names) + ([column] if args.with_log_prob else [])
    digits = "%.17g" if next(model.parameters()).dtype == torch.float64 else "%.9g"
    with atomic_path(args.output) as tmp:
        if suffix == ".npy":  # the header, then the rows as they come (no memory map: a full
            with open(tmp, "wb") as f:  # disk must be an error, not a SIGBUS)
                header_ = {"descr": "<f8", "fortran_order": False, "shape": (total, width)}
                np.lib.format.write_array_header_1_0(f, header_)
                for chunk in chunks:
                    f.write(np.ascontiguousarray(chunk, dtype="<f8").tobytes())
        else:
            with open(tmp, "w") as f:
                f.write(",".join(header) + "\n")
                for chunk in chunks:
                    np.savetxt(f, chunk, delimiter=",", fmt=digits)  # every digit there is
    used = (solver or model.eval_solver).describe()
    each = f" ({args.n} for each of {len(contexts)} conditions)" if lead else ""
    print(f"wrote {total} samples{each} to {args.output}, solved with {used}"
          + ("" if solver is None else " (not the run's evaluation solver)"))  # fmt: skip
    return 0


LONG_JOB = 3600.0  # seconds: a job expected to take longer gets a note with its estimate


def _with_progress(chunks: Iterator[np.ndarray], n: int, show: bool) -> Iterator[np.ndarray]:
    """``chunks`` with a progress bar over the ``n`` samples, and a note after the first chunk
    when the whole job will take more than an hour at that rate."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    with tqdm(
        total=n,
        desc="sampling",
        unit="sample",
        disable=not show,
        file=sys.stderr,
        dynamic_ncols=True,
        delay=2,
    ) as bar:  # fmt: skip  (a quick job shows none)
        for chunk in chunks:
            if bar.n == 0:
                expected = (time.perf_counter() - start) * n / len(chunk)
                if expected > LONG_JOB:
                    note("sample")(f"{n} samples will take about {expected / 3600:.1f} hours at "
                                    "this rate; Ctrl-C (or SIGTERM) stops and removes the partial "
                                    "file")  # fmt: skip
            bar.update(len(chunk))
            yield chunk


def _check_room(path: Path, size: int, flag: str, value: int) -> None:
    directory = next(p for p in (path.parent, *path.parents) if p.exists())
    free = shutil.disk_usage(directory).free
    if size > free:
        raise ValueError(
            f"{flag} {value} would write about {size / 1e9:.3g} GB to {path}, but its disk has "
            f"{free / 1e9:.3g} GB free: draw fewer samples"
        )


def _per_condition(
    model: torch.nn.Module, args: argparse.Namespace, plan: ColumnPlan | None,
    solver: Solver | None, contexts: Contexts | None,
) -> Iterator[np.ndarray]:  # fmt: skip
    """The chunks of :func:`_sample_chunks`: for one condition (or none), as they are; for a
    file of conditions, ``-n`` samples for each, each row led by the condition's row number
    and values."""
    draw = functools.partial(_sample_chunks, model, args.n, args.seed, args.with_log_prob, plan,
                             solver)  # fmt: skip
    if contexts is None or not contexts.from_file:
        yield from draw(_condition(model, contexts, 0))
        return
    for i in range(len(contexts)):
        lead = np.concatenate([[i], np.atleast_1d(contexts.row(i).double().numpy())])
        for chunk in draw(_condition(model, contexts, i)):
            yield np.column_stack([np.repeat(lead[None], len(chunk), 0), chunk])


def _condition(model: torch.nn.Module, contexts: Contexts | None, i: int) -> dict[str, Any]:
    """Condition ``i`` as the model's ``context`` keyword, on its device (``{}``: none)."""
    return {} if contexts is None else {"context": contexts.for_model(model, i)}


def _sample_chunks(
    model: torch.nn.Module,
    n: int,
    seed: int,
    with_log_prob: bool,
    plan: ColumnPlan | None,
    solver: Solver | None = None,
    condition: dict[str, Any] | None = None,
) -> Iterator[np.ndarray]:
    """Samples in chunks of :data:`SAMPLE_CHUNK` rows (full table width: a table's dropped
    columns are put back), with the log-density as the last column if asked; ``condition``: a
    conditional model's ``context``."""
    condition = condition or {}
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for start in range(0, n, SAMPLE_CHUNK):
        size = min(SAMPLE_CHUNK, n - start)
        with torch.no_grad():
            if with_log_prob:
                x, logp = model.sample_and_log_prob(size, generator=gen, solver=solver,
                                                    **condition)  # fmt: skip
            else:
                x, logp = model.sample(size, generator=gen, solver=solver, **condition), None
        x = x.flatten(1).cpu().double().numpy()
        if plan is not None:
            x = plan.restore(x)
        yield x if logp is None else np.column_stack([x, logp.cpu().double().numpy()])


def _guided(run: Any, model: torch.nn.Module, guidance: float) -> torch.nn.Module:
    """The guided view of a conditional model (:func:`cnf.guidance.guided_flow`)."""
    from cnf.guidance import guided_flow

    if run.meta.get("context") is None:
        raise ValueError(f"--guidance steers a model of p(x | c), and {run.path} has no "
                         "condition: drop it")  # fmt: skip
    if not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"--guidance must be a finite number >= 0 (0: no guidance), got "
                         f"{guidance}")  # fmt: skip
    if guidance and not run.config.get("fm", {}).get("cond_dropout"):
        note("sample")(f"{run.path} was trained without --cond-dropout: its null condition is "
                       "untrained, so guidance pushes away from an arbitrary "
                       "field")  # fmt: skip
    return guided_flow(model, guidance)


def _sample_grid(model: torch.nn.Module, args: argparse.Namespace, contexts: Any) -> int:
    """A .png grid: ``-n`` images, or for a file of conditions a row of ``-n`` per condition."""
    from cnf import viz

    if model.levels is None:
        raise ValueError(
            f"a .png grid is for image models; {args.run} holds a model of event shape "
            f"{tuple(model.event_shape)}: use a .npy or .csv output"
        )
    rows = len(contexts) if contexts is not None and contexts.from_file else 1
    if args.n * rows > GRID_MAX:
        raise ValueError(f"-n {args.n} for each of {rows} conditions is {args.n * rows} images, "
                         f"too many for one .png grid: at most {GRID_MAX}")  # fmt: skip
    solver = solver_from_flags(model, args)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    with torch.no_grad(), evaluating(model):
        images = torch.cat([model.sample(args.n, generator=gen, solver=solver,
                                         **_condition(model, contexts, i))
                            for i in range(rows)])  # fmt: skip
    columns = args.n if rows > 1 else None
    viz.save_image_grid(images, model.levels, args.output, overwrite=args.force, columns=columns)
    used = (solver or model.eval_solver).describe()
    print(f"wrote a grid of {len(images)} samples to {args.output}, solved with {used}")
    return 0
