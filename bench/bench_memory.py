"""Peak memory of one training step against batch size: maximum likelihood with direct
backpropagation, with the adjoint, and flow matching, on the same model.

    python bench/bench_memory.py                        # CPU, digits (about 2 minutes)
    python bench/bench_memory.py --gpu --data fashion-mnist --batches 64 128 256 512

The model is ``cnf train``'s single-scale image model (``PRESETS["image-fm"]``: one CNF block,
a U-Net field of width 32 over the whole image), so that the three rows differ only in how they
train it. Maximum likelihood solves with rk4 in a fixed number of steps (``--steps``, 4; no step
adaptation), so direct backpropagation keeps the graphs of ``steps x 4`` field evaluations, the
adjoint one at a time; flow matching evaluates the field once per image.

Each cell is a fresh process: it sets the run up (data, model, optimizer), then trains one
iteration (``cnf.training.loop.step``, the loop's step, no evaluation); the number is the peak
memory during that iteration above the memory held before it (the optimizer's state, created
by the first step, included). CPU: the growth of the process's peak resident set
(``ru_maxrss``; the allocator's reuse and caching make it coarse, a few MiB); CUDA: the caching
allocator's peak of allocated bytes (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import harness
import torch
from harness import Column

MODES = {
    "mle direct": dict(objective="mle", adjoint=False),
    "mle adjoint": dict(objective="mle", adjoint=True),
    "fm": dict(objective="fm"),
}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def cell(data: str, mode: str, batch: int, steps: int, device: str) -> dict:
    """One step's peak memory, in this process (run it in a fresh one)."""
    from cnf.runtime import to_tensor
    from cnf.training import TrainConfig, setup
    from cnf.training.config import FM_ONLY, PRESETS
    from cnf.training.loop import step

    fm_only = ("objective", *FM_ONLY) if MODES[mode]["objective"] == "mle" else ("objective",)
    preset = {k: v for k, v in PRESETS["image-fm"].items() if k not in fm_only}
    flat = {**preset, **MODES[mode], "batch_size": batch, "iters": 1, "adapt": False,
            "step_size": 1.0 / steps, "eval_every": 10**6, "threads": 1, "device": device,
            "schedule": "constant"}  # fmt: skip
    cfg = TrainConfig.plain(data, **flat)  # every option set, none typed
    run = setup(cfg)
    p = next(run.model.parameters())
    x = to_tensor(run.data.train_batch(batch, 1), p.device, p.dtype)
    cuda = run.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _peak_rss()
    step(run.state, run.objective, x, cfg)  # the loop's training iteration
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _peak_rss() - before
    return dict(mode=mode, batch=batch, mib=peak / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="digits", help="an image dataset (default digits)")
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 64, 128, 256])
    parser.add_argument("--steps", type=int, default=4, help="rk4 steps of maximum likelihood")
    parser.add_argument("--gpu", action="store_true", help="on CUDA (cuda allocator's peak)")
    parser.add_argument("--cell", nargs=2, metavar=("MODE", "BATCH"), help=argparse.SUPPRESS)
    harness.add_arguments(parser)
    args = parser.parse_args()
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device; run without it for the CPU numbers")
    if args.cell:
        mode, batch = args.cell[0], int(args.cell[1])
        print(json.dumps(cell(args.data, mode, batch, args.steps, device)))
        return
    results = harness.start(__file__, parser, args)
    rows: dict[str, dict[int, float]] = {mode: {} for mode in MODES}
    for mode in MODES:
        for batch in args.batches:
            command = [sys.executable, __file__, "--data", args.data, "--steps", str(args.steps),
                       "--cell", mode, str(batch)] + (["--gpu"] if args.gpu else [])  # fmt: skip
            out = subprocess.run(command, capture_output=True, text=True, check=False)
            if out.returncode:
                sys.exit(f"{mode} at batch {batch} failed: {out.stderr.strip().splitlines()[-1]}")
            rows[mode][batch] = json.loads(out.stdout.strip().splitlines()[-1])["mib"]
            print(f"  {mode}, batch {batch}: {rows[mode][batch]:.0f} MiB", file=sys.stderr)
    where = torch.cuda.get_device_name() if args.gpu else "CPU, peak resident set growth"
    about = "extra peak memory of one training step at batch {}"
    columns = [Column("objective", "objective")]
    columns += [Column(f"batch_{b}", f"batch {b}", "{:.0f} MiB", "MiB", about.format(b))
                for b in args.batches]  # fmt: skip
    table = [{"objective": mode, **{f"batch_{b}": mib for b, mib in cells.items()}}
             for mode, cells in rows.items()]  # fmt: skip
    results.table("memory", f"{args.data}, one training step of the single-scale U-Net model "
                  f"({where}; maximum likelihood with rk4 in {args.steps} steps)", columns,
                  table)  # fmt: skip
    results.write()


if __name__ == "__main__":
    main()
