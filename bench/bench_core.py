"""Core benchmark: time per training iteration and memory of the adjoint vs direct backprop.

    python bench/bench_core.py            # full table (about 5 minutes on 2 CPU cores)
    python bench/bench_core.py --quick    # smaller, for a smoke run

Table 1: forward + backward time of ``-log_prob(x).mean()`` at batch 512 with the default field
(ConcatSquash MLP 64-64-64, dopri5 at atol = rtol = 1e-5), for the exact trace (vectorized),
FFJORD's exact trace (a Python loop of one VJP per dimension, ``divergence_bf``) and Hutchinson,
each with direct backprop and with the adjoint. NFE is forward/backward per iteration.

Table 2: extra peak memory of one forward + backward as the number of solver steps grows (rk4, 4, 16
and 64 steps), each configuration in a fresh process: peak RSS on CPU, peak allocated memory on
CUDA. Direct backprop keeps every step's activations; the adjoint's memory must stay flat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from cnf import CNF, Solver
from cnf.trace import ExactTrace


class LoopTrace(ExactTrace):
    """FFJORD's brute-force divergence: one autograd.grad call per dimension."""

    def __call__(self, field, t, z, probe, frobenius=False):
        return self._looped(field, t, z, frobenius)


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
    start = time.perf_counter()
    (-flow.log_prob(x).mean()).backward()
    elapsed = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 1024
    print(json.dumps({"mb": (peak - before) / 1024, "ms": elapsed * 1e3}))


def time_iteration(flow: CNF, x: torch.Tensor, repeats: int) -> tuple[float, str]:
    times, nfe = [], None
    for i in range(repeats + 1):
        start = time.perf_counter()
        loss = -flow.log_prob(x).mean()
        loss.backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i:  # the first iteration warms up
            times.append(time.perf_counter() - start)
        nfe = f"{flow.nfe.forward}/{flow.nfe.backward}"
    return statistics.median(times), nfe


def table_speed(dims: list[int], batch: int, repeats: int, device: str) -> None:
    print(f"\n## Time per iteration (forward + backward), batch {batch}, dopri5 1e-5, {device}")
    print("| dim | trace | backprop | ms/iter | NFE fwd/bwd | vs FFJORD loop |")
    print("|---:|---|---|---:|---:|---:|")
    for dim in dims:
        torch.manual_seed(0)
        x = torch.randn(batch, dim, device=device)
        base = CNF(dim).to(device)
        for adjoint in (False, True):
            rows = {}
            for name, estimator in (
                ("exact (loop, FFJORD)", LoopTrace()),
                ("exact (vmap)", ExactTrace()),
                ("hutchinson", None),
            ):
                flow = CNF(
                    dim,
                    trace="hutchinson" if estimator is None else "exact",
                    solver=Solver(adjoint=adjoint),
                )
                flow.load_state_dict(base.state_dict())
                flow.to(device)
                if estimator is not None:
                    flow.estimator = estimator
                rows[name] = time_iteration(flow, x, repeats)
            ref = rows["exact (loop, FFJORD)"][0]
            for name, (sec, nfe) in rows.items():
                mode = "adjoint" if adjoint else "direct"
                print(f"| {dim} | {name} | {mode} | {sec * 1e3:.1f} | {nfe} | {ref / sec:.2f}x |")


def table_memory(dim: int, batch: int, device: str) -> None:
    what = "peak allocated" if device == "cuda" else "peak RSS"
    print(f"\n## Extra {what} vs solver steps (rk4, dim {dim}, batch {batch}, {device})")
    print("| steps | direct MB | adjoint MB | direct / adjoint | direct ms | adjoint ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for steps in (4, 16, 64):
        row = []
        for adjoint in (False, True):
            cmd = [sys.executable, __file__, "--child", str(dim), str(batch), str(steps)]
            cmd += ["--device", device] + (["--adjoint"] if adjoint else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row.append(json.loads(out.strip().splitlines()[-1]))
        d, a = row
        print(
            f"| {steps} | {d['mb']:.1f} | {a['mb']:.1f} | {d['mb'] / a['mb']:.1f}x "
            f"| {d['ms']:.0f} | {a['ms']:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="dims 2 and 10, one repeat")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--adjoint", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peak_memory_child(*args.child, args.adjoint, args.device)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(f"solver: {Solver().describe()}")
    dims = [2, 10] if args.quick else [2, 10, 64]
    table_speed(dims, 512, 1 if args.quick else 3, args.device)
    table_memory(2, 512, args.device)


if __name__ == "__main__":
    main()
