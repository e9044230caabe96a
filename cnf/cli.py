"""The ``cnf`` command: thin layers over the Python API.

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
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnf.checkpoint import CheckpointError
from cnf.data import list_datasets
from cnf.evaluate import evaluate
from cnf.solvers import SolverError
from cnf.train import (
    PRESETS,
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
# flags that may change when resuming a run; everything else must match the saved config
RESUMABLE = {"iters", "device", "threads"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _field_type(annotation: Any) -> Any:
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation
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
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f.type)
        help_text = HELP.get(f.name, f.name.replace("_", " ")) + f" (default: {f.default})"
        if kind is bool:
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            parser.add_argument(flag, action=action, default=None, help=help_text)
        elif f.name == "hidden":
            parser.add_argument(flag, type=_hidden, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cnf", description=__doc__.split("\n")[0])
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
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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

    sub.add_parser("datasets", help="list the built-in datasets")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name != "extra" and getattr(args, f.name) is not None
    }
    if args.resume is not None:
        if args.out is not None and args.out != args.resume:
            raise ValueError("--resume DIR names the run directory: drop --out")
        clash = sorted(set(given) - RESUMABLE)
        if clash:
            flags = ", ".join("--" + c.replace("_", "-") for c in clash)
            raise ValueError(f"{flags} cannot change when resuming: the saved config is used")
        result = train(TrainConfig(), args.resume, resume=True, progress=not args.no_progress,
                       iters=given.get("iters"))  # fmt: skip
    else:
        cfg = TrainConfig.for_data(given.pop("data", TrainConfig.data), **given)
        out = args.out or Path("runs") / Path(cfg.data.split(".npz:")[0]).stem
        result = train(cfg, out, force=args.force, progress=not args.no_progress)
    if result.interrupted:
        return 128 + result.interrupted  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    print(json.dumps(result.report, indent=2))
    print(f"run saved in {result.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    model, cfg, meta = load_model(args.run, resolve_device(args.device))
    # the checkpoint's dataset name: a tabular file's absolute path, found from any directory
    data = open_dataset(dataclasses.replace(cfg, data=meta["name"]), args.data_dir)
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


def cmd_sample(args: argparse.Namespace) -> int:
    suffix = args.output.suffix.lower()
    if suffix not in (".npy", ".csv", ".png"):
        raise ValueError(
            f"unknown output format {suffix or '(none)'!r}: use a .npy or .csv file (one row per "
            "sample) or .png (a grid of images)"
        )
    if suffix == ".png" and args.with_log_prob:
        raise ValueError("--with-log-prob needs a .npy or .csv output; a .png grid has no column")
    if args.output.exists() and not args.force:
        raise FileExistsError(f"{args.output} exists: pass --force to overwrite it")
    if args.n < 1:
        raise ValueError(f"-n must be a positive number of samples, got {args.n}")
    model, _, meta = load_model(args.run, resolve_device(args.device))
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    if suffix == ".png":
        return _sample_grid(model, args, gen)
    with torch.no_grad():
        if args.with_log_prob:
            x, logp = model.sample_and_log_prob(args.n, generator=gen)
            table = torch.cat([x.flatten(1), logp[:, None]], 1)
        else:
            table = model.sample(args.n, generator=gen).flatten(1)
    table = table.cpu().double().numpy()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npy":
        np.save(args.output, table)
    else:
        dims = table.shape[1] - args.with_log_prob
        names = meta.get("columns") or [f"x{i}" for i in range(dims)]
        header = list(names) + (["log_prob"] if args.with_log_prob else [])
        np.savetxt(args.output, table, delimiter=",", header=",".join(header), comments="")
    print(f"wrote {len(table)} samples to {args.output}")
    return 0


def _sample_grid(model: torch.nn.Module, args: argparse.Namespace, gen: torch.Generator) -> int:
    from cnf import viz

    if getattr(model, "levels", None) is None:
        raise ValueError(
            f"a .png grid is for image models; {args.run} holds a model of event shape "
            f"{tuple(model.event_shape)}: use a .npy or .csv output"
        )
    with torch.no_grad():
        images = model.sample(args.n, generator=gen)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    viz.save_image_grid(images, model.levels, args.output)
    print(f"wrote a grid of {args.n} samples to {args.output}")
    return 0


def cmd_animate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from cnf import viz  # matplotlib only when drawing
    from cnf.train import configure_threads

    outputs = [p for p in (args.output, args.trajectories, args.times) if p is not None]
    viz.animation_writer(args.output, args.fps)  # a bad format or missing ffmpeg fails first
    for path in outputs[1:]:
        if path.suffix.lower() != ".png":
            raise ValueError(f"{path}: the static figures are written as .png files")
    for path in outputs:
        if path.exists() and not args.force:
            raise FileExistsError(f"{path} exists: pass --force to overwrite it")
    model, cfg, _ = load_model(args.run, resolve_device(args.device))
    viz.check_2d(model)
    configure_threads(0, next(model.parameters()).device, 2)
    data = open_dataset(cfg)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("cnf: interrupted", file=sys.stderr)
        return 130
    except ERRORS as err:
        if os.environ.get("CNF_DEBUG"):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"cnf {args.command}: error: {message}", file=sys.stderr)
        return 1
    except Exception as err:  # a bug: still one line, with the way to see more
        if os.environ.get("CNF_DEBUG"):
            raise
        print(
            f"cnf {args.command}: internal error: {type(err).__name__}: {err} "
            "(set CNF_DEBUG=1 for the traceback and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
