"""The ``cnf`` commands: thin layers over the Python API (the entry point is :mod:`cnf.cli`).

    cnf train --data 8gaussians --out runs/8g     train (Ctrl-C saves; --resume continues)
    cnf eval runs/8g [--n N] [--json]             test NLL, NFE, entropy and KL where known
    cnf sample runs/8g -n 1000 -o samples.npy     samples (.npy or .csv), --with-log-prob
    cnf sample runs/digits -n 64 -o grid.png      a PNG grid of samples (image models)
    cnf animate runs/8g -o flow.gif               watch a 2-D flow move mass (GIF or MP4)
    cnf plot runs/8g                              redraw a run's figures (curves, density, ...)
    cnf datasets                                  the built-in datasets

Every error is one line on stderr and a non-zero exit; set CNF_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import shutil
import sys
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnf.checkpoint import CheckpointError
from cnf.data import list_datasets
from cnf.data.tabular import ColumnPlan
from cnf.evaluate import dequantized_bound, log_probs
from cnf.fields import ACTIVATIONS, CONV_LAYERS
from cnf.flow import evaluating
from cnf.io import atomic_path, check_output, json_text
from cnf.models import DTYPES, ModelConfig
from cnf.options import ConfigError
from cnf.report import report, used_solver
from cnf.runs import Run, load_run
from cnf.runtime import SAMPLE_CHUNK, check_memory, configure_threads
from cnf.solvers import FIXED_STEP, METHODS, Solver, SolverError
from cnf.tabular import PREPROCESS
from cnf.trace import NOISES, TRACES
from cnf.training import PRESETS, RESUMABLE, TrainConfig, train
from cnf.training.config import SCHEDULES
from cnf.training.distributed import is_main_process, shutdown
from cnf.training.loop import Diverged
from cnf.validity import REFERENCE, solver_validity


def _choices(values) -> str:
    return ", ".join(values)


# what each config option does, with its unit and choices; the default is added from the field
HELP = {
    "data": "dataset name (see `cnf datasets`), a .csv/.npy/.npz file or a MAF data directory",
    "iters": "training iterations (optimizer steps)",
    "batch_size": "samples per iteration",
    "lr": "AdamW learning rate, the peak of the schedule",
    "weight_decay": "AdamW's decoupled weight decay",
    "schedule": f"learning-rate schedule: {_choices(SCHEDULES)} (cosine: down to 1%% of --lr)",
    "grad_clip": "clip the gradient's norm to this (0: off)",
    "eval_every": "iterations between validation NLLs (and checkpoints)",
    "seed": "seed of the initialization, the data split, batches and probes (0..2**63-1)",
    "device": "auto (CUDA when present), cpu, cuda or cuda:N",
    "threads": "CPU threads (0: automatic, 1 for models of up to 16 dimensions)",
    "tf32": "allow TF32 matmuls and convolutions on CUDA (--no-tf32: full float32)",
    "objective": "mle: maximum likelihood through the solver; fm: flow matching (simulation-"
    "free regression of the field; see --coupling, --finetune-iters). Images default to fm on "
    "one U-Net field; mle trains FFJORD's multiscale model",
    "coupling": "flow matching: independent, or ot (minibatch optimal transport)",
    "sigma_min": "flow matching: width of the linear path at the data (0: rectified flow)",
    "time_sampling": "flow matching: path times, uniform or logit-normal",
    "autocast": "flow matching: bf16 runs the regression's field under bfloat16 autocast, "
    "faster on GPUs and on CPUs with bfloat16 instructions (likelihoods and samples stay "
    "float32)",
    "finetune_iters": "flow matching: then this many iterations of maximum likelihood (with the "
    "adapted step), after --iters",
    "finetune_lr": "flow matching: the peak learning rate of the --finetune-iters phase, whose "
    "cosine starts again (default: --lr)",
    "budget": "seconds of training to plan the run for, on this machine: times a few "
    "iterations, then sets --iters (and --finetune-iters); unless --objective is given, trains "
    "the recipe measured best for a budget (flow matching, then maximum likelihood for the toys) "
    "(0: off)",
    "finetune_share": "with --budget and --objective fm: the share of the budget for the "
    "maximum-likelihood phase",
    "kinetic": "weight of RNODE's kinetic-energy penalty, int ||f||^2 dt",
    "jacobian": "weight of RNODE's Jacobian penalty, int ||df/dz||_F^2 dt",
    "adapt": "adapt the training step (or tolerance) so a finer solver agrees (Ott et al. 2021)",
    "adapt_every": "iterations between step-size checks (and 1, 2, 4, ... after a switch from "
    "flow matching to maximum likelihood)",
    "adapt_size": "training rows each step-size check scores, the first of the batch (0: all; "
    "each check solves them with a fine reference solver)",
    "adapt_threshold": "tolerated NLL difference from the finer solver, nats per dimension",
    "max_steps": "the adapted step never falls below T / max_steps",
    "test_size": "test samples in the final report (a table's test split has its own size)",
    "validity_size": "test samples in the final solver-validity check",
    "validity_tol": "tolerance of the validity check's reference solver (dopri5, float64)",
    "patience": "stop after this many validation NLLs without a better one (0: off)",
    "columns": "tables: the columns to model, a comma list of names or 0-based indices",
    "val_fraction": "tables: fraction of rows held out for validation (seeded split)",
    "test_fraction": "tables: fraction of rows held out for testing (seeded split)",
    "dequantize": "tables: add U[0,1) noise to integer-valued columns",
    "drop_nan": "tables: drop rows with NaN/inf instead of refusing them",
    "data_dir": "directory of the dataset's files (mnist, fashion-mnist, cifar10)",
    "hidden": "hidden widths of the vector field, e.g. 64,64,64",
    "activation": f"activation of the vector field: {_choices(sorted(ACTIVATIONS))}",
    "trace": f"divergence: {_choices(TRACES)} (auto: exact up to 8 dimensions)",
    "noise": f"Hutchinson probe: {_choices(NOISES)}",
    "T": "integration time of each CNF block (data at t=0, the Gaussian at t=T)",
    "learn_T": "make T a trained parameter",
    "method": f"training ODE solver: {_choices(METHODS)}",
    "atol": "absolute tolerance of an adaptive training solver (the adapter changes it)",
    "rtol": "relative tolerance of an adaptive training solver (the adapter changes it)",
    "step_size": "first step of a fixed-step training solver, in units of time (default: "
    "Hairer's heuristic; the adapter changes it)",
    "adjoint": "backpropagate with the adjoint method (memory flat in the number of steps)",
    "max_nfe": "stop a solve after this many function evaluations per pass",
    "eval_method": f"evaluation ODE solver (validation, report, eval, sample): {_choices(METHODS)}",
    "eval_atol": "absolute tolerance of an adaptive evaluation solver",
    "eval_rtol": "relative tolerance of an adaptive evaluation solver",
    "eval_step_size": "step of a fixed-step evaluation solver, in units of time",
    "dtype": f"parameters and densities in {' or '.join(DTYPES)}",
    "preprocess": f"tables: fixed affine layer fitted on the training rows: {_choices(PREPROCESS)}",
    "scales": "images: number of scales (0: as many as the image size allows)",
    "blocks": "images: CNF blocks per stage, before and after each squeeze (FFJORD's num_blocks)",
    "alpha": "images: logit transform's alpha (0: no logit, x - 1/2)",
    "conv_layer": f"images: convolution of the vector field: {_choices(CONV_LAYERS)}",
    "field": "images: the vector field, conv (FFJORD's stack of convolutions) or unet (a "
    "time-conditioned U-Net, for the single-scale flow-matching model)",
    "unet_width": "images, --field unet: channels at full resolution (doubled per level)",
    "unet_resolutions": "images, --field unet: levels of the U (the image halves one less time)",
    "unet_depth": "images, --field unet: residual blocks per level and direction",
    "unet_dropout": "images, --field unet: dropout rate in the residual blocks while training "
    "(a regularizer for small datasets; never in evaluation)",
    "unet_scale_shift": "images, --field unet: the time scales and shifts each block's normalized "
    "features (ADM's conditioning; the image preset's) instead of only shifting them before the "
    "norm (--no-unet-scale-shift)",
}


TRUST_PICKLE = ("allow reading data that unpickles (the MAF GAS set), which can run code: only "
                "for files you trust; never taken from a checkpoint")  # fmt: skip


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --data must not be taken for --data-dir
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


def _config_fields() -> list[tuple[str, Any, Any]]:
    """``(name, type, default)`` of every option ``cnf train`` takes: the recipe's and the
    model's fields."""
    out = []
    for cls in (TrainConfig, ModelConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in ("extra", "model"):
                continue
            out.append((f.name, _field_type(hints[f.name]), f.default))
    return out


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for name, kind, default in _config_fields():
        flag = "--" + name.replace("_", "-")
        shown = "none" if default is None else _flag_text(default)
        help_text = f"{HELP[name]} (default: {shown})"
        if kind is bool:
            # --no-FLAG too: a preset may have turned an option on (--no-unet-scale-shift)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)  # fmt: skip
        elif name == "hidden":
            parser.add_argument(flag, type=_hidden, default=None, metavar="W,W,...", help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(),
                                help=help_text)  # fmt: skip


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
    for add in (_train_parser, _eval_parser, _sample_parser, _animate_parser, _plot_parser):
        add(sub)
    sub.add_parser("datasets", help="list the built-in datasets")
    return parser


def _train_parser(sub: Any) -> None:
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
    p.add_argument("--json", action="store_true",
                   help="print the report as one JSON object instead of the summary")  # fmt: skip
    p.add_argument("--tensorboard", action="store_true",
                   help="also log to TensorBoard, in DIR/tensorboard (needs the tensorboard "
                   'package: pip install "cnf[tensorboard]")')  # fmt: skip
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)
    _add_config_flags(p)


