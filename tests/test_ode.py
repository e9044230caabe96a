"""ODEBlock: closed forms, adjoint gradients, the residual-block limit."""

import pytest
import torch
from conftest import LinearField
from torch import nn

from cnf import ConcatSquashMLP, ODEBlock, Solver


def test_linear_block_matches_matrix_exponential(float64) -> None:
    A = torch.randn(4, 4) * 0.3
    block = ODEBlock(LinearField(A), T=1.5, solver=Solver(atol=1e-10, rtol=1e-10))
    h = torch.randn(5, 4)
    torch.testing.assert_close(block(h), h @ torch.linalg.matrix_exp(1.5 * A).T, rtol=0, atol=1e-8)


def test_one_euler_step_is_a_residual_block(float64) -> None:
    field = ConcatSquashMLP(3, (8,))
    block = ODEBlock(field, solver=Solver("euler", step_size=1.0))
    h = torch.randn(2, 3)
    torch.testing.assert_close(block(h), h + field(torch.tensor(0.0), h))


def test_block_handles_image_shaped_states(float64) -> None:
    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, t, h):
            return torch.tanh(self.conv(h))

    block = ODEBlock(Conv(), solver=Solver("rk4", step_size=0.25))
    assert block(torch.randn(3, 2, 5, 5)).shape == (3, 2, 5, 5)


@pytest.mark.parametrize("learn_T", [False, True])
def test_block_adjoint_gradients_equal_direct(float64, learn_T: bool) -> None:
    field = ConcatSquashMLP(3, (16,))
    kw = dict(learn_T=learn_T, T=1.2)
    direct = ODEBlock(field, **kw, solver=Solver(atol=1e-10, rtol=1e-10))
    adjoint = ODEBlock(field, **kw, solver=Solver(atol=1e-10, rtol=1e-10, adjoint=True))
    h = torch.randn(6, 3, requires_grad=True)
    g1 = torch.autograd.grad(direct(h).square().sum(), [h, *direct.parameters()])
    g2 = torch.autograd.grad(adjoint(h).square().sum(), [h, *adjoint.parameters()])
    assert adjoint.nfe.backward > 0
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_trajectory_starts_at_the_input(float64) -> None:
    block = ODEBlock(LinearField(-torch.eye(2)), solver=Solver(atol=1e-9, rtol=1e-9))
    h = torch.randn(4, 2)
    traj = block.trajectory(h, torch.linspace(0, 1, 5))
    torch.testing.assert_close(traj[0], h)
    torch.testing.assert_close(traj[-1], h * torch.exp(torch.tensor(-1.0)))
