"""A ResNet block stack against one ODE block: parameters, memory held for backward, fit.

    python examples/ode_vs_resnet.py [--iters 400]

A stack of N residual blocks h + f_k(h) has N sets of weights and keeps N blocks of activations
for backprop. An ODE block has one field f(t, h); under direct backprop it keeps every solver
step's activations, under the adjoint only its input and output, whatever the number of steps.
Memory is the bytes of the tensors autograd holds at the end of the forward pass (measured with
saved-tensor hooks), which is what grows with depth.
"""

import argparse
import math
import weakref

import torch
from torch import nn

from cnf import ConcatSquashMLP, ODEBlock, Solver

parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
parser.add_argument("--iters", type=int, default=400)
args = parser.parse_args()

HIDDEN, WIDTH = 8, 32
x = torch.linspace(-math.pi, math.pi, 256).unsqueeze(1)
y = torch.sin(x)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(HIDDEN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, HIDDEN))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.f(h) / self.depth

    depth = 1


def resnet(depth: int) -> nn.Module:
    Residual.depth = depth  # scale each step by 1/depth, like an Euler step of size T/depth
    return nn.Sequential(*[Residual() for _ in range(depth)])


def odenet(steps: int, adjoint: bool) -> nn.Module:
    return ODEBlock(
        ConcatSquashMLP(HIDDEN, (WIDTH,)),
        solver=Solver("rk4", step_size=1 / steps, adjoint=adjoint),
    )


def held_bytes(model: nn.Module, h: torch.Tensor) -> int:
    """Bytes of distinct storages autograd still holds after the forward pass."""
    held: list[weakref.ref] = []

    class Box:  # weakref-able holder: dies when the graph releases it
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

    def pack(t: torch.Tensor) -> Box:
        box = Box(t)
        held.append(weakref.ref(box))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        out = model(h)
    storages = {
        b.t.untyped_storage().data_ptr(): b.t.untyped_storage().nbytes()
        for r in held
        if (b := r()) is not None
    }
    del out
    return sum(storages.values())


def fit(body: nn.Module) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, HIDDEN), body, nn.Linear(HIDDEN, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.iters)
    for _ in range(args.iters):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        sched.step()
    return loss.item()


print("| model | depth / steps | parameters | held for backward (KB) | mse |")
print("|---|---:|---:|---:|---:|")
h = torch.randn(256, HIDDEN)
for depth in (4, 16, 64):
    for name, body in [
        ("ResNet stack", resnet(depth)),
        ("ODE block, direct", odenet(depth, adjoint=False)),
        ("ODE block, adjoint", odenet(depth, adjoint=True)),
    ]:
        params = sum(p.numel() for p in body.parameters())
        kb = held_bytes(body, h) / 1024
        mse = f"{fit(body):.1e}" if depth == 16 else "-"  # train once, at the middle depth
        print(f"| {name} | {depth} | {params} | {kb:.0f} | {mse} |")
