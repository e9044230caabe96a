"""Fit y = sin(x) on [-pi, pi] with a neural ODE block.

    python examples/ode_sine.py [--iters 600] [--adjoint] [--out runs/ode_sine.png]

The model lifts x to a hidden state, flows it with an ODEBlock (dh/dt = f(t, h), the
continuous-depth residual block) and reads y out linearly. Prints the loss and the solver's NFE and
writes runs/ode_sine.png (the README's figure is `--out figures/ode_sine.png`).
"""

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

from cnf import ConcatSquashMLP, ODEBlock, Solver

parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
parser.add_argument("--iters", type=int, default=600)
parser.add_argument("--adjoint", action="store_true", help="backpropagate with the adjoint method")
parser.add_argument("--out", default="runs/ode_sine.png")
args = parser.parse_args()
torch.manual_seed(0)

# data: 256 points of y = sin(x)
x = torch.linspace(-math.pi, math.pi, 256).unsqueeze(1)
y = torch.sin(x)

# model: lift to 8 dims, flow for T = 1, read out
hidden = 8
model = nn.Sequential(
    nn.Linear(1, hidden),
    ODEBlock(
        ConcatSquashMLP(hidden, (32,)),
        solver=Solver("dopri5", atol=1e-4, rtol=1e-4, adjoint=args.adjoint),
    ),
    nn.Linear(hidden, 1),
)
block = model[1]
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.iters)

for it in range(1, args.iters + 1):
    opt.zero_grad()
    loss = (model(x) - y).square().mean()
    loss.backward()
    opt.step()
    sched.step()
    if it % 100 == 0 or it == 1:
        print(
            f"iter {it:4d}  mse {loss.item():.2e}  "
            f"nfe fwd/bwd {block.nfe.forward}/{block.nfe.backward}"
        )

# figure: the fit and the hidden trajectories through the block
with torch.no_grad():
    t = torch.linspace(0, 1, 30)
    traj = block.trajectory(model[0](x), t)  # (time, points, hidden)
    fit = model(x)
    readout = model[2](traj).squeeze(-1)  # read each intermediate state out
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
ax1.plot(x, y, "k", lw=3, alpha=0.3, label="sin(x)")
ax1.plot(x, fit, "C0", label=f"ODE block (mse {loss.item():.1e})")
ax1.set(xlabel="x", ylabel="y", title="fit")
ax1.legend()
for k in range(0, len(x), 8):
    ax2.plot(t, readout[:, k], color=plt.cm.viridis(k / len(x)), lw=1)
ax2.set(xlabel="t", ylabel="readout of h(t)", title="depth as time")
fig.tight_layout()
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
fig.savefig(args.out, dpi=120)
print(f"wrote {args.out}")