def _eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a run on fresh test data")
    p.add_argument("run", type=Path, help="run directory or checkpoint file")
    p.add_argument("--n", type=int, help="test samples (default: the run's test_size)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--validity", action="store_true",
                   help="also compare the solver (the training one, or the one given with "
                   "--method) with a finer one and a float64 dopri5 reference (Ott et al. "
                   "2021)")  # fmt: skip
    p.add_argument("--device", default="auto")
    p.add_argument("--data", type=Path, metavar="FILE",
                   help="score the rows of this .csv/.npy/.npz file instead of the run's test "
                   "data (the columns the model was trained on: by name, or in the same "
                   "order); the summary is their NLL")  # fmt: skip
    p.add_argument("--per-row", type=Path, metavar="CSV",
                   help="with --data: write the log-density of each of its rows, in order, to "
                   "this .csv file")  # fmt: skip
    p.add_argument("--force", action="store_true", help="overwrite an existing --per-row file")
    p.add_argument("--data-dir", help="where the dataset's files are now (default: the run's)")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)
    p.add_argument("--dequant-samples", type=int, metavar="K",
                   help="images: also the importance-weighted bits/dim over K dequantization "
                   "draws per image (tighter as K grows; K=1 is the usual bound), with the exact "
                   "trace for K > 1: D times the cost of a Hutchinson solve")  # fmt: skip
    p.add_argument("--iw-probes", type=int, metavar="P",
                   help="with --dequant-samples: P averaged Hutchinson probes per draw instead "
                   "of the exact trace (P times a Hutchinson solve; for large images), and the "
                   "estimate of the bias they leave (probe_bias_bits_per_dim_iw)")  # fmt: skip
    _solver_flags(p, "evaluate with")


