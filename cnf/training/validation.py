"""The validation NLL of a run: what picks ``best.pt`` and drives ``--patience``, so it only has
to rank checkpoints. It solves at ``--val-tol`` (the evaluation solver's method, at its own
tolerance where that is looser): on a trained 8gaussians flow, dopri5 at 1e-5 gave a validation
NLL 3e-5 nats from that at 1e-7 (the validation set's standard error: 0.02) in half the time.
The report at the end chooses its own solver against the float64 reference
(:func:`cnf.report.report`)."""

from __future__ import annotations

import time
from typing import Any

from cnf.evaluate import evaluate
from cnf.seeds import VALIDATION
from cnf.solvers import ADAPTIVE, Solver
from cnf.training.config import TrainConfig
from cnf.training.distributed import Distributed
from cnf.training.state import TrainState


def validation_solver(solver: Solver, tol: float) -> Solver:
    """``solver`` at tolerance ``tol`` where that is looser than its own (a fixed-step method,
    or ``tol`` 0, as it is).

    Example:
        >>> validation_solver(Solver("dopri5", atol=1e-7, rtol=1e-7), 1e-5).describe()
        'dopri5(atol=1e-05, rtol=1e-05)'
    """
    if not tol or solver.method not in ADAPTIVE:
        return solver
    return solver.replace(atol=max(solver.atol, tol), rtol=max(solver.rtol, tol))


def validate(
    state: TrainState, val: tuple, row: dict[str, Any], say, cfg: TrainConfig,
    dist: Distributed, solves: bool, keep: bool = False, progress=None,
) -> bool:  # fmt: skip
    """The validation NLL (each process its share, joined) and its CPU seconds, into the row;
    whether it is the best. Its probes are the same at every evaluation, whatever the number
    of processes: the run's validation stream. ``progress`` is told each batch's rows."""
    shares = dict(share=dist.share, gather=dist.gather) if dist.active else {}
    solver = validation_solver(state.model.eval_solver, cfg.val_tol)
    start = time.process_time()
    with state.averaged():  # the weights that are saved
        ev = evaluate(state.model, val[0], seed=cfg.seed, stream=VALIDATION, context=val[1],
                      solver=solver, progress=progress, **shares)  # fmt: skip
    row.update(val_nll=ev.nll, val_nll_se=ev.nll_se, val_nfe=ev.nfe,
               val_cpu=time.process_time() - start)  # fmt: skip
    bpd = ""
    if ev.bits_per_dim is not None:
        row["val_bits_per_dim"] = ev.bits_per_dim
        bpd = f", {ev.bits_per_dim:.4f} bits/dim"
    trained = f", training solver {state.model.solver.describe()}" if solves else ""
    say(f"iter {state.iteration}: val NLL {ev.nll:.4f} ± {ev.nll_se:.4f}{bpd} (NFE {ev.nfe}"
        f"{trained})")  # fmt: skip
    return state.record(ev.nll, keep)
