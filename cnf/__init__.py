"""cnf: continuous normalizing flows for PyTorch."""

from cnf.fields import ConcatSquashLinear, ConcatSquashMLP, ConvField
from cnf.flow import CNF, Flow, FlowResult
from cnf.multiscale import MultiscaleCNF
from cnf.ode import ODEBlock
from cnf.solvers import METHODS, NFE, Solver, SolverError
from cnf.tabular import TabularCNF
from cnf.trace import ExactTrace, HutchinsonTrace, make_trace
from cnf.validity import ValidityReport, solver_validity

__version__ = "0.1.0"

__all__ = [
    "CNF",
    "METHODS",
    "NFE",
    "CNFDensity",
    "ConcatSquashLinear",
    "ConcatSquashMLP",
    "ConvField",
    "ExactTrace",
    "Flow",
    "FlowResult",
    "HutchinsonTrace",
    "MultiscaleCNF",
    "ODEBlock",
    "Solver",
    "SolverError",
    "TabularCNF",
    "ValidityReport",
    "make_trace",
    "solver_validity",
]


def __getattr__(name: str):
    # scikit-learn is imported only when the estimator is used: `import cnf` stays light
    if name == "CNFDensity":
        from cnf.estimator import CNFDensity

        return CNFDensity
    raise AttributeError(f"module 'cnf' has no attribute {name!r}")
