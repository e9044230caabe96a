"""The ``cnf`` commands: thin layers over the Python API (the entry point is :mod:`cnf.cli`).

    cnf train --data 8gaussians --out runs/8g     train (Ctrl-C saves; --resume continues)
    cnf eval runs/8g [--n N] [--json]             test NLL, NFE, entropy and KL where known
    cnf sample runs/8g -n 1000 -o samples.npy     samples (.npy or .csv), --with-log-prob
    cnf sample runs/digits -n 64 -o grid.png      a PNG grid of samples (image models)
    cnf animate runs/8g -o flow.gif               watch a 2-D flow move mass (GIF or MP4)
    cnf datasets                                  the built-in datasets

Every error is one line on stderr and a non-zero exit; set CNF_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnf.checkpoint import CheckpointError
from cnf.data import list_datasets
from cnf.data.tabular import ColumnPlan
from cnf.evaluate import evaluate
from cnf.io import atomic_path, check_output
from cnf.solvers import SolverError
from cnf.train import (
    PRESETS,
    RESUMABLE,
    ConfigError,
    TrainConfig,
    load_model,
    open_dataset,
    resolve_device,
    to_tensor,
    train,
)
from cnf.validity import solver_validity

HELP = {
    "data": "dataset name (see `cnf datasets`), a .csv/.npy/.npz file or a MAF data directory",
    "iters": "training iterations",
    "batch_size": "samples per iteration",
    "lr": "Adam learning rate (peak of the schedule)",
    "schedule": "learning-rate schedule: cosine or constant",
    "grad_clip": "clip the gradient norm to this (0: off)",
    "eval_every": "evaluate on the validation set every this many iterations",
    "seed": "seed for initialization, batches and probes",
    "device": "auto (CUDA when present), cpu, cuda or cuda:N",
    "threads": "CPU threads (0: automatic, 1 for small models)",
    "hidden": "hidden widths of the vector field, e.g. 64,64,64",
    "trace": "auto, exact or hutchinson",
    "noise": "Hutchinson probe: rademacher or gaussian",
    "method": "training ODE solver (any torchdiffeq method)",
    "step_size": "step of fixed-step training solvers",
    "atol": "absolute tolerance of adaptive training solvers",
    "rtol": "relative tolerance of adaptive training solvers",
    "adjoint": "backpropagate with the adjoint method",
    "kinetic": "weight of the kinetic-energy regularizer (RNODE)",
    "jacobian": "weight of the Jacobian Frobenius regularizer (RNODE)",
    "eval_method": "evaluation ODE solver",
    "adapt": "adapt the training step/tolerance so a finer solver agrees (Ott et al. 2021)",
    "adapt_every": "iterations between step-size checks",
    "adapt_threshold": "tolerated disagreement with the finer solver, nats per dimension",
    "max_steps": "lower bound of the adapted step: T / max_steps",
    "validity_size": "test rows in the final solver-validity check",
    "test_size": "fresh test samples in the final report",
    "preprocess": "tabular: fixed affine layer fitted on train: standardize, whiten or none",
    "columns": "tabular: comma list of column names or 0-based indices to model",
    "val_fraction": "tabular: fraction of rows for validation (seeded split)",
    "test_fraction": "tabular: fraction of rows for the test set (seeded split)",
    "dequantize": "tabular: add U[0,1) noise to integer-valued columns",
    "drop_nan": "tabular: drop rows with NaN/inf instead of refusing them",
    "patience": "stop after this many evaluations without a better validation NLL (0: off)",
    "data_dir": "directory of the dataset's files (mnist, fashion-mnist, cifar10)",
    "scales": "image models: number of scales (0: as many as the image size allows)",
    "blocks": "image models: CNF blocks per stage (before and after each squeeze)",
    "alpha": "image models: logit transform alpha (0: no logit, x - 1/2)",
    "conv_layer": "image models: conv layer of the vector field, concatsquash or concat (FFJORD)",
    "tf32": "allow TF32 matmuls and convolutions on CUDA (--no-tf32: full float32)",
}
TRUST_PICKLE = ("allow reading data that unpickles (the MAF GAS set), which can run code: only "
                "for files you trust; never taken from a checkpoint")  # fmt: skip


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # "-1e-3" is a (negative) number, not a flag: argparse's own pattern misses exponents,
        # so "--lr -1e-3" failed as "expected one argument" instead of reaching the range check
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$")

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _field_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    return hint


def _hidden(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 64,64,64, got {text!r}") from None
    return widths


def _flag_text(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(hints[f.name])
        help_text = HELP.get(f.name, f.name.replace("_", " ")) + f" (default: {f.default})"
        if kind is bool:
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            parser.add_argument(flag, action=action, default=None, help=help_text)
        elif f.name == "hidden":
            parser.add_argument(flag, type=_hidden, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    examples = __doc__.split("\n\n")[1]
    parser = _Parser(
        prog="cnf",
        description="Continuous normalizing flows: train, evaluate, sample and animate them.",
        epilog=f"examples:\n{examples}\n\nEvery error is one line on stderr and a non-zero exit "
        "status; set CNF_DEBUG=1 for tracebacks.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    presets = "; ".join(
        f"{kind}: "
        + ", ".join(f"--{k.replace('_', '-')} {_flag_text(v)}" for k, v in preset.items())
        for kind, preset in PRESETS.items()
    )
    p = sub.add_parser(
        "train",
        help="train a flow",
        description="Train a flow on a dataset.",
        epilog=f"The defaults shown are those of the 2-D toys; other kinds of data change some "
        f"of them (flags given still win). {presets}.",
    )
    p.add_argument("--out", type=Path, help="run directory (default: runs/DATA)")
    p.add_argument("--resume", type=Path, metavar="DIR",
                   help="continue the run in DIR exactly where it stopped; of the options below "
                   "only these may change: "
                   + ", ".join("--" + o.replace("_", "-") for o in sorted(RESUMABLE)))  # fmt: skip
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)
    _add_config_flags(p)

    p = sub.add_parser("eval", help="evaluate a run on fresh test data")
    p.add_argument("run", type=Path, help="run directory or checkpoint file")
    p.add_argument("--n", type=int, help="test samples (default: the run's test_size)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--validity", action="store_true",
                   help="also compare the training solver with a finer one and a float64 "
                   "dopri5 reference (Ott et al. 2021)")  # fmt: skip
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", help="where the dataset's files are now (default: the run's)")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)

    p = sub.add_parser("sample", help="draw samples from a trained flow")
    p.add_argument("run", type=Path, help="run directory or checkpoint file")
    p.add_argument("-n", type=int, required=True, help="number of samples")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output: .npy or .csv (a row per sample), .png (image grid)")  # fmt: skip
    p.add_argument("--with-log-prob", action="store_true", help="add the log-density column")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--device", default="auto")

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
    p.add_argument("--field", action="store_true", help="add a panel of velocity arrows")
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
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)

    sub.add_parser("datasets", help="list the built-in datasets")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name != "extra" and getattr(args, f.name) is not None
    }
    common = dict(progress=not args.no_progress, trust_pickle=args.trust_pickle)
    if args.resume is not None:
        if args.out is not None and args.out != args.resume:
            raise ValueError("--resume DIR names the run directory: drop --out")
        if args.force:
            raise ValueError(
                "--resume and --force contradict each other: --resume continues the run in DIR, "
                "--force replaces it; choose one"
            )
        result = train(TrainConfig(), args.resume, resume=True, changes=given, **common)
    else:
        cfg = TrainConfig.for_data(given.pop("data", TrainConfig.data), **given)
        out = args.out or Path("runs") / Path(cfg.data.split(".npz:")[0]).stem
        result = train(cfg, out, force=args.force, **common)
    if result.interrupted:
        return 128 + result.interrupted  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    print(json.dumps(result.report, indent=2))
    print(f"run saved in {result.out}")
    return 0


def _positive(flag: str, value: float | None, *, integer: bool = False, low: float = 0) -> None:
    """Refuse a numeric option outside its range, naming the flag (``None``: not given)."""
    if value is None:
        return
    ok = math.isfinite(value) and value > low if not integer else value >= low
    if not ok:
        what = f"an integer >= {low:g}" if integer else "a positive finite number"
        raise ValueError(f"{flag} must be {what}, got {value:g}")


def cmd_eval(args: argparse.Namespace) -> int:
    _positive("--n", args.n, integer=True, low=1)
    model, cfg, meta = load_model(args.run, resolve_device(args.device))
    # the checkpoint's dataset name: a tabular file's absolute path, found from any directory
    data = open_dataset(dataclasses.replace(cfg, data=meta["name"]), args.data_dir,
                        trust_pickle=args.trust_pickle)  # fmt: skip
    p = next(model.parameters())
    x = to_tensor(data.test(args.n or cfg.test_size), p.device, p.dtype)
    result = evaluate(model, x, entropy=getattr(data, "entropy", None)).to_dict()
    validity = solver_validity(model, x[: cfg.validity_size]) if args.validity else None
    if validity is not None:
        result["validity"] = validity.to_dict()
    if args.json:
        print(json.dumps(result))
        return 0
    for key, value in result.items():
        if key != "validity":
            print(f"{key:>14}: {value:.5g}" if isinstance(value, float) else f"{key:>14}: {value}")
    if validity is not None:
        print(f"{'validity':>14}: {validity.summary()}")
    return 0


GRID_MAX = 1024  # images in one .png grid
SAMPLE_CHUNK = 10_000  # samples per solve: memory stays bounded whatever -n is


def cmd_sample(args: argparse.Namespace) -> int:
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
    _positive("-n", args.n, integer=True, low=1)
    if suffix == ".png" and args.n > GRID_MAX:
        raise ValueError(f"-n {args.n} is too many images for one .png grid: at most {GRID_MAX}")
    check_output(args.output, flag="-o", force=args.force)
    model, _, meta = load_model(args.run, resolve_device(args.device))
    if suffix == ".png":
        return _sample_grid(model, args)
    plan = ColumnPlan.from_meta(meta["plan"]) if "plan" in meta else None
    names = (
        meta.get("all_columns")
        or meta.get("columns")
        or [f"x{i}" for i in range(math.prod(model.event_shape))]
    )
    width = len(names) + args.with_log_prob
    _check_room(args.output, args.n * width * (8 if suffix == ".npy" else 25), "-n", args.n)
    chunks = _sample_chunks(model, args.n, args.seed, args.with_log_prob, plan)
    header = list(names) + (["log_prob"] if args.with_log_prob else [])
    with atomic_path(args.output) as tmp:
        if suffix == ".npy":  # the header, then the rows as they come (no memory map: a full
            with open(tmp, "wb") as f:  # disk must be an error, not a SIGBUS)
                header_ = {"descr": "<f8", "fortran_order": False, "shape": (args.n, width)}
                np.lib.format.write_array_header_1_0(f, header_)
                for chunk in chunks:
                    f.write(np.ascontiguousarray(chunk, dtype="<f8").tobytes())
        else:
            with open(tmp, "w") as f:
                f.write(",".join(header) + "\n")
                for chunk in chunks:
                    np.savetxt(f, chunk, delimiter=",")
    print(f"wrote {args.n} samples to {args.output}")
    return 0


def _check_room(path: Path, size: int, flag: str, value: int) -> None:
    directory = next(p for p in (path.parent, *path.parents) if p.exists())
    free = shutil.disk_usage(directory).free
    if size > free:
        raise ValueError(
            f"{flag} {value} would write about {size / 1e9:.3g} GB to {path}, but its disk has "
            f"{free / 1e9:.3g} GB free: draw fewer samples"
        )


def _sample_chunks(
    model: torch.nn.Module, n: int, seed: int, with_log_prob: bool, plan: ColumnPlan | None
) -> Iterator[np.ndarray]:
    """Samples in chunks of :data:`SAMPLE_CHUNK` rows (full table width: a table's dropped
    columns are put back), with the log-density as the last column if asked."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for start in range(0, n, SAMPLE_CHUNK):
        size = min(SAMPLE_CHUNK, n - start)
        with torch.no_grad():
            if with_log_prob:
                x, logp = model.sample_and_log_prob(size, generator=gen)
            else:
                x, logp = model.sample(size, generator=gen), None
        x = x.flatten(1).cpu().double().numpy()
        if plan is not None:
            x = plan.restore(x)
        yield x if logp is None else np.column_stack([x, logp.cpu().double().numpy()])


