"""Conditional densities p(x | c): cnf against zuko's conditional neural spline flow for the same
CPU seconds, scored by the KL from the closed-form conditional density; on two tables, against
it and the regressors and mixtures a user would reach for, by the test log-likelihood.

    python bench/bench_conditional.py                    # 120 s a model (about 45 min on 2 cores)
    python bench/bench_conditional.py --seconds 60 --gl-seconds 45 --n 1000   # about 25 minutes
    python bench/bench_conditional.py --parts tables     # the tables only (about 4 minutes)
    python bench/bench_conditional.py --seeds 0 1 2      # mean over seeds
    python bench/bench_conditional.py --quick            # a smoke run (about a minute)

Three parts (``--parts``, all by default), each model trained from scratch in this process, on
one thread:

* the toys with a closed-form :math:`p(x \\mid c)` (``8gaussians-given-component``: 8 labels;
  ``rotating-gaussian``: one continuous feature), fresh pairs every batch, ``--seconds`` of
  training CPU time per model;
* the posterior :math:`p(\\theta \\mid x)` of sbibm's 10-D Gaussian-linear task
  (``gaussian-linear``) from a fixed set of ``--simulations`` pairs (its ``n_train``), for
  ``--gl-seconds`` each, validated on ``n_train / 10`` further simulations (at most 2,000);
* the tables (bench/conditional_tables.py): :math:`p(\\text{target} \\mid \\text{features})`
  on scikit-learn's diabetes (442 rows, 10 features, original units) and
  :math:`p(\\text{13 features} \\mid \\text{class})` on wine (178 rows, 3 classes), below.

cnf trains through ``cnf.training`` (``TrainConfig.for_data``, the budget plan, ``fit``), its
iterations planned for the budget from the CPU time of a few timed ones:

* ``cnf fm``: flow matching alone (independent coupling, SiLU, lr 5e-3 cosine), the
  objective of sbi's FMPE;
* ``cnf fm wide``: the same with a field of two layers of 128 (``--hidden 128,128``), toys only
  (``--systems "cnf fm wide"``): on 8gaussians-given-component it reached KL 0.00035 after 60
  CPU s where the default field (three of 64) reached 0.0016 after 117;
* ``cnf fm ema``: ``cnf fm`` scored and kept with an exponential moving average of its weights
  (``--ema 0.999``), toys only (``--systems "cnf fm ema"``);
* ``cnf fm+mle``: ``cnf train --budget B`` as it is (flow matching for half the budget, then
  maximum likelihood from the largest valid step), toys only;
* ``cnf mle``: maximum likelihood throughout (the toy recipe: rk4 with the adapted step, RNODE
  0.01, lr 5e-3 cosine), toys only;
* ``NSF`` (``pip install zuko``; ``--no-zuko`` to leave it out): ``zuko.flows.NSF(features,
  context=K)`` on z-scored ``x`` and features (labels one-hot), by maximum likelihood with Adam
  1e-3 on a cosine over its CPU budget, the batch size of cnf (512), the same batches of the same
  pairs. On the toys 3 transforms, hidden 64-64, 8 bins; on Gaussian-linear sbi's NPE defaults
  (``build_zuko_nsf``: 5 transforms, hidden 50-50, 8 bins, z-scored).

Both keep the weights of their best validation NLL (cnf at its ``eval_every``, 1000 iterations
under flow matching and 250 under maximum likelihood, and at the end, as ``cnf train`` keeps;
zuko every 100 steps and at the end). "CPU s" is the training CPU time actually spent (the
iterations' own: validation and the plan's timing excluded): zuko trains until it has spent the
budget; cnf trains the iterations its plan of the budget comes to, and stops at the budget if
the plan overruns it (maximum likelihood refines its step as the field sharpens, which the plan's
timing of the first iterations cannot see; the schedule is then cut short), so read a row's KL
with its CPU seconds.

One evaluator for all: the Monte-Carlo KL of :func:`cnf.data.conditional.conditional_kl`,
:math:`E[\\log p(x \\mid c) - \\log q(x \\mid c)]` over ``--n`` draws from the true conditional
at each context, with its standard error: the 8 labels; 20 features at the midpoints of 20 equal
bins of :math:`[-1, 1]` (the prior is uniform); the 10 reference observations of
``GaussianLinear().observations()`` (``posterior_kl``). cnf's :math:`\\log q` is exact: float64,
exact trace, dopri5 at atol = rtol = 1e-6. With several ``--seeds`` (each its own simulations
and initialization) the KL is the mean over seeds, its standard error that of the mean of the
Monte-Carlo estimates, and "per seed" lists each.

The tables have no closed-form density: each seed (``--seeds``, 0 to 4 by default for this part)
splits the rows at random into training (60%), validation (20%) and test (20%) rows, and every
system is scored by the mean test :math:`\\log p(x \\mid c)` per row, in nats in the units of
the data (each standardization's log-det counted), with its standard error across the seeds and
the paired difference "cnf - system". Every fit runs to its own stopping rule, its CPU seconds
counted (one thread, BLAS included), on the training and validation rows:

* ``cnf``: ``cnf.CNFRegressor`` with its defaults (``--cnf NAME=VALUE`` sets others) on the
  training and validation rows together, holding out as many rows as the validation split for
  its early stopping (its own seeded choice), its weight decay (1e-2, 0.3 or 3) the one of the
  best held-out log-likelihood, as the GMM chooses its components; wine's class one-hot; exact
  ``score_samples``;
* ``NSF``: ``zuko.flows.NSF(features, context=K)`` (3 transforms, hidden 64-64) on z-scored rows
  and features (the class one-hot), maximum likelihood with Adam 1e-3, batches of 256, stopped
  after 20 validation evaluations (every 25 steps) without a better NLL, as in
  bench/bench_tabular.py;
* ``GP`` (diabetes): scikit-learn's ``GaussianProcessRegressor``, ``ConstantKernel * RBF +
  WhiteKernel`` (a length scale per standardized feature, ``normalize_y``, 2 restarts) on the
  training and validation rows; its predictive density is the normal of the predictive mean and
  standard deviation, white noise included;
* ``NGBoost`` (diabetes; ``pip install ngboost``, else left out): ``NGBRegressor`` with a normal
  distribution and its defaults, stopped early on the validation rows (50 rounds),
  ``pred_dist(X).logpdf(y)`` at its best iteration;
* ``GMM`` (wine): a ``GaussianMixture`` per class on the standardized rows, its components
  (1 to 3) and covariance type (full, tied, diag, spherical; one choice for all classes) those of
  the best validation log-likelihood, :math:`p(x \\mid \\text{class})` directly.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import conditional_tables as tables
import harness
import numpy as np
import torch
from harness import Column
from threadpoolctl import threadpool_limits

from cnf.data import get_dataset
from cnf.data.conditional import GaussianLinear, conditional_kl
from cnf.solvers import Solver
from cnf.training import KeepBest, TrainConfig, fit, setup
from cnf.training import budget as budgeting

TOYS = ("8gaussians-given-component", "rotating-gaussian")
PARTS = ("toys", "gl", "tables")
SEEDS = {"toys": [0], "gl": [0], "tables": [0, 1, 2, 3, 4]}  # where --seeds is not given
SIMULATIONS = (1_000, 10_000, 100_000)
# cnf's systems as in bench/bench_objectives.py: options over the toys' recipe (for_data)
SYSTEMS = {
    "cnf fm": dict(objective="fm", finetune_share=0.0, lr=5e-3, activation="silu", eval_every=1000),
    "cnf fm wide": dict(
        objective="fm",
        finetune_share=0.0,
        lr=5e-3,
        activation="silu",
        hidden=(128, 128),
        eval_every=1000,
    ),
    "cnf fm ema": dict(
        objective="fm", finetune_share=0.0, lr=5e-3, activation="silu", eval_every=1000, ema=0.999
    ),
    "cnf fm+mle": {},  # cnf train --budget B as it is
    "cnf mle": dict(objective="mle"),
}
GL_SYSTEMS = ("cnf fm",)
# zuko's NSF: on the 2-D toys as bench/bench_tabular.py; on Gaussian-linear, sbi's NPE defaults
NSF = {"toy": dict(transforms=3, hidden_features=(64, 64)),
       "gaussian-linear": dict(transforms=5, hidden_features=(50, 50))}  # fmt: skip
ZUKO_LR, ZUKO_EVAL_EVERY = 1e-3, 100
EVALUATOR = Solver("dopri5", atol=1e-6, rtol=1e-6, max_nfe=200_000)
QUICK = dict(hidden=(16, 16), eval_every=50)


def train_cnf(data_name: str, system: str, seconds: float, seed: int, quick: bool, **extra):
    """One cnf model, its iterations planned for ``seconds`` of training CPU time; the model (its
    best weights), the training CPU seconds, iterations, the plan."""
    flat = {**SYSTEMS[system], "budget": seconds, "seed": seed, "threads": 1, "device": "cpu"}
    if quick:
        flat.update(QUICK)
    cfg = TrainConfig.for_data(data_name, **flat, extra=extra)
    first = setup(cfg)
    cfg, plan = budgeting.plan(cfg, first)
    run = setup(cfg, data=first.data)
    keep = KeepBest()
    result = fit(run.state, run.data, run.objective, cfg, hooks=keep, progress=False, quiet=True,
                 seconds=seconds)  # fmt: skip
    keep.restore(run.state)
    return run.model, keep.cpu, result.iteration, plan.describe()


def cnf_log_q(model: torch.nn.Module):
    """``log_q(x, c)`` of a trained cnf model: float64, exact trace, dopri5 at 1e-6."""
    exact = copy.deepcopy(model).double().eval()

    @torch.no_grad()
    def log_q(x: np.ndarray, c: np.ndarray) -> torch.Tensor:
        xs = torch.as_tensor(x).split(5000)
        cs = torch.as_tensor(c).split(5000)  # labels stay integers, features float64
        return torch.cat([exact.log_prob(a, context=b, solver=EVALUATOR, trace="exact")
                          for a, b in zip(xs, cs, strict=True)])  # fmt: skip

    return log_q


def train_zuko(data, data_name: str, seconds: float, seed: int, batch_size: int, quick: bool):
    """zuko's conditional NSF on z-scored pairs (labels one-hot), maximum likelihood with Adam on
    the same batches as cnf until it has spent ``seconds`` of training CPU time; ``log_q``, the
    CPU seconds, the steps."""
    import zuko

    torch.manual_seed(seed)
    classes = data.context_meta().get("classes")
    # the z-scoring's statistics, from 10,000 training pairs (iteration 0: no batch of training)
    x0, c0 = data.train_batch(10_000, 0)
    mu, sd = x0.mean(0), x0.std(0)
    c_mu, c_sd = (0.0, 1.0) if classes else (c0.mean(0), c0.std(0))

    def inputs(x: np.ndarray, c: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if classes:
            context = torch.nn.functional.one_hot(torch.as_tensor(c), classes).float()
        else:
            context = torch.as_tensor((c - c_mu) / c_sd, dtype=torch.float32)
        return torch.as_tensor((x - mu) / sd, dtype=torch.float32), context

    width = classes or data.context_meta()["features"]
    shape = NSF["gaussian-linear" if data_name == "gaussian-linear" else "toy"]
    if quick:
        shape = dict(transforms=2, hidden_features=(16, 16))
    flow = zuko.flows.NSF(features=data.event_shape[0], context=width, **shape)
    opt = torch.optim.Adam(flow.parameters(), lr=ZUKO_LR)
    x_val, c_val = inputs(*data.validation())
    best, best_state, spent, it = -math.inf, None, 0.0, 0
    while spent < seconds:
        it += 1
        x, c = inputs(*data.train_batch(batch_size, it))  # cnf's batches, in its order
        c0 = time.process_time()
        # a cosine over the CPU budget, down to 1% of the learning rate (as cnf's schedule)
        for group in opt.param_groups:
            group["lr"] = ZUKO_LR * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * spent / seconds)))
        loss = -flow(c).log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        spent += time.process_time() - c0
        if it % ZUKO_EVAL_EVERY == 0 or spent >= seconds:
            with torch.no_grad():
                val = float(flow(c_val).log_prob(x_val).mean())
            if val > best:
                best, best_state = val, copy.deepcopy(flow.state_dict())
    flow.load_state_dict(best_state)
    logdet = float(np.log(sd).sum())  # the z-scoring's: log q(x | c) = log q(z | c') - sum log sd

    @torch.no_grad()
    def log_q(x: np.ndarray, c: np.ndarray) -> torch.Tensor:
        z, context = inputs(x, c)
        return flow(context).log_prob(z).double() - logdet

    return log_q, spent, it


def contexts(data_name: str) -> np.ndarray:
    """The contexts the KL is averaged over: every label, or the midpoints of 20 bins of the
    uniform prior on [-1, 1], or the 10 reference observations."""
    if data_name == "8gaussians-given-component":
        return np.arange(8)
    if data_name == "rotating-gaussian":
        return (np.arange(20) + 0.5)[:, None] / 10 - 1
    return GaussianLinear().observations()


def one_run(data, data_name: str, method: str, seconds: float, seed: int, args) -> dict:
    """Train one model for ``seconds`` of CPU time and score it: the KL, its standard error,
    iterations, training CPU seconds."""
    if method == "NSF":
        log_q, cpu, iters = train_zuko(data, data_name, seconds, seed, 512, args.quick)
        plan = f"{iters} steps"
    else:
        extra = {"n_train": data.n_train, "n_val": data.n_val} if data.n_train else {}
        model, cpu, iters, plan = train_cnf(data_name, method, seconds, seed, args.quick, **extra)
        log_q = cnf_log_q(model)
    with harness.timed() as t:
        kl = conditional_kl(data.task, log_q, contexts(data_name), args.n, seed)
    print(f"  {data_name} {method} seed {seed}: KL {kl.value:.4f} ± {kl.stderr:.4f} after "
          f"{cpu:.0f} CPU s ({plan}; evaluation {t.cpu:.0f} CPU s)", file=sys.stderr,
          flush=True)  # fmt: skip
    return dict(kl=kl.value, se=kl.stderr, iters=iters, cpu=cpu)


def summary(runs: list[dict]) -> dict:
    """Several seeds' runs of one model: the mean KL, the standard error of that mean, each
    seed's KL, the mean iterations and CPU seconds."""
    kls = [r["kl"] for r in runs]
    return dict(kl=float(np.mean(kls)), se=math.sqrt(sum(r["se"] ** 2 for r in runs)) / len(runs),
                per_seed=kls, iters=round(float(np.mean([r["iters"] for r in runs]))),
                cpu=float(np.mean([r["cpu"] for r in runs])))  # fmt: skip


