"""Solvers against ODEs with exact solutions; options, NFE limits and error messages."""

import math

import pytest
import torch
from conftest import LinearField

from cnf import CNF, METHODS, ODEBlock, Solver, SolverError
from cnf.solvers import ADAPTIVE, FIXED_STEP


def _decay_block(method: str, T: float = 1.0, **solver) -> ODEBlock:
    return ODEBlock(LinearField(-torch.eye(1)), T=T, solver=Solver(method, **solver))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_solves_exponential_decay(float64, method: str) -> None:
    kw = dict(step_size=0.01) if method in FIXED_STEP else dict(atol=1e-8, rtol=1e-8)
    block = _decay_block(method, T=2.0, **kw)
    h = torch.ones(3, 1)
    with torch.no_grad():
        out = block(h)
    tol = 2e-2 if method == "euler" else 1e-4
    torch.testing.assert_close(out, h * math.exp(-2.0), rtol=tol, atol=0)


@pytest.mark.parametrize(
    ("method", "order"), [("euler", 1), ("midpoint", 2), ("heun3", 3), ("rk4", 4)]
)
def test_fixed_step_order_of_convergence(float64, method: str, order: int) -> None:
    A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # rotation: exact solution expm(A t)
    h0 = torch.tensor([[1.0, 0.5]])
    exact = h0 @ torch.linalg.matrix_exp(A).T
    errors = []
    for step in (0.1, 0.05):
        block = ODEBlock(LinearField(A), solver=Solver(method, step_size=step))
        with torch.no_grad():
            errors.append(float((block(h0) - exact).norm()))
    assert math.log2(errors[0] / errors[1]) == pytest.approx(order, abs=0.25)


def test_step_size_is_in_units_of_integration_time(float64) -> None:
    block = _decay_block("euler", T=2.0, step_size=0.5)
    block(torch.ones(1, 1))
    assert block.nfe.forward == 4


def test_torchdiffeq_options_pass_through(float64) -> None:
    block = _decay_block("dopri5", atol=1e-9, rtol=1e-9, options={"max_num_steps": 3})
    with pytest.raises(SolverError, match="max_num_steps"):
        block(torch.ones(1, 1))
    slow = _decay_block("dopri5", options={"first_step": 1e-3, "max_step": 0.01})
    slow(torch.ones(1, 1))
    assert slow.nfe.forward >= 6 * 100


def test_max_nfe_stops_a_runaway_solve(float64) -> None:
    block = _decay_block("dopri5", atol=1e-12, rtol=1e-12, max_nfe=30)
    with pytest.raises(SolverError, match="max_nfe=30"):
        block(torch.ones(1, 1))


class _BlowUp(torch.nn.Module):
    """dh/dt = h^2 from h(0) = 1 reaches infinity at t = 1."""

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h * h


def test_non_finite_solution_is_an_error_with_advice(float64) -> None:
    block = ODEBlock(_BlowUp(), T=3.0, solver=Solver("euler", step_size=0.05))
    with pytest.raises(SolverError, match=r"NaN/inf.*learning rate"):
        block(torch.ones(1, 1))


def test_seminorm_adjoint_matches_direct_gradients(float64) -> None:
    kw = dict(hidden=(16,), trace="exact")
    direct = CNF(2, **kw, solver=Solver(atol=1e-9, rtol=1e-9))
    semi = CNF(2, **kw, solver=Solver(atol=1e-9, rtol=1e-9, adjoint=True, seminorm=True))
    semi.load_state_dict(direct.state_dict())
    x = torch.randn(8, 2)
    g1 = torch.autograd.grad(direct.log_prob(x).sum(), list(direct.parameters()))
    g2 = torch.autograd.grad(semi.log_prob(x).sum(), list(semi.parameters()))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_adjoint_method_can_differ(float64) -> None:
    kw = dict(hidden=(8,), trace="exact")
    direct = CNF(2, **kw, solver=Solver(atol=1e-9, rtol=1e-9))
    other = CNF(2, **kw, solver=Solver(atol=1e-9, rtol=1e-9, adjoint=True))
    other.solver = other.solver.replace(adjoint_method="bosh3")
    other.load_state_dict(direct.state_dict())
    x = torch.randn(4, 2)
    g1 = torch.autograd.grad(direct.log_prob(x).sum(), list(direct.parameters()))
    g2 = torch.autograd.grad(other.log_prob(x).sum(), list(other.parameters()))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method="rk45"), r"method 'rk45' is unknown.*'dopri5'"),
        (dict(method="dopri5", step_size=0.1), r"step_size=0.1 is for fixed-step methods"),
        (dict(atol=-1.0), r"atol must be a positive finite number, got -1.0"),
        (dict(rtol=float("nan")), r"rtol must be a positive finite number"),
        (dict(seminorm=True), r"seminorm=True only applies to the adjoint"),
        (dict(options={"min_stepp": 1}), r"unknown options \['min_stepp'\].*'min_step'"),
        (dict(method="rk4", step_size=0.1, options={"max_num_steps": 2}), r"unknown options"),
        (dict(max_nfe=0), r"max_nfe must be a positive integer"),
        (dict(method="explicit_adams", step_size=0.1, options={"max_order": 2}), r"max_order"),
        (dict(adjoint=True, adjoint_method="rk5"), r"unknown adjoint_method 'rk5'"),
        (dict(adjoint=True, adjoint_method="rk4"), r"adjoint_method 'rk4' takes fixed steps"),
    ],
)
def test_impossible_solver_options_are_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Solver(**kwargs)


def test_solver_helpers() -> None:
    assert Solver("rk4", step_size=0.2).finer() == Solver("rk4", step_size=0.1)
    finer = Solver("dopri5", atol=1e-4, rtol=1e-3).finer()
    assert (finer.atol, finer.rtol) == pytest.approx((1e-5, 1e-4))
    assert Solver("midpoint", step_size=0.1).order == 2 and Solver().order == ADAPTIVE["dopri5"]
    assert "rk4(h=0.25)" == Solver("rk4", step_size=0.25).describe()
