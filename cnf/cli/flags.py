"""The flags of ``cnf train``, made from the config's fields, with their help texts."""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from typing import Any

from cnf.fields import ACTIVATIONS, CONV_LAYERS
from cnf.models import DTYPES, ModelConfig
from cnf.solvers import METHODS
from cnf.tabular import PREPROCESS
from cnf.trace import NOISES, TRACES
from cnf.training import TrainConfig
from cnf.training.config import SCHEDULES


def _choices(values) -> str:
    return ", ".join(values)


# what each config option does, with its unit and choices; the default is added from the field


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


class Parser(argparse.ArgumentParser):
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


def flag_text(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def config_fields() -> list[tuple[str, Any, Any]]:
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


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    for name, kind, default in config_fields():
        flag = "--" + name.replace("_", "-")
        shown = "none" if default is None else flag_text(default)
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
