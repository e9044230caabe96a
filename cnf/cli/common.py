"""What the commands share: notes, numeric checks, the run's data, the solver flags."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable
from typing import Any

from cnf import options
from cnf.runs import Run
from cnf.runtime import configure_threads
from cnf.solvers import FIXED_STEP, METHODS, Solver
from cnf.training.config import TrainConfig

TRUST_PICKLE = ("allow reading data that unpickles (the MAF GAS set), which can run code: only "
                "for files you trust; never taken from a checkpoint")  # fmt: skip


def note(command: str) -> Callable[[str], None]:
    """A note on stderr from ``cnf COMMAND`` (output stays on stdout)."""
    return lambda text: print(f"cnf {command}: note: {text}", file=sys.stderr)


def run_data(run: Run, args: argparse.Namespace):
    """The run's data, reopened as it was trained on; a note if its content changed since."""
    data = run.dataset(trust_pickle=args.trust_pickle, data_dir=getattr(args, "data_dir", None))
    if run.fingerprint is not None and run.fingerprint != data.fingerprint():
        print(f"cnf {args.command}: note: the data of {run.path} changed since it was trained "
              "(its content fingerprint differs)", file=sys.stderr)  # fmt: skip
    return data


def in_range(flag: str, value: float | None, *, integer: bool = False, low: float = 0) -> None:
    """Refuse a numeric option outside its range, naming the flag (``None``: not given)."""
    if value is None:
        return
    try:  # the package's one validator, with the flag's name in its message
        if integer:
            options.integer(flag, value, int(low))
        else:
            options.number(flag, value, low=low)
    except options.ConfigError as err:
        raise ValueError(f"{flag} {err.problem}") from None


def threads_flag(p: argparse.ArgumentParser) -> None:
    """``--threads``, as ``cnf train``'s (its help is the training config's)."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "threads")
    p.add_argument("--threads", type=int, default=0, metavar="N", help=options.help_of(field))


def use_threads(model: Any, args: argparse.Namespace) -> None:
    """The ``--threads`` of a command (0: cnf's rule for the model's size), checked already
    with the command's other options."""
    device = next(model.parameters()).device
    configure_threads(args.threads, device, math.prod(model.event_shape))


def solver_flags(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("--method", choices=METHODS, metavar="METHOD",
                   help=f"{verb} this ODE solver instead of the run's evaluation solver (e.g. "
                   "rk4 in a few steps, as flow-matching users sample)")  # fmt: skip
    p.add_argument("--steps", type=int, help="fixed-step methods: this many steps over [0, T]")
    p.add_argument("--step-size", type=float, help="fixed-step methods: the step, in time units")
    p.add_argument("--atol", type=float, help="adaptive methods: absolute tolerance")
    p.add_argument("--rtol", type=float, help="adaptive methods: relative tolerance")


def solver_from_flags(model: Any, args: argparse.Namespace) -> Solver | None:
    """The solver the flags ask for, or ``None`` (the run's own evaluation solver)."""
    given = {k: getattr(args, k) for k in ("method", "steps", "step_size", "atol", "rtol")}
    if all(v is None for v in given.values()):
        return None
    in_range("--steps", args.steps, integer=True, low=1)
    for flag in ("step_size", "atol", "rtol"):
        in_range("--" + flag.replace("_", "-"), getattr(args, flag))
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
