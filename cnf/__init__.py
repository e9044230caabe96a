"""cnf: continuous normalizing flows for PyTorch.

The public names load on first use (PEP 562), so ``import cnf`` and the ``cnf`` command start
without importing torch until they need it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "CNF": "cnf.flow",
    "CNFDensity": "cnf.density",
    "CNFDensityWarning": "cnf.density",
    "CNFRegressor": "cnf.regressor",
    "ConcatMLP": "cnf.fields",
    "ConcatSquashLinear": "cnf.fields",
    "ConcatSquashMLP": "cnf.fields",
    "ContextEncoder": "cnf.context",
    "ConvConfig": "cnf.field_configs",
    "ConvField": "cnf.conv_fields",
    "ExactTrace": "cnf.trace",
    "FeatureContext": "cnf.context",
    "Flow": "cnf.flow",
    "FlowResult": "cnf.flow",
    "HutchinsonTrace": "cnf.trace",
    "LabelContext": "cnf.context",
    "METHODS": "cnf.solvers",
    "ModelConfig": "cnf.model_config",
    "MultiscaleCNF": "cnf.multiscale",
    "NFE": "cnf.solvers",
    "ODEBlock": "cnf.ode",
    "Solver": "cnf.solvers",
    "SolverError": "cnf.solvers",
    "TabularCNF": "cnf.table_flow",
    "UNetConfig": "cnf.field_configs",
    "ValidityReport": "cnf.validity",
    "classify": "cnf.classifier",
    "guided_log_prob": "cnf.guidance",
    "guided_sample": "cnf.guidance",
    "load_run": "cnf.runs",
    "make_trace": "cnf.trace",
    "solver_validity": "cnf.validity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cnf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    """The public names, once each (a name is also a global once it has been looked up)."""
    return sorted({*__all__, "__version__"})
