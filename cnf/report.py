"""The report of a trained flow: test NLL (KL where the truth is known, bits/dim for images)
and the solver-validity verdict. One function for the end of ``cnf train`` and ``cnf eval``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cnf.data import Dataset
from cnf.evaluate import Evaluation, evaluate
from cnf.flow import Flow
from cnf.runtime import to_tensor
from cnf.transport import like
from cnf.validity import ValidityReport, solver_validity


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


def report(
    model: Flow, data: Dataset, *, n: int | None = None, validity_n: int | None = 2000
) -> Report:
    """Evaluate ``model`` on ``n`` test samples of ``data`` (all, for a fixed test split, when
    ``None``) with its evaluation solver, and check the first ``validity_n`` of them for solver
    validity (``None``: no check).
    """
    p = like(model)
    x = to_tensor(data.test(n), p.device, p.dtype)
    evaluation = evaluate(model, x, entropy=getattr(data, "entropy", None))
    validity = None if validity_n is None else solver_validity(model, x[:validity_n])
    return Report(evaluation, validity)
