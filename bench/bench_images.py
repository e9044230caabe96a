"""Image CNF benchmark: test bits/dim after the same wall-clock training budget.

    python bench/bench_images.py                  # CPU: digits, 5 minutes per model (~35 min)
    python bench/bench_images.py --minutes 0.5    # a smoke run
    python bench/bench_images.py --gpu            # one GPU: Fashion-MNIST, 10 minutes per model
    python bench/bench_images.py --grids figures  # also a PNG of each model's samples
    python bench/bench_images.py --data mnist-5k --minutes 20 --eval-n 200 --only cnf fm-unet
    python bench/bench_images.py --only fm-unet --eval-n 64 --dequant-samples 8 --iw-steps 16

Each row trains one configuration from scratch, in this process, on the same device, for the same
training-time budget, through ``cnf.training.fit`` (the loop of ``cnf train``: its seeding, step
adaptation and clipping), with AdamW; FFJORD's row at its constant learning rate, the others on
the cosine schedule over the iterations that ``cnf train --budget`` plans for the budget (a row
whose plan overruns stops at the budget all the same; ``--constant-lr``: every row at its
constant learning rate, as this benchmark trained before). Then it evaluates the
whole test set (digits: 360 images; Fashion-MNIST: 10,000, ``--eval-n`` to cut) with the row's
evaluation solver and reports bits/dim (see cnf/evaluate.py), the iterations done, iterations per
second and the mean forward NFE per training iteration.

Rows:

* ``ffjord``: FFJORD's MNIST configuration (Grathwohl et al. 2019, README and train_cnf.py):
  multiscale, ``--dims 64,64,64``, 2 CNF blocks per stage, ``concat`` conv layers, softplus,
  dopri5 at atol = rtol = 1e-5 (training and test), gradients by the adjoint method, learnable
  T, Hutchinson (Rademacher), logit alpha 1e-6, batch 200, lr 1e-3. On the CPU rows the same
  configuration, on digits.
* ``cnf``: our configuration for the budget. CPU (digits): one block per stage, two 32-channel
  ``concatsquash`` layers with tanh, trained with rk4 in two steps per block, batch 64, lr 3e-3
  (the best of a few one-to-two-minute trials), direct backpropagation. GPU: FFJORD's
  configuration with ``concatsquash`` layers and RNODE's kinetic and Jacobian regularization
  (0.01 each; Finlay et al. 2020, arXiv:2002.02798), which keeps the dynamics simple and the
  solver's steps few.
* ``fm-unet``: ``cnf train``'s image preset (``PRESETS["image-fm"]``): one CNF block over the
  whole image, a U-Net field (width 32, 2 levels, dropout 0.1, the time scaling and shifting
  each residual block's normalized features as in ADM's U-Net) trained by flow matching with
  logit-normal times, batch 128, lr 2e-3.
* ``fm-unet-shift``: the same with ``--no-unet-scale-shift`` (the time shifts each block's
  features before the norm), the preset until bench_image_recipes.py measured the scale and
  shift 0.016 bits/dim better at 2,900 iterations, on two seeds.
* ``fm-unet-bf16``: ``fm-unet`` under bfloat16 autocast (``--autocast bf16``: the regression's
  forward pass; the likelihood is evaluated in float32 as for every row).
* ``fm+mle``: the same, by flow matching for half the budget and by maximum likelihood (from the
  largest valid rk4 step) for the other half, as ``--budget`` plans it with ``--finetune-share
  0.5``, its cosine schedule restarting at ``--finetune-lr`` (default 1e-4: at 1e-3 Adam's first
  steps undid the annealed flow-matching model, see the README). The test bits/dim at the end of
  the flow-matching half is printed too (evaluated outside the budget).

``--dequant-samples K`` also reports the importance-weighted bound over K dequantizations
(:func:`cnf.dequantize.dequantized_bound`, exact trace) on the ``--eval-n`` first test images, the
K = 1 bound on the same draws, and what a log-mean-exp of Hutchinson estimates of the same
log-densities would claim instead, with the probe's noise (why the bound takes the exact trace).
The exact trace makes it ``D`` times the cost of the Hutchinson evaluation; ``--iw-steps N``
computes it with rk4 in N steps (the image preset's evaluation solver has 16) instead of
dopri5. ``--iw-probes P`` adds the bound on P averaged Hutchinson probes per draw (``P`` times
the cost of a Hutchinson evaluation) on the same draws, with the estimate of the bias that their
noise leaves; ``--no-iw-exact`` leaves the exact trace out (a 28x28 U-Net's takes hours on a
CPU):

    python bench/bench_images.py --data mnist-5k --minutes 20 --eval-n 20 --only fm-unet \
        --constant-lr --dequant-samples 4 --iw-steps 16 --no-iw-exact --iw-probes 64 \
        --eval-batch 256

Every row is evaluated with dopri5 at atol = rtol = 1e-5, whatever it trained with: the density
of the continuous flow its field defines, not of a coarse discretization of it.

The uniform density on the dequantized cube, log2(levels) bits/dim (4.09 for digits, 8 for 8-bit
images), is the score of a model that learned nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import harness
import torch
from harness import Column

from cnf.dequantize import dequantization_draws, dequantized_bound
from cnf.evaluate import bits_per_dim, evaluate
from cnf.flow import evaluating
from cnf.runtime import to_tensor
from cnf.solvers import Solver
from cnf.training import Hooks, TrainConfig, budget, fit, setup
from cnf.training.config import PRESETS
from cnf.viz import save_sample_grid

FFJORD = dict(
    hidden=(64, 64, 64), blocks=2, conv_layer="concat", activation="softplus", method="dopri5",
    atol=1e-5, rtol=1e-5, eval_method="dopri5", eval_atol=1e-5, eval_rtol=1e-5, learn_T=True,
    trace="hutchinson", noise="rademacher", alpha=1e-6, batch_size=200, lr=1e-3, adjoint=True,
    schedule="constant",
)  # fmt: skip

# cnf train's image preset for flow matching (PRESETS["image-fm"]), evaluated as the others are
FM_UNET = {**PRESETS["image-fm"], "eval_method": "dopri5", "eval_step_size": None,
           "eval_atol": 1e-5, "eval_rtol": 1e-5}  # fmt: skip

CONFIGS: dict[str, dict[str, dict]] = {
    "cpu": {
        "cnf": dict(
            data="digits", hidden=(32, 32), blocks=1, conv_layer="concatsquash",
            activation="tanh", method="rk4", step_size=0.5, eval_method="dopri5",
            eval_atol=1e-5, eval_rtol=1e-5, trace="hutchinson", batch_size=64, lr=3e-3,
        ),
        "ffjord": dict(data="digits", **FFJORD),
        "fm-unet": dict(data="digits", **FM_UNET),
        "fm-unet-shift": dict(data="digits", **{**FM_UNET, "unet_scale_shift": False}),
        "fm-unet-bf16": dict(data="digits", **FM_UNET, autocast="bf16"),
        "fm+mle": dict(data="digits", **{**FM_UNET, "finetune_share": 0.5}, finetune_iters=1),
    },
    "gpu": {
        "cnf": dict(data="fashion-mnist", **{**FFJORD, "conv_layer": "concatsquash"},
                    kinetic=0.01, jacobian=0.01),
        "ffjord": dict(data="fashion-mnist", **FFJORD),
        "fm-unet": dict(data="fashion-mnist", **FM_UNET),
        "fm-unet-shift": dict(data="fashion-mnist", **{**FM_UNET, "unet_scale_shift": False}),
        "fm-unet-bf16": dict(data="fashion-mnist", **FM_UNET, autocast="bf16"),
        "fm+mle": dict(data="fashion-mnist", **{**FM_UNET, "finetune_share": 0.5},
                       finetune_iters=1),
    },
}  # fmt: skip


COLUMNS = [
    Column("name", "model"),
    Column("iters", "iterations"),
    Column("rate", "it/s", "{:.2f}", "it/s", "iterations over their own wall time"),
    Column("cpu", "training CPU s", "{:.0f}", "s"),
    Column("nfe", "NFE/iter (fwd)", "{:.0f}", about="mean forward NFE per training iteration"),
    Column("bpd", "test bits/dim (K=1)", "{:.3f}", "bits/dim", "dequantized, one draw"),
    Column("bpd_se", "± SE", "{:.3f}", "bits/dim"),
]


def iw_columns(k: int, exact: bool, probes: int | None) -> list[Column]:
    """The importance-weighted table's columns: the exact trace's, the probes' or both."""
    columns = [Column("name", "model")]
    bits = "{:.3f}"
    if exact:
        columns += [
            Column("exact_k1", "K=1, exact trace", bits, "bits/dim"),
            Column("exact", f"K={k}, exact trace", bits, "bits/dim"),
            Column("hutchinson", f"K={k} on Hutchinson estimates (biased)", bits, "bits/dim"),
            Column("probe_noise", "probe noise, nats/image", "{:.2f}", "nats"),
        ]
    if probes:
        columns += [
            Column("probed_k1", f"K=1, {probes} probes", bits, "bits/dim"),
            Column("probed", f"K={k}, {probes} probes", bits, "bits/dim"),
            Column("probed_se", "± SE", bits, "bits/dim"),
            Column("probed_bias", "its bias (estimated)", "{:.4f}", "bits/dim"),
        ]
    return columns