def _sample_parser(sub: Any) -> None:
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
    _solver_flags(p, "sample with")


def _solver_flags(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("--method", choices=METHODS, metavar="METHOD",
                   help=f"{verb} this ODE solver instead of the run's evaluation solver (e.g. "
                   "rk4 in a few steps, as flow-matching users sample)")  # fmt: skip
    p.add_argument("--steps", type=int, help="fixed-step methods: this many steps over [0, T]")
    p.add_argument("--step-size", type=float, help="fixed-step methods: the step, in time units")
    p.add_argument("--atol", type=float, help="adaptive methods: absolute tolerance")
    p.add_argument("--rtol", type=float, help="adaptive methods: relative tolerance")


def _solver(model: Any, args: argparse.Namespace) -> Solver | None:
    """The solver the flags ask for, or ``None`` (the run's own evaluation solver)."""
    given = {k: getattr(args, k) for k in ("method", "steps", "step_size", "atol", "rtol")}
    if all(v is None for v in given.values()):
        return None
    _in_range("--steps", args.steps, integer=True, low=1)
    for flag in ("step_size", "atol", "rtol"):
        _in_range("--" + flag.replace("_", "-"), getattr(args, flag))
    method = args.method or model.eval_solver.method
    if method in FIXED_STEP and (args.atol is not None or args.rtol is not None):
        flag = "--atol" if args.atol is not None else "--rtol"
        which = f"--method {method}" if args.method else f"the run's evaluation solver, {method},"
        raise ValueError(
            f"{flag} has no effect: {which} takes fixed steps (--steps or --step-size); drop "
            "it, or choose an adaptive --method such as dopri5"
        )
    if method not in FIXED_STEP:
        if args.steps is not None or args.step_size is not None:
            raise ValueError(f"--method {method} chooses its own steps: give --atol/--rtol")
        base = model.eval_solver if model.eval_solver.method == method else Solver(method)
        return base.replace(atol=args.atol or base.atol, rtol=args.rtol or base.rtol)
    if args.steps is not None and args.step_size is not None:
        raise ValueError("--steps and --step-size say the same thing: give one")
    T = float(model.ode_blocks()[0].T)
    step = args.step_size or (T / args.steps if args.steps else None)
    if step is None:
        raise ValueError(f"--method {method} takes fixed steps: give --steps N or --step-size H")
    limit = model.eval_solver.max_nfe
    if limit is not None and T / step > limit:  # checked before a grid of that many is built
        flag = "--steps" if args.steps else "--step-size"
        raise ValueError(
            f"{flag} {args.steps or args.step_size:g} makes {math.ceil(T / step):,} steps over "
            f"T = {T:g}, more than the {limit:,} function evaluations a solve may take (the "
            f"run's max_nfe): use at most {limit:,} steps"
        )
    return Solver(method, step_size=step, max_nfe=limit)


def _plot_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plot",
        help="redraw a run's figures",
        description="Redraw a run's figures (training.png, solver.png, and density.png and "
        "samples.png, marginals.png or samples.png by kind of data) from its directory.",
    )
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)


