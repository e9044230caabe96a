"""The ``cnf`` commands: thin layers over the Python API (the light entry point: :mod:`cnf.cli`).

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
import os
import re
import sys
from collections.abc import Sequence

import torch

from cnf.checkpoint import CheckpointError
from cnf.cli import animate, evaluate, plot, sample, train
from cnf.cli.flags import Parser, config_fields
from cnf.options import ConfigError
from cnf.solvers import SolverError
from cnf.training.distributed import environment_int, is_main_process, shutdown
from cnf.training.loop import Diverged


def build_parser() -> argparse.ArgumentParser:
    examples = __doc__.split("\n\n")[1]
    parser = Parser(
        prog="cnf",
        description="Continuous normalizing flows: train, evaluate, sample and animate them.",
        epilog=f"examples:\n{examples}\n\nEvery error is one line on stderr and a non-zero exit "
        "status; set CNF_DEBUG=1 for tracebacks.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in (train, evaluate, sample, animate, plot):
        command.add_parser(sub)
    sub.add_parser("datasets", help="list the built-in datasets")
    return parser


COMMANDS = {
    "train": train.run,
    "eval": evaluate.run,
    "sample": sample.run,
    "animate": animate.run,
    "plot": plot.run,
    "datasets": plot.datasets,
}


ERRORS = (ValueError, TypeError, OSError, ImportError, CheckpointError, SolverError)


# what to do when a solve fails in a command that only uses a trained model (training advice,
# such as a lower learning rate, is for cnf train, which gives its own)


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
    names = {name for name, _, _ in config_fields() if "_" in name}

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
    world = environment_int("WORLD_SIZE", "1")
    if world > 1:
        raise ValueError(
            f"cnf {command} runs in one process, but this is one of a torchrun job's {world} "
            "(WORLD_SIZE is set): run it without torchrun"
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