def _sample_grid(model: torch.nn.Module, args: argparse.Namespace) -> int:
    from cnf import viz

    if getattr(model, "levels", None) is None:
        raise ValueError(
            f"a .png grid is for image models; {args.run} holds a model of event shape "
            f"{tuple(model.event_shape)}: use a .npy or .csv output"
        )
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    with torch.no_grad():
        images = model.sample(args.n, generator=gen)
    viz.save_image_grid(images, model.levels, args.output)
    print(f"wrote a grid of {args.n} samples to {args.output}")
    return 0


def _check_animate_options(args: argparse.Namespace) -> None:
    _positive("--frames", args.frames, integer=True, low=2)
    _positive("--fps", args.fps)
    _positive("--grid", args.grid, integer=True, low=2)
    _positive("--particles", args.particles, integer=True, low=1)
    _positive("--trails", args.trails, integer=True, low=0)
    _positive("--dpi", args.dpi)
    for flag in ("lim", "atol", "rtol"):
        _positive(f"--{flag}", getattr(args, flag))
    if args.fps > 100:
        raise ValueError(f"--fps must be at most 100, got {args.fps:g}")


def cmd_animate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from cnf import viz  # matplotlib only when drawing
    from cnf.train import configure_threads

    _check_animate_options(args)
    if args.output.is_dir():
        raise IsADirectoryError(f"-o {args.output} is a directory: name a .gif or .mp4 file")
    outputs = [p for p in (args.output, args.trajectories, args.times) if p is not None]
    viz.animation_writer(args.output, args.fps)  # a bad format or missing ffmpeg fails first
    for path in outputs[1:]:
        if path.suffix.lower() != ".png":
            raise ValueError(f"{path}: the static figures are written as .png files")
    for path, flag in zip(outputs, ("-o", "--trajectories", "--times"), strict=False):
        check_output(path, flag=flag, force=args.force)
    model, cfg, meta = load_model(args.run, resolve_device(args.device))
    viz.check_2d(model)
    configure_threads(0, next(model.parameters()).device, 2)
    data = open_dataset(dataclasses.replace(cfg, data=meta["name"]),
                        trust_pickle=args.trust_pickle)  # fmt: skip
    support = getattr(getattr(data, "density", None), "support", None)
    lim = args.lim if args.lim is not None else support
    samples = data.test(max(args.particles, 1))
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
    tolerances = {k: v for k, v in (("atol", args.atol), ("rtol", args.rtol)) if v is not None}
    solver = model.eval_solver.replace(**tolerances)
    kw = dict(direction=args.direction, lim=lim, data=samples, solver=solver)
    # the bar shows from the start: the one solve comes first, then the frames
    with tqdm(total=args.frames, desc="solve, then draw frames", disable=args.no_progress,
              leave=False, unit="frame") as bar:  # fmt: skip
        viz.animate(
            model, args.output, frames=args.frames, fps=args.fps, grid=args.grid,
            particles=args.particles, trails=args.trails, field=args.field, seed=args.seed,
            dpi=args.dpi, progress=lambda i, n: bar.update(1), **kw,
        )  # fmt: skip
    print(f"wrote {args.frames} frames to {args.output} (one solve, NFE {model.nfe.forward})")
    if args.trajectories:
        viz.plot_trajectories(model, args.trajectories, seed=args.seed, **kw)
        print(f"wrote {args.trajectories}")
    if args.times:
        viz.plot_density_times(model, args.times, grid=args.grid, **kw)
        print(f"wrote {args.times}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    print(f"{'name':<16}{'kind':<9}{'dim':>5}  truth  note")
    for info in list_datasets():
        truth = "yes" if info.truth else "no"
        print(f"{info.name:<16}{info.kind:<9}{info.dim:>5}  {truth:<5}  {info.note}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "sample": cmd_sample,
    "animate": cmd_animate,
    "datasets": cmd_datasets,
}
ERRORS = (ValueError, TypeError, OSError, CheckpointError, SolverError)


def _one_line(err: BaseException) -> str:
    if isinstance(err, ConfigError):  # name the flag the user typed
        return f"--{err.field.replace('_', '-')} {err.problem}".splitlines()[0]
    if isinstance(err, OSError) and err.strerror and err.filename and str(err).startswith("["):
        return f"{err.filename}: {err.strerror}"  # "[Errno 2] ..." reads better without the code
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; errors become one line and exit status 1."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ERRORS as err:
        if os.environ.get("CNF_DEBUG"):
            raise
        print(f"cnf {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:  # a bug: still one line, with the way to see more
        if os.environ.get("CNF_DEBUG"):
            raise
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(
            f"cnf {args.command}: internal error: {type(err).__name__}: {detail} "
            "(set CNF_DEBUG=1 for the traceback and please report it)",
            file=sys.stderr,
        )
        return 1
