"""The report of a trained flow: test NLL (KL where the truth is known, bits/dim for images)
and the solver-validity verdict. One function for the end of ``cnf train`` and ``cnf eval``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from cnf.data import Dataset
from cnf.evaluate import Evaluation, evaluate
from cnf.flow import Flow
from cnf.runtime import to_tensor
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


def report(
    model: Flow,
    data: Dataset,
    *,
    n: int | None = None,
    validity_n: int | None = 2000,
    say: Callable[[str], None] | None = None,
    solver: Solver | None = None,
    share: Callable[[int], slice] | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
    reference: Solver = REFERENCE,
) -> Report:
    """Evaluate ``model`` on ``n`` test samples of ``data`` (all, for a fixed test split, when
    ``None``) with its evaluation solver (or ``solver``), and check the first ``validity_n`` of
    them for solver validity (``None``: no check) of its training solver (or ``solver``).
    ``say`` is told what each phase does (they can take a while). In distributed evaluation,
    ``share(n)`` is this process's rows of ``n`` and ``gather`` joins every process's results.
    """
    say = say or (lambda text: None)
    p = like(model)
    x = to_tensor(data.test(n), p.device, p.dtype)
    say(f"evaluating {len(x)} test samples with {(solver or model.eval_solver).describe()}")
    mine = x if share is None else x[share(len(x))]
    evaluation = evaluate(model, mine, entropy=getattr(data, "entropy", None), solver=solver,
                          gather=gather)  # fmt: skip
    validity = None
    if validity_n is not None:
        checked = solver or model.solver
        say(f"checking solver validity on {min(validity_n, len(x))} of them: "
            f"{checked.describe()}, a finer one, and the float64 reference "
            f"{reference.describe()}")  # fmt: skip
        part = x[:validity_n]
        part = part if share is None else part[share(len(part))]
        validity = solver_validity(model, part, solver=checked, gather=gather, reference=reference)
    return Report(evaluation, validity)
