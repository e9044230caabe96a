"""What cnf's training engine costs over the work it drives: CPU milliseconds per iteration of
``cnf.training.fit`` against a bare loop on the same model, for flow matching and maximum
likelihood on 8gaussians, in one process on one thread.

    python bench/bench_speed.py                 # about 4 minutes on 2 cores
    python bench/bench_speed.py --repeats 5     # a steadier median on a busy machine

The engine is everything ``fit`` does around the objective's loss and the optimizer's step: the
batch of ``(seed, iteration)``, the probes' generator, clipping the gradient and checking it is
finite, the schedule, the log row's numbers, the phase and stop checks, the progress bar (off
here). The bare loop is what the peers' toy examples run: ``AdamW`` at torch's defaults on the
same model, a batch from the same dataset, the same loss (flow matching: the regression written
out, ``x_t = t z + (1 - t) x`` against ``z - x``; maximum likelihood: the objective's own
``loss``, the same solver and RNODE penalties), backward, step.

Each side runs ``--short`` and ``--long`` iterations from a fresh model, and the row reports the
difference's CPU seconds per iteration (the marginal cost: a run's one-off costs, the final
validation among them, cancel), the median over ``--repeats`` alternating rounds. Maximum
likelihood runs with a fixed step (``--no-adapt``, the step Hairer's rule starts from), so that
both sides solve with the same solver; the adapter's own checks (every 25 iterations by default)
are the training recipe's, priced by ``--budget`` plans rather than here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import harness
import torch
from harness import Column

from cnf.runtime import to_tensors
from cnf.training import TrainConfig, fit, setup

OBJECTIVES = {
    "fm": dict(objective="fm", activation="silu", lr=5e-3, batch_size=512),
    "mle": dict(objective="mle", adapt=False, batch_size=512),
}
LENGTHS = {"fm": (500, 4000), "mle": (5, 25)}  # (short, long) where --short/--long are not given
COLUMNS = [
    Column("objective", "objective"),
    Column("bare", "bare loop ms/it", "{:.2f}", "ms", "a loop of loss, backward, AdamW step"),
    Column("engine", "fit ms/it", "{:.2f}", "ms", "cnf.training.fit, the same model and loss"),
    Column("ratio", "fit / bare", "{:.2f}x", about="the engine's cost over the work it drives"),
    Column("rounds", "per round (fit / bare)", about="each round's ratio"),
]


def config(objective: str, iters: int) -> TrainConfig:
    return TrainConfig.for_data("8gaussians", **OBJECTIVES[objective], iters=iters,
                                eval_every=10**9, threads=1, device="cpu", seed=0)  # fmt: skip


def bare(objective: str, iters: int) -> float:
    """CPU seconds of ``iters`` iterations of the bare loop."""
    run = setup(config(objective, iters))
    model, data, loss_of = run.model, run.data, run.objective.loss
    field = model.ode_blocks()[0].field
    opt = torch.optim.AdamW(model.parameters(), lr=run.cfg.lr)
    gen = torch.Generator().manual_seed(0)
    start = time.process_time()
    for it in range(1, iters + 1):
        x, _ = to_tensors(data.train_batch(run.cfg.batch_size, it), torch.device("cpu"),
                          torch.float32)  # fmt: skip
        if objective == "fm":
            z = torch.randn(x.shape, generator=gen)
            t = torch.rand(len(x), 1, generator=gen)
            loss = (field(t, t * z + (1 - t) * x) - (z - x)).square().mean()
        else:
            loss, _ = loss_of(model, x, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.process_time() - start


def engine(objective: str, iters: int) -> float:
    """CPU seconds of ``fit`` for ``iters`` iterations (one final validation included)."""
    run = setup(config(objective, iters))
    start = time.process_time()
    fit(run.state, run.data, run.objective, run.cfg, progress=False, quiet=True)
    return time.process_time() - start


def marginal(measure, objective: str, short: int, long: int) -> float:
    """Milliseconds per iteration between a short and a long run."""
    return (measure(objective, long) - measure(objective, short)) / (long - short) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES),
                        choices=list(OBJECTIVES))  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds (median)")
    parser.add_argument("--short", type=int, help="iterations of the short runs")
    parser.add_argument("--long", type=int, help="iterations of the long runs")
    harness.add_arguments(parser)
    args = parser.parse_args()
    results = harness.start(__file__, parser, args)
    torch.set_num_threads(1)
    rows = []
    for objective in args.objectives:
        short, long = LENGTHS[objective]
        short, long = args.short or short, args.long or long
        if long <= short:
            parser.error(f"--long {long} must be more than --short {short}")
        pairs = []
        for _ in range(args.repeats):
            pairs.append((marginal(engine, objective, short, long),
                          marginal(bare, objective, short, long)))  # fmt: skip
            print(f"  {objective}: fit {pairs[-1][0]:.2f} ms/it, bare {pairs[-1][1]:.2f}",
                  file=sys.stderr, flush=True)  # fmt: skip
        fit_ms = statistics.median(p[0] for p in pairs)
        bare_ms = statistics.median(p[1] for p in pairs)
        rows.append(dict(objective=objective, bare=bare_ms, engine=fit_ms, ratio=fit_ms / bare_ms,
                         rounds=", ".join(f"{f / b:.2f}" for f, b in pairs)))  # fmt: skip
    results.table("engine", "CPU ms per iteration on 8gaussians (batch 512, one thread), the "
                  f"median of {args.repeats} rounds", COLUMNS, rows)  # fmt: skip
    results.write()


if __name__ == "__main__":
    main()