class _Report(Hooks):
    """Prints the training bits/dim every 30 seconds of training, and the test bits/dim at the
    end of a flow-matching phase that maximum likelihood follows (``switch``: its last iteration
    and the test images; evaluated outside the budget)."""

    def __init__(self, tag: str, dim: int, switch: tuple[int, torch.Tensor] | None = None) -> None:
        self.tag, self.dim, self.spent, self.last, self.nfe = tag, dim, 0.0, 0.0, 0
        self.switch = switch

    def row(self, state, row) -> None:
        if self.switch and state.iteration == self.switch[0]:
            ev = evaluate(state.model, self.switch[1], batch_size=1000)
            print(f"  {self.tag}: {ev.bits_per_dim:.3f} test bits/dim after the {state.iteration} "
                  f"flow-matching iterations", file=sys.stderr, flush=True)  # fmt: skip
        self.spent += row["time"]
        self.nfe += row["nfe"]
        if self.spent - self.last > 30:
            self.last = self.spent
            loss = (f"train {row['nll'] / (self.dim * math.log(2)):.3f} bits/dim" if "nll" in row
                    else f"flow-matching loss {row['fm_loss']:.4f}")  # fmt: skip
            print(f"  {self.tag}: {self.spent:5.0f} s, iteration {row['iter']}, {loss}, "
                  f"NFE {row['nfe']}", file=sys.stderr, flush=True)  # fmt: skip


