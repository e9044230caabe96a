"""cnf: continuous normalizing flows for PyTorch."""

from cnf.fields import ConcatSquashLinear, ConcatSquashMLP
from cnf.flow import CNF, FlowResult
from cnf.ode import ODEBlock
from cnf.solvers import METHODS, NFE, Solver, SolverError
from cnf.trace import ExactTrace, HutchinsonTrace, make_trace

__version__ = "0.1.0"

__all__ = [
    "CNF",
    "METHODS",
    "NFE",
    "ConcatSquashLinear",
    "ConcatSquashMLP",
    "ExactTrace",
    "FlowResult",
    "HutchinsonTrace",
    "ODEBlock",
    "Solver",
    "SolverError",
    "make_trace",
]