def row(label: dict, methods: tuple[str, ...], results: dict[str, dict]) -> dict:
    """One table row: a KL column per method, then the lists of the rest in the methods' order;
    the ratio of zuko's KL to cnf's best."""
    cnf_best = min(results[m]["kl"] for m in methods if m != "NSF")
    seeds = [", ".join(f"{v:.4f}" for v in results[m]["per_seed"]) for m in methods]
    return dict(**label, **{m: results[m]["kl"] for m in methods},
                se=[results[m]["se"] for m in methods],
                per_seed="; ".join(seeds) if len(results[methods[0]]["per_seed"]) > 1 else None,
                iters=[results[m]["iters"] for m in methods],
                cpu=[results[m]["cpu"] for m in methods],
                ratio=results["NSF"]["kl"] / cnf_best if "NSF" in results else None)  # fmt: skip


def columns(first: list[Column], methods: tuple[str, ...], seeds: int) -> list[Column]:
    named = " / ".join(methods)
    several = [Column("per_seed", "per seed", about="each seed's KL, methods apart by semicolons")]
    return [
        *first,
        *(Column(m, m, "{:.4f}", "nats", f"{m}: KL from the true conditional", "min")
          for m in methods),
        Column("se", "± SE: " + named, "{:.4f}", "nats", "Monte-Carlo standard error"),
        *(several if seeds > 1 else []),
        Column("iters", "iterations: " + named, "{:,}", about="training iterations (mean)"),
        Column("cpu", "CPU s: " + named, "{:.0f}", "s", "training CPU seconds (mean)"),
        Column("ratio", "NSF / best cnf", "{:.2f}", about="zuko's KL over cnf's best"),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="*", default=list(TOYS), choices=list(TOYS))
    parser.add_argument("--seconds", type=float, default=120.0,
                        help="training CPU seconds per model on the toys")  # fmt: skip
    parser.add_argument("--simulations", nargs="*", type=int, default=list(SIMULATIONS),
                        help="Gaussian-linear's simulation budgets (none: skip it)")  # fmt: skip
    parser.add_argument("--gl-seconds", type=float, default=120.0,
                        help="training CPU seconds per model on Gaussian-linear")  # fmt: skip
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS),
                        help="cnf's systems on the toys (Gaussian-linear: cnf fm)")  # fmt: skip
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS),
                        help="the toys, Gaussian-linear (gl), the tables")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int,
                        help="default: 0 (toys, gl), 0 to 4 (tables)")  # fmt: skip
    parser.add_argument("--n", type=int, default=2000, help="KL draws per context")
    parser.add_argument("--quick", action="store_true", help="tiny models, 1 s budgets")
    parser.add_argument("--no-zuko", action="store_true", help="leave out zuko's NSF")
    tables.add_arguments(parser)
    harness.add_arguments(parser)
    args = parser.parse_args()
    results = harness.start(__file__, parser, args, smoke=args.quick)
    if args.quick:
        args.seconds, args.gl_seconds, args.n = 1.0, 1.0, 200
    zuko = not args.no_zuko and _have_zuko()
    results.settings.update(seconds=args.seconds, gl_seconds=args.gl_seconds, n=args.n, zuko=zuko)
    torch.set_num_threads(1)
    with threadpool_limits(1):  # scikit-learn's BLAS on one thread too, as torch
        _parts(results, args, zuko)
    results.write()