def train_for(cfg: TrainConfig, seconds: float, tag: str, eval_n: int | None = None) -> dict:
    """Train ``cfg`` from scratch through ``cnf.training.fit`` for ``seconds`` of training time
    (``fit``'s budget: the iterations' own time); return the setup and counts. A flow-matching
    phase that maximum likelihood follows is scored at its end on ``eval_n`` test images."""
    run = setup(cfg)
    if cfg.schedule != "constant" or cfg.finetune_iters:  # plan the iterations, and the
        # schedule over them, as cnf train --budget does; the budget still stops a row whose
        # plan overruns (a busier machine, more solver steps)
        cfg, plan = budget.plan(cfg.replace(budget=seconds), run)
        print(f"  {tag}: {plan.describe()}", file=sys.stderr, flush=True)
        run = setup(cfg, data=run.data)
    dim = math.prod(run.data.event_shape)
    switch = None
    if cfg.objective == "fm" and cfg.finetune_iters:
        switch = (cfg.iters, to_tensor(run.data.test(eval_n), run.device, run.dtype))
    report = _Report(tag, dim, switch)
    with harness.timed() as t:
        result = fit(run.state, run.data, run.objective, cfg, hooks=report, progress=False,
                     quiet=True, seconds=seconds)  # fmt: skip
        if run.device.type == "cuda":
            torch.cuda.synchronize()
    return dict(run=run, iters=result.iteration, seconds=t.wall, cpu=t.cpu,
                nfe=report.nfe / result.iteration)  # fmt: skip


