"""Core benchmark: time per training iteration and memory of the adjoint vs direct backprop.

    python bench/bench_core.py            # full table (about 2 minutes on 2 CPU cores)
    python bench/bench_core.py --quick    # smaller, for a smoke run

Table 1: forward + backward time of ``-log_prob(x).mean()`` at batch 512 with the default field
(ConcatSquash MLP 64-64-64, dopri5 at atol = rtol = 1e-5), for the exact trace (vectorized),
FFJORD's exact trace (a Python loop of one VJP per dimension, ``divergence_bf``) and Hutchinson
(cnf's one forward-mode Jacobian-vector product, and FFJORD's one vector-Jacobian product),
each with direct backprop and with the adjoint: the median CPU time (and wall time) of an
iteration, and the speed-up over FFJORD's loop in CPU time (wall time on CUDA), measured in the
same run. NFE is forward/backward per iteration.

Table 2: extra peak memory of one forward + backward as the number of solver steps grows (rk4, 4, 16
and 64 steps), each configuration in a fresh process: peak RSS on CPU, peak allocated memory on
CUDA, and the CPU time of that forward + backward. Direct backprop keeps every step's
activations; the adjoint's memory must stay flat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import harness
import torch
from harness import Column

from cnf import CNF, Solver
from cnf.trace import ExactTrace, HutchinsonTrace

SPEED = [
    Column("dim", "dim"),
    Column("trace", "trace"),
    Column("backprop", "backprop"),
    Column("cpu_ms", "CPU ms/iter", "{:.1f}", "ms", "median CPU time of forward + backward"),
    Column("wall_ms", "wall ms/iter", "{:.1f}", "ms", "median wall time of the same"),
    Column("nfe", "NFE fwd/bwd", about="field evaluations per iteration, forward/backward"),
    Column("speedup", "vs FFJORD loop", "{:.2f}x", about="FFJORD loop's time / this row's"),
]
MEMORY = [
    Column("steps", "steps"),
    Column("direct_mb", "direct MB", "{:.1f}", "MB", "extra peak memory, direct backprop"),
    Column("adjoint_mb", "adjoint MB", "{:.1f}", "MB", "extra peak memory, adjoint"),
    Column("ratio", "direct / adjoint", "{:.1f}x"),
    Column("direct_ms", "direct CPU ms", "{:.0f}", "ms", "CPU time of the forward + backward"),
    Column("adjoint_ms", "adjoint CPU ms", "{:.0f}", "ms"),
]


class LoopTrace(ExactTrace):
    """FFJORD's brute-force divergence: one autograd.grad call per dimension."""

    def __call__(self, field, t, z, probe, frobenius=False):
        return self._looped(field, t, z, frobenius, None)


class _Opaque(torch.nn.Module):
    """A field without its forward-mode methods."""

    def __init__(self, field: torch.nn.Module) -> None:
        super().__init__()
        self.field = field

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.field(t, z)


class VjpHutchinson(HutchinsonTrace):
    """FFJORD's Hutchinson estimate: one vector-Jacobian product, ``e^T J``, inside the solve."""

    def __call__(self, field, t, z, probe, frobenius=False):
        return super().__call__(_Opaque(field), t, z, probe, frobenius)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs``) and return the current RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def peak_memory_child(dim: int, batch: int, steps: int, adjoint: bool, device: str) -> None:
    """Run one forward + backward in this (fresh) process and print the extra peak memory in MB:
    peak RSS on CPU, peak allocated memory on CUDA."""
    torch.manual_seed(0)
    x = torch.randn(batch, dim, device=device)
    flow = CNF(dim, solver=Solver("rk4", step_size=1 / steps, adjoint=adjoint)).to(device)
    (-flow.log_prob(x[:8]).mean()).backward()  # warm-up: lazy initialization is not the solver's
    before = _reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 1024
    with harness.timed() as t:
        (-flow.log_prob(x).mean()).backward()
    peak = _status_kib("VmHWM")
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 1024
    ms = (t.wall if device == "cuda" else t.cpu) * 1e3
    print(json.dumps({"mb": (peak - before) / 1024, "ms": ms}))


