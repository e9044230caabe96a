"""The report of a trained flow: test NLL (KL where the truth is known, bits/dim for images)
and the solver-validity verdict. One function for the end of ``cnf train`` and ``cnf eval``."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from cnf.data import Dataset
from cnf.evaluate import Evaluation, evaluate
from cnf.flow import Flow
from cnf.runtime import to_tensors
from cnf.seeds import TEST
from cnf.solvers import ADAPTIVE, Solver, solver_fields
from cnf.transport import like
from cnf.validity import REFERENCE, Agreement, ValidityReport, loosest_agreeing, solver_validity


@dataclass(frozen=True)
class Report:
    """What :func:`report` measured; :meth:`to_dict` is ``report.json``."""

    evaluation: Evaluation
    validity: ValidityReport | None
    solver: Solver | None = None  # the evaluation solver the test NLL used
    tried: list[Agreement] = field(default_factory=list)  # how it was chosen
    cost: dict[str, float] = field(default_factory=dict)  # CPU seconds of each phase

    def to_dict(self) -> dict[str, Any]:
        out = self.evaluation.to_dict()
        if self.solver is not None:
            out["solver"] = self.solver.describe()
            out["evaluation_solver"] = solver_fields(self.solver)
        if self.tried:
            out["solver_choice"] = [asdict(a) for a in self.tried]
        if self.validity is not None:
            out["validity"] = self.validity.to_dict()
        if self.cost:
            out["cost"] = {k: round(v, 3) for k, v in self.cost.items()}
        return out

    def summary(self, name: str) -> str:
        """A few lines for people (``report.json`` has everything)."""
        ev = self.evaluation
        line = f"{name}: test NLL {ev.nll:.4f} ± {ev.nll_se:.4f} nats on {ev.n} samples"
        if ev.kl is not None:
            line += f", KL {ev.kl:.4f} nats to the true density (entropy {ev.entropy:.4f})"
        if ev.bits_per_dim is not None:
            line += f", {ev.bits_per_dim:.4f} bits/dim"
        if self.solver is not None:
            line += f", under {self.solver.describe()}"
        line += "" if self.validity is None else "\n" + self.validity.summary()
        if self.cost:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in self.cost.items())
            line += f"\nreport: {sum(self.cost.values()):.1f} CPU s ({parts})"
        return line


GROWTH = 4  # the validity check may grow its sample to this many times its first look
SE = 0.01  # the test NLL's standard error a report aims at, nats (cnf train --report-se)
AGREEMENT = 0.25  # an evaluation solver agrees within this share of SE of the reference
LOOSEST = 1e-4  # the loosest tolerance tried for the evaluation solver


def report(
    model: Flow,
    data: Dataset,
    *,
    n: int | None = None,
    validity_n: int | None = 2000,
    say: Callable[[str], None] | None = None,
    solver: Solver | None = None,
    checked: Solver | None = None,
    seed: int = 0,
    share: Callable[[int], slice] | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
    reference: Solver = REFERENCE,
    progress: bool | None = False,
    se: float | None = None,
) -> Report:
    """Check the solver validity of ``checked`` (default: ``solver``, else the training solver)
    on at least ``validity_n`` test points of ``data`` (``None``: no check), up to
    :data:`GROWTH` times as many while the verdict is undecided, whatever ``n`` is; then
    evaluate ``model`` on up to ``n`` test samples (all, for a fixed test split, when ``None``),
    until the NLL's standard error is ``se`` nats (``None``: all ``n``).

    The test NLL is under ``solver`` if given, else under the loosest tolerance (from
    :data:`LOOSEST` down to the evaluation solver's own) at which the evaluation solver's NLL
    on the validity check's points agrees with the float64 reference's within
    :data:`AGREEMENT` of ``se`` (of :data:`SE` without one), else under the evaluation solver.
    The Hutchinson probes come from ``seed``'s test and validity streams (:mod:`cnf.seeds`):
    the same numbers every time. ``say`` is told what each phase does (they can take a while).
    In distributed evaluation, ``share(n)`` is this process's rows of ``n`` and ``gather``
    joins every process's results. ``progress``: a bar on stderr for each phase (``None``:
    where stderr is a terminal). The report keeps each phase's CPU seconds (``cost``).
    """
    say = say or (lambda text: None)
    p = like(model)
    x, c = to_tensors(data.test(n), p.device, p.dtype)
    spent: dict[str, float] = {}
    validity, chosen, tried = None, solver, []
    if validity_n is not None:
        pool, pool_c = x[: GROWTH * validity_n], None if c is None else c[: GROWTH * validity_n]
        if len(pool) < GROWTH * validity_n and n is not None:  # --n does not shrink it
            pool, pool_c = to_tensors(data.test(GROWTH * validity_n), p.device, p.dtype)
        checked = checked or solver or model.solver
        say(f"checking solver validity on {min(validity_n, len(pool))} test points (up to "
            f"{len(pool)} if undecided): {checked.describe()}, a finer one, and the float64 "
            f"reference {reference.describe()}")  # fmt: skip
        with _cpu(spent, "validity check"), _bar(progress, 3 * min(validity_n, len(pool)),
                                                 "validity") as bar:  # fmt: skip
            validity = solver_validity(model, pool, solver=checked, start=validity_n, seed=seed,
                                       share=share, gather=gather, reference=reference,
                                       context=pool_c, progress=_growing(bar))  # fmt: skip
        if solver is None:
            with _cpu(spent, "evaluation solver"):
                tolerance = AGREEMENT * (se or SE)
                chosen, tried = loosest_agreeing(
                    model, pool, validity, candidates(model.eval_solver), tolerance, seed=seed,
                    share=share, gather=gather, context=pool_c)  # fmt: skip
    used = chosen or model.eval_solver
    aim = "" if se is None else f" (until the standard error is {se:g} nats)"
    say(f"evaluating up to {len(x)} test samples{aim} with {used.describe()}")
    with _cpu(spent, "test NLL"), _bar(progress, len(x), "test NLL") as bar:
        evaluation = evaluate(model, x, entropy=data.entropy, solver=used, seed=seed,
                              stream=TEST, share=share, gather=gather, context=c,
                              progress=bar.update, se=se)  # fmt: skip
    return Report(evaluation, validity, used, tried, spent)


def candidates(solver: Solver) -> list[Solver]:
    """The evaluation solver at looser tolerances, loosest first (from :data:`LOOSEST`, a
    decade at a time), down to its own; none for a fixed-step method.

    Example:
        >>> [s.atol for s in candidates(Solver("dopri5", atol=1e-7, rtol=1e-7))]
        [0.0001, 1e-05, 1e-06]
    """
    if solver.method not in ADAPTIVE:
        return []
    own = max(solver.atol, solver.rtol)
    decades = range(round(-math.log10(LOOSEST)), 30)
    return [solver.replace(atol=10.0**-k, rtol=10.0**-k) for k in decades if 10.0**-k > 1.5 * own]


@contextmanager
def _cpu(spent: dict[str, float], what: str) -> Iterator[None]:
    """Add the CPU seconds of the block to ``spent[what]``."""
    start = time.process_time()
    try:
        yield
    finally:
        spent[what] = spent.get(what, 0.0) + time.process_time() - start


def _bar(progress: bool | None, total: int, what: str):
    """A progress bar of rows on stderr (``progress`` as tqdm's ``disable``, negated)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=what, unit="rows", file=sys.stderr, mininterval=0.5,
                disable=None if progress is None else not progress, leave=False)  # fmt: skip


def _growing(bar) -> Callable[[int], None]:
    """``bar.update`` for a check whose sample may double while the verdict is undecided."""

    def update(rows: int) -> None:
        if bar.total is not None and bar.n + rows > bar.total:
            bar.total = bar.n + rows
        bar.update(rows)

    return update


def reported_solver(out: Path, iteration: int) -> Solver | None:
    """The evaluation solver that ``out/report.json`` found to agree with the float64 reference
    for the checkpoint of ``iteration`` (``None``: no report, or one of another checkpoint)."""
    path = out / "report.json"
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
        if found.get("iteration") != iteration:
            return None
        return Solver(**found["evaluation_solver"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None  # no such solver in it: the model's own


def used_solver(model: Flow, config: dict[str, Any]) -> Solver:
    """The solver a trained model's densities depend on, which its validity check is about:
    the training solver of a model trained through it (maximum likelihood, or a fine-tuning by
    it), the evaluation solver of one trained by flow matching alone, which never solved."""
    fm_only = config.get("objective") == "fm" and not config.get("finetune_iters")
    return model.eval_solver if fm_only else model.solver