def run_row(name: str, overrides: dict, args: argparse.Namespace, device: torch.device) -> dict:
    # no evaluations during training (eval_every past any budget)
    flat = {**overrides, "device": str(device), "eval_every": 10**7,
            "threads": args.threads}  # fmt: skip
    if args.constant_lr:
        flat["schedule"] = "constant"
    if flat.get("schedule") == "constant" and not flat.get("finetune_iters"):
        flat["iters"] = 10**7  # train until the budget ends
    if flat.get("finetune_iters"):
        flat["finetune_lr"] = args.finetune_lr
    if args.data:
        flat["data"] = args.data
    if args.data_dir:
        flat["data_dir"] = args.data_dir
    cfg = TrainConfig.plain(**flat)
    out = train_for(cfg, args.minutes * 60, name, args.eval_n)
    run = out["run"]
    if args.grids:
        args.grids.mkdir(parents=True, exist_ok=True)
        save_sample_grid(run.model, args.grids / f"{cfg.data}_{name}_samples.png", overwrite=True)
    x = to_tensor(run.data.test(args.eval_n), device, run.dtype)
    t0 = time.perf_counter()
    ev = evaluate(run.model, x, batch_size=args.eval_batch)
    print(f"  {name}: evaluated {ev.n} test images in {time.perf_counter() - t0:.0f} s: "
          f"{ev.bits_per_dim:.3f} bits/dim after {out['iters']} iterations",
          file=sys.stderr, flush=True)  # fmt: skip
    iw = math.nan
    if args.dequant_samples > 1:
        pixels = run.data.test_pixels(args.eval_n).to(device)
        t0 = time.perf_counter()
        solver = Solver("rk4", step_size=1 / args.iw_steps) if args.iw_steps else None
        iw = importance_weighted(run.model, pixels, args.dequant_samples, args.eval_batch, solver,
                                 exact=args.iw_exact, probes=args.iw_probes)  # fmt: skip
        print(f"  {name}: importance-weighted bound, K={args.dequant_samples}, in "
              f"{time.perf_counter() - t0:.0f} s: {iw}", file=sys.stderr, flush=True)  # fmt: skip
    return dict(name=name, data=cfg.data, iters=out["iters"], rate=out["iters"] / out["seconds"],
                cpu=out["cpu"], iw=iw, nfe=out["nfe"], bpd=ev.bits_per_dim, bpd_se=ev.nll_se /
                (math.prod(x.shape[1:]) * math.log(2)), levels=run.data.levels)  # fmt: skip


