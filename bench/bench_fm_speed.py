"""The flow-matching regression step of the U-Net field: CPU (or GPU) time per training step in
float32, under bfloat16 autocast (``--autocast bf16``) and with the field compiled by
``torch.compile``, with and without the preset's dropout.

    python bench/bench_fm_speed.py                 # digits-sized: batch 128 of 1x8x8
    python bench/bench_fm_speed.py --size 28 --batch 64 --steps 10

Each row times ``--steps`` steps of the regression's forward, backward and AdamW update on one
U-Net (the image preset's: width 32, 2 levels, the time's scale and shift) after a warm-up of 5,
in this process, three ways: float32; under bfloat16 autocast, the field's forward pass under
``torch.autocast(..., torch.bfloat16)`` and the loss in float32, as
``cnf.training.FlowMatching`` runs it; and with the field compiled by ``torch.compile`` ("first
step": the first call, compiling included; inductor caches compiled code on disk, so a second
run of the script compiles faster). The rows: the U-Net without dropout called as a plain module
(what compiling can gain at best), then as ``cnf``'s flow-matching loss calls it, inside
``cnf.fields.seeded_dropout`` (which hands every dropout layer the step's generator, even at p =
0), without and with the preset's dropout 0.1. ``cnf`` has no ``--compile`` flag while this
table says it does not pay for the preset.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import harness
import torch
from harness import Column

from cnf.fields import UNet, seeded_dropout
from cnf.training.config import PRESETS

PRESET = PRESETS["image-fm"]  # its U-Net: width, levels, time conditioning
COLUMNS = [
    Column("dropout", "dropout"),
    Column("masks", "masks"),
    Column("float32", "float32 ms/step", "{:.1f}", "ms", "CPU time per step (GPU: wall)"),
    Column("bf16", "bf16 autocast", "{:.1f}", "ms"),
    Column("bf16_speedup", "bf16 speed-up", "{:.2f}x", about="float32 time / bf16 time"),
    Column("compiled", "compiled", "{:.1f}", "ms"),
    Column("compiled_speedup", "compiled speed-up", "{:.2f}x", about="float32 / compiled"),
    Column("first", "compiled first step, s", "{:.1f}", "s", "compiling included"),
]


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()  # CPU seconds: the machine is shared


def time_steps(dropout: float, seeded: bool, mode: str, args, device) -> tuple:
    torch.manual_seed(0)
    net = UNet(1, width=PRESET["unet_width"], resolutions=PRESET["unet_resolutions"],
               dropout=dropout, scale_shift=PRESET["unet_scale_shift"]).to(device)  # fmt: skip
    field = torch.compile(net) if mode == "compiled" else net
    bf16 = mode == "bf16"
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    x = torch.randn(args.batch, 1, args.size, args.size, device=device)
    t = torch.rand(args.batch, device=device)

    def one(i: int) -> None:
        gen = torch.Generator(device=device).manual_seed(i)
        with (
            seeded_dropout(net, gen, None, args.batch) if seeded else contextlib.nullcontext(),
            torch.autocast(device.type, torch.bfloat16, enabled=bf16),
        ):
            out = field(t, x)
        loss = (out.float() - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    start = clock(device)
    one(0)
    first = clock(device) - start
    for i in range(5):
        one(1 + i)
    start = clock(device)
    for i in range(args.steps):
        one(6 + i)
    return first, (clock(device) - start) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=8, help="image height and width (default 8)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per row (default 50)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--gpu", action="store_true", help="on CUDA")
    harness.add_arguments(parser)
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device")
    results = harness.start(__file__, parser, args)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.gpu else "cpu")
    what = torch.cuda.get_device_name(device) if args.gpu else f"CPU, {args.threads} thread(s)"
    rows = []
    for dropout, seeded in ((0.0, False), (0.0, True), (0.1, True)):
        _, eager = time_steps(dropout, seeded, "float32", args, device)
        _, bf16 = time_steps(dropout, seeded, "bf16", args, device)
        first, comp = time_steps(dropout, seeded, "compiled", args, device)
        masks = "seeded per step (as cnf trains)" if seeded else "none (a plain module call)"
        rows.append(dict(dropout=dropout, masks=masks, float32=eager * 1e3, bf16=bf16 * 1e3,
                         bf16_speedup=eager / bf16, compiled=comp * 1e3,
                         compiled_speedup=eager / comp, first=first))  # fmt: skip
        print(f"  dropout {dropout}, {masks}: {eager * 1e3:.1f} ms/step in float32",
              file=sys.stderr, flush=True)  # fmt: skip
    results.table("steps", f"U-Net regression step, batch {args.batch} of "
                  f"1x{args.size}x{args.size}, {what}", COLUMNS, rows)  # fmt: skip
    results.write()


if __name__ == "__main__":
    main()