def _animate_parser(sub: Any) -> None:
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


def cmd_train(args: argparse.Namespace) -> int:
    from cnf import viz  # matplotlib only when drawing

    given = {name: getattr(args, name) for name, _, _ in _config_fields()
             if getattr(args, name) is not None}  # fmt: skip
    common = dict(progress=not args.no_progress, trust_pickle=args.trust_pickle,
                  tensorboard=args.tensorboard)  # fmt: skip
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
    if not is_main_process():  # rank 0 draws and prints
        return 0
    if not args.no_progress:
        print("drawing the figures", file=sys.stderr)
    figures = viz.plot_run(result.out, data=result.data, trust_pickle=args.trust_pickle)
    if args.json:
        print(json_text(result.report))
        return 0
    print((result.out / "summary.txt").read_text().rstrip())
    names = ", ".join(p.name for p in figures)
    print(f"run saved in {result.out}: report.json (every number), best.pt, last.pt, log.jsonl; "
          f"figures {names}")  # fmt: skip
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from cnf import viz  # matplotlib only when drawing

    figures = viz.plot_run(args.run, trust_pickle=args.trust_pickle, say=_note("plot"))
    print(f"wrote {', '.join(str(p) for p in figures)}")
    return 0


def _note(command: str) -> Callable[[str], None]:
    """A note on stderr from ``cnf COMMAND`` (output stays on stdout)."""
    return lambda text: print(f"cnf {command}: note: {text}", file=sys.stderr)


def _dataset(run: Run, args: argparse.Namespace):
    """The run's data, reopened as it was trained on; a note if its content changed since."""
    data = run.dataset(trust_pickle=args.trust_pickle, data_dir=getattr(args, "data_dir", None))
    if run.fingerprint is not None and run.fingerprint != data.fingerprint():
        print(f"cnf {args.command}: note: the data of {run.path} changed since it was trained "
              "(its content fingerprint differs)", file=sys.stderr)  # fmt: skip
    return data


def _in_range(flag: str, value: float | None, *, integer: bool = False, low: float = 0) -> None:
    """Refuse a numeric option outside its range, naming the flag (``None``: not given)."""
    if value is None:
        return
    ok = math.isfinite(value) and value > low if not integer else value >= low
    if not ok:
        what = f"an integer >= {low:g}" if integer else "a positive finite number"
        raise ValueError(f"{flag} must be {what}, got {value:g}")