def importance_weighted(
    model,
    pixels,
    samples: int,
    batch_size: int,
    solver=None,
    *,
    exact: bool = True,
    probes: int | None = None,
) -> dict:
    """On the same draws under ``solver`` (default: the model's evaluation solver):
    ``dequantized_bound`` with the exact trace and beside it what a log-mean-exp of single
    Hutchinson estimates would claim, with the probe's noise per image (nats); with ``probes``,
    the bound on ``probes`` averaged Hutchinson estimates per draw and its estimated bias."""
    gen = lambda: torch.Generator(device=pixels.device).manual_seed(0)  # noqa: E731
    dim, out = math.prod(pixels.shape[1:]), {}
    if exact:
        bound = dequantized_bound(model, pixels, samples, generator=gen(),
                                  batch_size=batch_size, solver=solver)  # fmt: skip
        u = torch.empty(samples, *pixels.shape, dtype=torch.float64, device=pixels.device)
        for (i, j), block, chunk in dequantization_draws(pixels, samples, gen()):
            u[j : j + len(chunk), i : i + len(block)] = chunk  # the bound's own draws
        x = (pixels.double() + u).flatten(0, 1).to(next(model.parameters()))
        with torch.no_grad(), evaluating(model):
            noisy = [model.log_prob(part, generator=gen(), solver=solver, trace="hutchinson")
                     for part in x.split(batch_size)]  # fmt: skip
        noisy = torch.cat(noisy).double().reshape(samples, -1)
        exact_draws = bound.draws.to(noisy.device)  # the exact log-densities of the same draws
        hutch = -float((torch.logsumexp(noisy, 0) - math.log(samples)).mean())
        out.update(exact=bound.bits_per_dim, exact_k1=bound.single_bits_per_dim,
                   hutchinson=bits_per_dim(hutch, dim),
                   probe_noise=float((noisy - exact_draws).std()))  # fmt: skip
    if probes:
        est = dequantized_bound(model, pixels, samples, probes=probes, generator=gen(),
                                batch_size=batch_size, solver=solver)  # fmt: skip
        out.update(probed=est.bits_per_dim, probed_k1=est.single_bits_per_dim,
                   probed_bias=est.probe_bias_bits_per_dim, probed_noise=est.probe_noise,
                   probed_se=est.nll_se / (dim * math.log(2)))  # fmt: skip
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU, {threads} thread{'s' if threads > 1 else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="Fashion-MNIST on CUDA")
    parser.add_argument("--minutes", type=float, help="budget per model (CPU 5, GPU 10)")
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS["cpu"]), help="rows to run")
    parser.add_argument("--data", help="the CPU rows' dataset (default digits; mnist-5k needs "
                        "pip install 'cnf[mnist5k]')")  # fmt: skip
    parser.add_argument(
        "--dequant-samples",
        type=int,
        default=1,
        metavar="K",
        help="also the importance-weighted bits/dim over K dequantizations",
    )
    parser.add_argument("--iw-steps", type=int, metavar="N", help="the importance-weighted "
                        "bound with rk4 at step 1/N (N steps over flow matching's T = 1; "
                        "default: the row's evaluation solver, dopri5 at 1e-5)")  # fmt: skip
    parser.add_argument("--iw-exact", action=argparse.BooleanOptionalAction, default=True,
                        help="the importance-weighted bound with the exact trace (default; "
                        "--no-iw-exact: only --iw-probes's, for 28x28 U-Nets)")  # fmt: skip
    parser.add_argument("--iw-probes", type=int, metavar="P", help="also the importance-"
                        "weighted bound on P averaged Hutchinson probes per draw, with its "
                        "estimated bias (P >= 2)")  # fmt: skip
    parser.add_argument("--data-dir", help="Fashion-MNIST IDX files (default: Debian's path)")
    parser.add_argument("--eval-n", type=int, help="test images to evaluate (default: all)")
    parser.add_argument("--eval-batch", type=int, default=1000, help="test images per solve")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--finetune-lr", type=float, default=1e-4, help="fm+mle: the maximum-"
                        "likelihood phase's peak learning rate (default 1e-4)")  # fmt: skip
    parser.add_argument("--constant-lr", action="store_true", help="every row at a constant "
                        "learning rate until its budget ends (the benchmark before it planned "
                        "cosine schedules)")  # fmt: skip
    parser.add_argument("--grids", type=Path, help="write (or replace) each model's 64 samples "
                        "as a PNG in this directory")  # fmt: skip
    harness.add_arguments(parser)
    args = parser.parse_args()
    results = harness.start(__file__, parser, args, ignore=("grids", "data_dir"))
    args.minutes = args.minutes or (10.0 if args.gpu else 5.0)
    if args.iw_steps is not None and args.iw_steps < 1:
        parser.error(f"--iw-steps must be a positive integer, got {args.iw_steps}")
    if args.iw_probes is not None and args.iw_probes < 2:
        parser.error(f"--iw-probes must be an integer >= 2, got {args.iw_probes}")
    if args.dequant_samples > 1 and not (args.iw_exact or args.iw_probes):
        parser.error("--no-iw-exact needs --iw-probes P: the bound needs one trace or the other")
    if args.gpu and args.data:
        parser.error("--data is for the CPU rows; --gpu trains on Fashion-MNIST")
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device; run without it for the CPU benchmark")
    device = torch.device("cuda" if args.gpu else "cpu")
    configs = CONFIGS["gpu" if args.gpu else "cpu"]
    names = list(dict.fromkeys(args.only)) if args.only else list(configs)  # in the order given
    if missing := [n for n in names if n not in configs]:
        parser.error(f"no {'GPU' if args.gpu else 'CPU'} row {missing[0]!r}; rows: {list(configs)}")
    rows = [run_row(name, configs[name], args, device) for name in names]
    results.settings["minutes"] = args.minutes
    uniform = dict(name="uniform (learned nothing)", bpd=math.log2(rows[0]["levels"]))
    results.table("bits", f"{rows[0]['data']}, {args.minutes:g} min of training per model on "
                  f"{device_name(device)}", COLUMNS,
                  [*({c.key: r[c.key] for c in COLUMNS} for r in rows), uniform])  # fmt: skip
    k = args.dequant_samples
    if k > 1:
        n = args.eval_n or "all"
        how = f"rk4 at step 1/{args.iw_steps}" if args.iw_steps else "each row's evaluation solver"
        results.table("bound", f"Importance-weighted bound on {n} test images, K={k} (the same "
                      f"draws per row; {how})", iw_columns(k, args.iw_exact, args.iw_probes),
                      [dict(name=r["name"], **r["iw"]) for r in rows])  # fmt: skip
    results.write()


if __name__ == "__main__":
    main()
