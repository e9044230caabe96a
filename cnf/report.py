"""The report of a trained flow: test NLL (KL where the truth is known, bits/dim for images)
and the solver-validity verdict. One function for the end of ``cnf train`` and ``cnf eval``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from cnf.data import Dataset
from cnf.evaluate import Evaluation, evaluate
from cnf.flow import Flow
from cnf.runtime import to_tensors
from cnf.seeds import TEST
from cnf.solvers import Solver
from cnf.transport import like
from cnf.validity import REFERENCE, ValidityReport, solver_validity


@dataclass(frozen=True)
class Report:
    """What :func:`report` measured; :meth:`to_dict` is ``report.json``."""

    evaluation: Evaluation
    validity: ValidityReport | None

    def to_dict(self) -> dict[str, Any]:
        out = self.evaluation.to_dict()
        if self.validity is not None:
            out["validity"] = self.validity.to_dict()
        return out

    def summary(self, name: str) -> str:
        """A few lines for people (``report.json`` has everything)."""
        ev = self.evaluation
        line = f"{name}: test NLL {ev.nll:.4f} ± {ev.nll_se:.4f} nats on {ev.n} samples"
        if ev.kl is not None:
            line += f", KL {ev.kl:.4f} nats to the true density (entropy {ev.entropy:.4f})"
        if ev.bits_per_dim is not None:
            line += f", {ev.bits_per_dim:.4f} bits/dim"
        return line + ("" if self.validity is None else "\n" + self.validity.summary())


GROWTH = 4  # the validity check may grow its sample to this many times its first look


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
) -> Report:
    """Evaluate ``model`` on ``n`` test samples of ``data`` (all, for a fixed test split, when
    ``None``) with its evaluation solver (or ``solver``), and check the solver validity of
    ``checked`` (default: ``solver``, else the training solver) on at least ``validity_n``
    test points (``None``: no check), up to :data:`GROWTH` times as many while the verdict is
    undecided, whatever ``n`` is. The Hutchinson probes come from ``seed``'s test and validity
    streams (:mod:`cnf.seeds`): the same numbers every time. ``say`` is told what each phase
    does (they can take a while). In distributed evaluation, ``share(n)`` is this process's
    rows of ``n`` and ``gather`` joins every process's results. ``progress``: a bar on stderr
    for each phase (``None``: where stderr is a terminal).
    """
    say = say or (lambda text: None)
    p = like(model)
    x, c = to_tensors(data.test(n), p.device, p.dtype)
    say(f"evaluating {len(x)} test samples with {(solver or model.eval_solver).describe()}")
    with _bar(progress, len(x), "test NLL") as bar:
        evaluation = evaluate(model, x, entropy=data.entropy, solver=solver, seed=seed,
                              stream=TEST, share=share, gather=gather, context=c,
                              progress=bar.update)  # fmt: skip
    validity = None
    if validity_n is not None:
        checked = checked or solver or model.solver
        pool, pool_c = x[: GROWTH * validity_n], None if c is None else c[: GROWTH * validity_n]
        if len(pool) < GROWTH * validity_n and n is not None:  # --n does not shrink it
            pool, pool_c = to_tensors(data.test(GROWTH * validity_n), p.device, p.dtype)
        say(f"checking solver validity on {min(validity_n, len(pool))} test points (up to "
            f"{len(pool)} if undecided): {checked.describe()}, a finer one, and the float64 "
            f"reference {reference.describe()}")  # fmt: skip
        with _bar(progress, 3 * min(validity_n, len(pool)), "validity") as bar:
            validity = solver_validity(model, pool, solver=checked, start=validity_n, seed=seed,
                                       share=share, gather=gather, reference=reference,
                                       context=pool_c, progress=_growing(bar))  # fmt: skip
    return Report(evaluation, validity)


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


def used_solver(model: Flow, config: dict[str, Any]) -> Solver:
    """The solver a trained model's densities depend on, which its validity check is about:
    the training solver of a model trained through it (maximum likelihood, or a fine-tuning by
    it), the evaluation solver of one trained by flow matching alone, which never solved."""
    fm_only = config.get("objective") == "fm" and not config.get("finetune_iters")
    return model.eval_solver if fm_only else model.solver