def cmd_eval(args: argparse.Namespace) -> int:
    _check_eval_options(args)
    run = load_run(args.run, args.device)
    if run.path.name == "last.pt" and args.run.is_dir():
        _note("eval")(f"{args.run} has no best.pt (the run stopped before its first "
                      f"evaluation): evaluating last.pt, iteration {run.iteration}")  # fmt: skip
    if args.n and run.meta.get("kind") == "toy":  # a toy draws as many as asked
        row = math.prod(run.model.event_shape) * 16
        check_memory(args.n * row, f"--n {args.n}: the test samples", "give a smaller --n")
    solver = _solver(run.model, args)
    checked = solver or used_solver(run.model, run.config)
    validity_n = run.config.get("validity_size", 2000) if args.validity else None
    tol = run.config.get("validity_tol", REFERENCE.atol)
    kw = dict(solver=solver, checked=checked, seed=run.config.get("seed", 0),
              reference=REFERENCE.replace(atol=tol, rtol=tol))  # fmt: skip
    if args.data is not None:
        result, validity = _score_file(run, args, validity_n, **kw)
    else:
        data = _moved(run, args)
        if args.dequant_samples is not None:  # checked before the evaluation, not after it
            _check_dequant_samples(run, data, args)
        outcome = report(run.model, data, n=args.n or run.config.get("test_size"),
                         validity_n=validity_n, **kw)  # fmt: skip
        result, validity = outcome.to_dict(), outcome.validity
        if args.dequant_samples is not None:
            result.update(_importance_weighted(run, data, args, solver))
    if args.json:
        print(json_text(result))
        return 0
    for key, value in result.items():
        if key != "validity":
            print(f"{key:>14}: {value:.5g}" if isinstance(value, float) else f"{key:>14}: {value}")
    if validity is not None:
        for line in validity.summary().splitlines():
            print(f"{'validity':>14}: {line}")
    return 0


def _moved(run: Run, args: argparse.Namespace):
    """The run's data, with the way forward when it is gone from where it was trained."""
    try:
        return _dataset(run, args)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{_one_line(err)}: the run's data has moved or gone; score a file of rows with "
            "cnf eval RUN --data FILE, or give an image set's new folder with --data-dir"
        ) from None


def _check_eval_options(args: argparse.Namespace) -> None:
    _in_range("--n", args.n, integer=True, low=1)
    _in_range("--iw-probes", args.iw_probes, integer=True, low=2)
    if args.iw_probes is not None and args.dequant_samples is None:
        raise ValueError("--iw-probes is for the importance-weighted bound: add --dequant-samples")
    if args.per_row is not None and args.data is None:
        raise ValueError("--per-row writes the log-density of each row of --data FILE: add it")
    if args.data is not None:
        for flag, value in (("--n", args.n), ("--dequant-samples", args.dequant_samples),
                            ("--data-dir", args.data_dir)):  # fmt: skip
            if value is not None:
                raise ValueError(f"{flag} is for the run's own test data; --data scores every "
                                 f"row of {args.data}: drop {flag}")  # fmt: skip
    if args.per_row is not None:
        if args.per_row.suffix.lower() != ".csv":
            raise ValueError(f"--per-row {args.per_row}: the log-densities are written as a .csv")
        check_output(args.per_row, flag="--per-row", force=args.force)


def _score_file(run: Run, args: argparse.Namespace, validity_n: int | None, **kw: Any):
    """The NLL of the rows of ``--data`` (and their validity check), each row's log-density
    in ``--per-row``."""
    p = next(run.model.parameters())
    x = torch.as_tensor(run.rows(args.data), dtype=p.dtype, device=p.device)
    if len(x) == 0:
        raise ValueError(f"{args.data} has no rows to score")
    logp, nfe = log_probs(run.model, x, seed=kw["seed"], solver=kw["solver"])
    nll = -float(logp.mean())
    se = float(logp.std()) / math.sqrt(len(logp)) if len(logp) > 1 else math.nan
    result: dict[str, Any] = {"data": str(args.data), "nll": nll, "nll_se": se, "nfe": nfe,
                              "n": len(logp)}  # fmt: skip
    validity = None
    if validity_n is not None:
        validity = solver_validity(run.model, x, solver=kw["checked"], start=validity_n,
                                   seed=kw["seed"], reference=kw["reference"])  # fmt: skip
        result["validity"] = validity.to_dict()
    if args.per_row is not None:
        with atomic_path(args.per_row, overwrite=True) as tmp:
            np.savetxt(tmp, logp.cpu().numpy(), fmt="%.17g", header="log_prob", comments="")
        result["per_row"] = str(args.per_row)
    return result, validity