def _parts(results: harness.Results, args: argparse.Namespace, zuko: bool) -> None:
    """The parts that ``--parts`` names, in order, each adding its table to ``results``."""
    if "toys" in args.parts:
        _toys(results, _with_seeds(args, "toys"), zuko)
    if "gl" in args.parts:
        _gaussian_linear(results, _with_seeds(args, "gl"), zuko)
    if "tables" in args.parts:
        tables.run(results, _with_seeds(args, "tables"))


def _with_seeds(args: argparse.Namespace, part: str) -> argparse.Namespace:
    """``args`` with the part's seeds where ``--seeds`` is not given (the first one if quick)."""
    seeds = args.seeds or (SEEDS[part][:1] if args.quick else SEEDS[part])
    return argparse.Namespace(**{**vars(args), "seeds": seeds})


def _toys(results: harness.Results, args: argparse.Namespace, zuko: bool) -> None:
    """1. The toys: every method for ``--seconds``, on fresh pairs every batch."""
    methods = (*args.systems, *(("NSF",) if zuko else ()))
    rows = []
    for data_name in args.data:
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for seed in args.seeds:
            data = get_dataset(data_name, seed=seed)
            for method in methods:
                runs[method].append(one_run(data, data_name, method, args.seconds, seed, args))
        label = dict(dataset=data_name, entropy=get_dataset(data_name).entropy)
        rows.append(row(label, methods, {m: summary(r) for m, r in runs.items()}))
    if rows:
        first = [Column("dataset", "dataset"),
                 Column("entropy", "entropy", "{:.3f}", "nats", "the true H(X | C)")]  # fmt: skip
        results.table("toys", f"KL (nats) from the true p(x | c) after {args.seconds:g} training "
                      f"CPU s per model, one thread, {_seeds(args.seeds)}",
                      columns(first, methods, len(args.seeds)), rows)  # fmt: skip