def time_iteration(flow: CNF, x: torch.Tensor, repeats: int) -> dict:
    """Median CPU and wall seconds of an iteration after a warm-up one, and its NFE."""
    cpu, wall, nfe = [], [], None
    for i in range(repeats + 1):
        with harness.timed() as t:
            loss = -flow.log_prob(x).mean()
            loss.backward()
            if x.is_cuda:
                torch.cuda.synchronize()
        if i:  # the first iteration warms up
            cpu.append(t.cpu)
            wall.append(t.wall)
        nfe = f"{flow.nfe.forward}/{flow.nfe.backward}"
    return dict(cpu=statistics.median(cpu), wall=statistics.median(wall), nfe=nfe)


def table_speed(dims: list[int], batch: int, repeats: int, device: str) -> list[dict]:
    """The speed-up is of CPU time on a CPU, of wall time on CUDA."""
    out = []
    for dim in dims:
        torch.manual_seed(0)
        x = torch.randn(batch, dim, device=device)
        base = CNF(dim).to(device)
        for adjoint in (False, True):
            rows = {}
            for name, estimator in (
                ("exact (loop, FFJORD)", LoopTrace()),
                ("exact (vmap)", ExactTrace()),
                ("hutchinson (vjp, FFJORD)", VjpHutchinson()),
                ("hutchinson (jvp)", HutchinsonTrace()),
            ):
                flow = CNF(dim, trace=estimator.name, solver=Solver(adjoint=adjoint))
                flow.load_state_dict(base.state_dict())
                flow.to(device)
                flow.estimator = estimator
                rows[name] = time_iteration(flow, x, repeats)
            key = "wall" if device == "cuda" else "cpu"
            ref = rows["exact (loop, FFJORD)"][key]
            for name, r in rows.items():
                out.append(dict(dim=dim, trace=name, backprop="adjoint" if adjoint else "direct",
                                cpu_ms=r["cpu"] * 1e3, wall_ms=r["wall"] * 1e3, nfe=r["nfe"],
                                speedup=ref / r[key]))  # fmt: skip
                print(f"  dim {dim}, {name}, {out[-1]['backprop']}: {out[-1]['cpu_ms']:.1f} CPU "
                      "ms/iter", file=sys.stderr, flush=True)  # fmt: skip
    return out


def table_memory(dim: int, batch: int, device: str) -> list[dict]:
    out = []
    for steps in (4, 16, 64):
        row = []
        for adjoint in (False, True):
            cmd = [sys.executable, __file__, "--child", str(dim), str(batch), str(steps)]
            cmd += ["--device", device] + (["--adjoint"] if adjoint else [])
            done = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row.append(json.loads(done.strip().splitlines()[-1]))
        d, a = row
        out.append(dict(steps=steps, direct_mb=d["mb"], adjoint_mb=a["mb"], ratio=d["mb"] / a["mb"],
                        direct_ms=d["ms"], adjoint_ms=a["ms"]))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="dims 2 and 10, one repeat")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--adjoint", action="store_true", help=argparse.SUPPRESS)
    harness.add_arguments(parser)
    args = parser.parse_args()
    if args.child:
        peak_memory_child(*args.child, args.adjoint, args.device)
        return
    results = harness.start(__file__, parser, args, smoke=args.quick)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(f"solver: {Solver().describe()}")
    dims = [2, 10] if args.quick else [2, 10, 64]
    rows = table_speed(dims, 512, 1 if args.quick else 3, args.device)
    results.table("speed", f"Time per iteration (forward + backward), batch 512, "
                  f"{Solver().describe()}, {args.device}", SPEED, rows)  # fmt: skip
    what = "peak allocated" if args.device == "cuda" else "peak RSS"
    results.table("memory", f"Extra {what} against solver steps (rk4, dim 2, batch 512, "
                  f"{args.device})", MEMORY, table_memory(2, 512, args.device))  # fmt: skip
    results.write()


if __name__ == "__main__":
    main()