def _check_dequant_samples(run: Run, data: Any, args: argparse.Namespace) -> None:
    _in_range("--dequant-samples", args.dequant_samples, integer=True, low=1)
    if not hasattr(data, "test_pixels"):
        raise ValueError("--dequant-samples is for image models (discrete pixels); this run "
                         f"models {run.meta.get('kind')} data")  # fmt: skip
    images = len(data.test_pixels(args.n or run.config.get("test_size")))
    check_memory(args.dequant_samples * images * 8 * (2 if args.iw_probes else 1),
                 f"--dequant-samples {args.dequant_samples}: the draws of {images} images",
                 "give fewer draws, or fewer images with --n")  # fmt: skip


def _importance_weighted(run: Run, data: Any, args: argparse.Namespace, solver) -> dict:
    pixels = data.test_pixels(args.n or run.config.get("test_size"))
    gen = torch.Generator().manual_seed(0)
    bound = dequantized_bound(run.model, pixels, args.dequant_samples, probes=args.iw_probes,
                              generator=gen, solver=solver, progress=not args.json)  # fmt: skip
    out = {"nll_iw": bound.nll, "nll_iw_se": bound.nll_se, "bits_per_dim_iw": bound.bits_per_dim,
           "dequant_samples_iw": bound.samples, "bits_per_dim_iw_k1": bound.single_bits_per_dim,
           "trace_iw": bound.trace}  # fmt: skip
    if bound.probes is not None:
        out.update(probes_iw=bound.probes, probe_bias_bits_per_dim_iw=bound.probe_bias_bits_per_dim,
                   probe_noise_iw=bound.probe_noise)  # fmt: skip
    return out


