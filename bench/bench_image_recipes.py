"""Flow-matching recipes for the single-scale U-Net image model: test and training bits/dim
after the same number of iterations, a change or two at a time from ``cnf train``'s preset.

    python bench/bench_image_recipes.py                         # digits, 2,900 iterations each
    python bench/bench_image_recipes.py --iters 1500 --only no-dropout no-dropout+width-64
    python bench/bench_image_recipes.py --only shift preset --seed 1  # another seed
    python bench/bench_image_recipes.py --iters 20 --eval-n 20  # a smoke run

Each row trains ``PRESETS["image-fm"]`` with the options its name says changed, from scratch,
in this process, on one thread, through ``cnf.training.fit`` (the loop of ``cnf train``) with
its cosine schedule over ``--iters`` iterations (2,900: what 5 minutes bought on the
development machine beside other work; about 4,400 on a quieter one), then scores the model
with its evaluation solver (rk4 in 16 steps; it agrees with dopri5 at 1e-5 to 1e-4 bits/dim
here) on the test images and on as many training
images: the gap between the two is the overfitting that the 1,257 digits allow. The Hutchinson
probes are seeded and the same for every row.

This is how the preset was chosen (its comment in cnf/training/config.py quotes these rows).
"""

from __future__ import annotations

import argparse

import harness
import torch
from harness import Column

from cnf.evaluate import evaluate
from cnf.runtime import to_tensor
from cnf.training import TrainConfig, fit, setup
from cnf.training.config import PRESETS

# The preset conditions the U-Net on the time by a scale and shift of each block's normalized
# features; the rows after "shift" were measured before that, as changes of the shift-only
# preset, and keep it (SHIFT) so that they still train the model they measured.
SHIFT = dict(unet_scale_shift=False)
VARIANTS: dict[str, dict] = {
    "preset": {},
    "shift": SHIFT,
    "dropout-0.2": dict(**SHIFT, unet_dropout=0.2),
    "resolutions-3": dict(**SHIFT, unet_resolutions=3),
    "bf16": dict(**SHIFT, autocast="bf16"),
    "bf16+coupling-ot": dict(**SHIFT, autocast="bf16", coupling="ot"),
    "bf16+lr-1e-3": dict(**SHIFT, autocast="bf16", lr=1e-3),
    "alpha-1e-4": dict(**SHIFT, alpha=1e-4),
    "alpha-0.01": dict(**SHIFT, alpha=0.01),
    "alpha-0.05": dict(**SHIFT, alpha=0.05),
    "no-dropout": dict(**SHIFT, unet_dropout=0.0),
    "no-dropout+uniform-time": dict(**SHIFT, unet_dropout=0.0, time_sampling="uniform"),
    "no-dropout+weight-decay-0.3": dict(**SHIFT, unet_dropout=0.0, weight_decay=0.3),
    "no-dropout+sigma-min-0.1": dict(**SHIFT, unet_dropout=0.0, sigma_min=0.1),
    "no-dropout+width-64": dict(**SHIFT, unet_dropout=0.0, unet_width=64),
    "no-dropout+lr-5e-3": dict(**SHIFT, unet_dropout=0.0, lr=5e-3),
    "no-dropout+no-logit": dict(**SHIFT, unet_dropout=0.0, alpha=0.0),
}


COLUMNS = [
    Column("name", "recipe"),
    Column("change", "change", about="the options changed from the preset"),
    Column("test", "test bits/dim", "{:.3f}", "bits/dim"),
    Column("train", "train bits/dim", "{:.3f}", "bits/dim", "as many training images as test"),
    Column("gap", "gap", "{:.3f}", "bits/dim", "test - train"),
    Column("seconds", "training CPU s", "{:.0f}", "s"),
]


def run_row(name: str, args: argparse.Namespace) -> dict:
    flat = {**PRESETS["image-fm"], **VARIANTS[name], "data": args.data, "iters": args.iters,
            "seed": args.seed,
            "eval_every": 10**7, "threads": 1, "device": "cpu"}  # fmt: skip
    cfg = TrainConfig.plain(**flat)
    run = setup(cfg)
    with harness.timed() as t:
        fit(run.state, run.data, run.objective, cfg, progress=False, quiet=True)

    def bpd(x) -> float:
        x = to_tensor(x, run.device, run.dtype)
        return evaluate(run.model, x, batch_size=1000, seed=0).bits_per_dim  # the same probes

    images = run.data.test(args.eval_n)
    test, train = bpd(images), bpd(run.data.train_batch(len(images), 1))
    change = ", ".join(f"{k}={v}" for k, v in VARIANTS[name].items()) or "(preset)"
    return dict(name=name, change=change, test=test, train=train, gap=test - train,
                seconds=t.cpu)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="digits", help="an image dataset (default digits)")
    parser.add_argument("--iters", type=int, default=2900, help="iterations per row")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the training seed (initialization, batches, times; default 0)",
    )
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="rows to run")
    parser.add_argument("--eval-n", type=int, help="test images to score (default: all)")
    harness.add_arguments(parser)
    args = parser.parse_args()
    results = harness.start(__file__, parser, args)
    torch.set_num_threads(1)
    rows = []
    for name in args.only or list(VARIANTS):
        rows.append(run_row(name, args))
        r = rows[-1]
        print(f"  {name}: test {r['test']:.3f}, train {r['train']:.3f} bits/dim, "
              f"{r['seconds']:.0f} CPU s", flush=True)  # fmt: skip
    results.table("recipes", f"{args.data}, {args.iters} iterations per recipe, one thread",
                  COLUMNS, rows)  # fmt: skip
    results.write()


if __name__ == "__main__":
    main()