def _gaussian_linear(results: harness.Results, args: argparse.Namespace, zuko: bool) -> None:
    """2. Gaussian-linear: the posterior p(theta | x) from a fixed number of simulations."""
    methods = (*GL_SYSTEMS, *(("NSF",) if zuko else ()))
    rows = []
    for n_train in args.simulations:
        runs = {m: [] for m in methods}
        for seed in args.seeds:
            n_val = min(max(n_train // 10, 10), 2000)
            data = get_dataset("gaussian-linear", seed=seed, n_train=n_train, n_val=n_val)
            for method in methods:
                runs[method].append(one_run(data, "gaussian-linear", method, args.gl_seconds,
                                            seed, args))  # fmt: skip
        rows.append(row(dict(simulations=n_train), methods,
                        {m: summary(r) for m, r in runs.items()}))  # fmt: skip
    if rows:
        first = [Column("simulations", "simulations", "{:,}")]
        results.table("gaussian_linear", "Gaussian-linear (10-D): KL (nats) from the true "
                      "posterior, mean over the 10 reference observations, after "
                      f"{args.gl_seconds:g} training CPU s per model, {_seeds(args.seeds)}",
                      columns(first, methods, len(args.seeds)), rows)  # fmt: skip


def _seeds(seeds: list[int]) -> str:
    return (
        f"seed {seeds[0]}" if len(seeds) == 1 else f"mean over seeds {', '.join(map(str, seeds))}"
    )


def _have_zuko() -> bool:
    try:
        import zuko  # noqa: F401
    except ImportError:
        print("zuko is not installed (pip install zuko): its NSF is left out", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    main()
