"""cnf: continuous normalizing flows for PyTorch."""

from cnf.fields import ConcatSquashLinear, ConcatSquashMLP, ConvField
from cnf.flow import CNF, FlowResult
from cnf.multiscale import MultiscaleCNF
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
    "ConvField",
    "ExactTrace",
    "FlowResult",
    "HutchinsonTrace",
    "MultiscaleCNF",
    "ODEBlock",
    "Solver",
    "SolverError",
    "make_trace",
]