GRID_MAX = 1024  # images in one .png grid


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
    _in_range("-n", args.n, integer=True, low=1)
    if suffix == ".png" and args.n > GRID_MAX:
        raise ValueError(f"-n {args.n} is too many images for one .png grid: at most {GRID_MAX}")
    check_output(args.output, flag="-o", force=args.force)
    run = load_run(args.run, args.device)
    model, meta = run.model, run.meta
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
    solver = _solver(model, args)
    chunks = _sample_chunks(model, args.n, args.seed, args.with_log_prob, plan, solver)
    chunks = _with_progress(chunks, args.n, not args.no_progress)
    header = list(names) + (["log_prob"] if args.with_log_prob else [])
    digits = "%.17g" if next(model.parameters()).dtype == torch.float64 else "%.9g"
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
                    np.savetxt(f, chunk, delimiter=",", fmt=digits)  # every digit there is
    used = (solver or model.eval_solver).describe()
    print(f"wrote {args.n} samples to {args.output}, solved with {used}"
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
                    _note("sample")(f"{n} samples will take about {expected / 3600:.1f} hours at "
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


def _sample_chunks(
    model: torch.nn.Module,
    n: int,
    seed: int,
    with_log_prob: bool,
    plan: ColumnPlan | None,
    solver: Solver | None = None,
) -> Iterator[np.ndarray]:
    """Samples in chunks of :data:`SAMPLE_CHUNK` rows (full table width: a table's dropped
    columns are put back), with the log-density as the last column if asked."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for start in range(0, n, SAMPLE_CHUNK):
        size = min(SAMPLE_CHUNK, n - start)
        with torch.no_grad():
            if with_log_prob:
                x, logp = model.sample_and_log_prob(size, generator=gen, solver=solver)
            else:
                x, logp = model.sample(size, generator=gen, solver=solver), None
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
    solver = _solver(model, args)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    with torch.no_grad(), evaluating(model):
        images = model.sample(args.n, generator=gen, solver=solver)
    viz.save_image_grid(images, model.levels, args.output, overwrite=args.force)
    used = (solver or model.eval_solver).describe()
    print(f"wrote a grid of {args.n} samples to {args.output}, solved with {used}")
    return 0


def _check_animate_size(args: argparse.Namespace) -> None:
    """The one solve through every frame holds the mesh and the particles at each frame."""
    points = ((args.grid + 1) ** 2 if args.grid else 0) + args.particles
    check_memory(points * args.frames * 3 * 8 * 4,
                 f"--grid {args.grid}, --particles {args.particles} and --frames {args.frames}",
                 "give a smaller --grid, --particles or --frames")  # fmt: skip


def _check_animate_options(args: argparse.Namespace) -> None:
    _in_range("--frames", args.frames, integer=True, low=2)
    _in_range("--fps", args.fps)
    _in_range("--grid", args.grid, integer=True, low=2)
    _in_range("--particles", args.particles, integer=True, low=1)
    _in_range("--trails", args.trails, integer=True, low=0)
    _in_range("--dpi", args.dpi)
    for flag in ("lim", "atol", "rtol"):
        _in_range(f"--{flag}", getattr(args, flag))
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


def cmd_animate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from cnf import viz  # matplotlib only when drawing

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
    run = load_run(args.run, args.device)
    model = run.model
    viz.check_2d(model)
    configure_threads(0, next(model.parameters()).device, 2)
    data = _dataset(run, args)
    support = getattr(getattr(data, "density", None), "support", None)
    lim = args.lim if args.lim is not None else support
    samples = data.test(max(args.particles, 1))
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
            particles=args.particles, trails=args.trails, field=args.field, seed=args.seed,
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
    "plot": cmd_plot,
    "datasets": cmd_datasets,
}
ERRORS = (ValueError, TypeError, OSError, ImportError, CheckpointError, SolverError)


# what to do when a solve fails in a command that only uses a trained model (training advice,
# such as a lower learning rate, is for cnf train, which gives its own)
SOLVER_ADVICE = {
    "animate": "the model's dynamics are hard for this solver: try tighter --atol/--rtol",
    "default": "the model's dynamics are hard for this solver: try a fixed-step one with more "
    "steps (--method rk4 --steps 200) or tighter --atol/--rtol",
}


def _one_line(err: BaseException, command: str = "train") -> str:
    if _is_out_of_memory(err):
        return _out_of_memory(err)
    if isinstance(err, SolverError) and command != "train" and not isinstance(err, Diverged):
        return f"{err.problem}: {SOLVER_ADVICE.get(command, SOLVER_ADVICE['default'])}"
    if isinstance(err, ConfigError):  # name the flag the user typed, and flags for fields
        return f"--{err.field.replace('_', '-')} {_as_flags(err.problem)}".splitlines()[0]
    if isinstance(err, OSError) and err.strerror and err.filename and str(err).startswith("["):
        return f"{err.filename}: {err.strerror}"  # "[Errno 2] ..." reads better without the code
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _as_flags(text: str) -> str:
    """A config message's option names as the flags of the command line (``eval_step_size`` ->
    ``--eval-step-size``): the names with an underscore, which no English word has."""
    names = {name for name, _, _ in _config_fields() if "_" in name}

    def flag(match: re.Match) -> str:
        name = match[1]
        return "--" + name.replace("_", "-") if name in names else name

    return re.sub(r"(?<![\w-])([a-z]+(?:_[a-z0-9]+)+)\b", flag, text)


def _is_out_of_memory(err: BaseException) -> bool:
    """Python's MemoryError, CUDA's, or the CPU allocator's (a plain RuntimeError)."""
    text = str(err)
    return isinstance(err, MemoryError | torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError)
        and ("can't allocate memory" in text or "out of memory" in text)
    )


def _out_of_memory(err: BaseException) -> str:
    asked = re.search(r"allocate (\d+) bytes", str(err))
    size = f" (an allocation of {int(asked[1]) / 1e9:.3g} GB)" if asked else ""
    return (
        f"out of memory{size}: make the job smaller (a smaller --batch-size, -n, --n or "
        "--test-size), or run it on a machine with more memory"
    )


def _one_process(command: str) -> None:
    """Only ``cnf train`` runs under torchrun; the other commands would race to one output."""
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        raise ValueError(
            f"cnf {command} runs in one process, but this is one of a torchrun job's "
            f"{os.environ['WORLD_SIZE']} (WORLD_SIZE is set): run it without torchrun"
        )


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; errors become one line and exit status 1 (under
    torchrun, printed by rank 0 alone: every process meets the same error)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command != "train":
            _one_process(args.command)
        return COMMANDS[args.command](args)
    except Exception as err:
        if os.environ.get("CNF_DEBUG"):
            raise
        if _is_out_of_memory(err) or isinstance(err, ERRORS):
            if is_main_process():
                print(f"cnf {args.command}: error: {_one_line(err, args.command)}", file=sys.stderr)
            return 1
        # a bug: still one line, with the way to see more
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(
            f"cnf {args.command}: internal error: {type(err).__name__}: {detail} "
            "(set CNF_DEBUG=1 for the traceback and please report it)",
            file=sys.stderr,
        )
        return 1
    finally:
        shutdown()
