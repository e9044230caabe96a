"""Tabular benchmark: test NLL (nats) of a CNF against scikit-learn's density estimators.

    python bench/bench_tabular.py                  # breast_cancer, wine, digits-tabular, seed 0
    python bench/bench_tabular.py --seeds 0 1 2    # mean over seeds
    python bench/bench_tabular.py --quick          # a smoke run (tiny CNF, a few seconds each)

Every method sees the same data: the seeded train / validation / test split of
:mod:`cnf.data.tabular` (constant and duplicated columns dropped on the training split; digits
dequantized with U[0, 1) noise, once for the baselines' training rows and for validation and
test, afresh every batch for the CNF). Every method standardizes with the training statistics
and counts that map's log-det, so all NLLs are in the original units of the data:

* cnf: ``cnf.training.train`` (the code of ``cnf train``) with ``cnf train``'s tabular settings
  (``cnf.training.PRESETS["tabular"]``: ConcatSquash MLP 64-64, whitening, AdamW), early stopping
  on the validation NLL, the best checkpoint evaluated on the test split (exact trace);
* GaussianMixture (full covariance): ``n_components`` chosen on the validation split;
* KernelDensity (Gaussian kernel): bandwidth chosen on the validation split;
* Gaussian: one full-covariance Gaussian (GaussianMixture with one component).

"fit s" is the wall time of the whole fit, selection on validation included.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import KernelDensity

from cnf.data import get_dataset
from cnf.training import TrainConfig, train

DATASETS = ("breast_cancer", "wine", "digits-tabular")
DEQUANTIZE = {"digits-tabular"}

QUICK = dict(iters=30, eval_every=10, hidden=(16,), method="rk4", step_size=0.25,
             eval_method="rk4", eval_step_size=0.25)  # fmt: skip


@dataclass
class Result:
    nll: float
    seconds: float
    choice: str = ""


def _standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    mu, sd = x.mean(0), x.std(0)
    return mu, sd, float(-np.log(sd).sum())


def _select(make, values, train, val) -> tuple[object, object]:
    """Fit one model per value; keep the best on validation."""
    best, best_value, best_score = None, None, -math.inf
    for v in values:
        model = make(v).fit(train)
        score = model.score_samples(val).mean()
        if score > best_score:
            best, best_value, best_score = model, v, score
    return best, best_value


def baselines(data, seed: int, quick: bool) -> dict[str, Result]:
    train, val, test = data.train_data(), data.validation(), data.test()
    mu, sd, logdet = _standardizer(train)
    tr, va, te = ((x - mu) / sd for x in (train, val, test))
    out = {}

    t0 = time.perf_counter()
    gauss = GaussianMixture(1, covariance_type="full", random_state=seed).fit(tr)
    out["Gaussian"] = Result(-(gauss.score_samples(te).mean() + logdet), time.perf_counter() - t0)

    t0 = time.perf_counter()
    ks = (1, 2, 3) if quick else (1, 2, 3, 4, 5, 6, 8, 10)
    make = lambda k: GaussianMixture(k, covariance_type="full", n_init=2, random_state=seed)  # noqa: E731
    gmm, k = _select(make, ks, tr, va)
    out["GMM"] = Result(
        -(gmm.score_samples(te).mean() + logdet), time.perf_counter() - t0, f"k={k}"
    )

    t0 = time.perf_counter()
    bandwidths = np.logspace(-1.5, 0.5, 5 if quick else 30)
    kde, h = _select(lambda b: KernelDensity(bandwidth=b), bandwidths, tr, va)
    out["KDE"] = Result(
        -(kde.score_samples(te).mean() + logdet), time.perf_counter() - t0, f"h={h:.3g}"
    )
    return out


def fit_cnf(name: str, seed: int, quick: bool) -> Result:
    # cnf train's settings for tables (cnf.training.PRESETS["tabular"]), all test rows evaluated
    cfg = TrainConfig.for_data(
        name, seed=seed, dequantize=name in DEQUANTIZE, **(QUICK if quick else {})
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train(cfg, f"{tmp}/run", progress=False)
        seconds = time.perf_counter() - t0
    return Result(result.report["nll"], seconds, f"{result.iteration} it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--quick", action="store_true", help="tiny CNF: a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("cnf").setLevel(logging.ERROR)  # the dropped-column notes, once per fit

    methods = ("cnf", "GMM", "KDE", "Gaussian")
    rows = []
    for name in args.datasets:
        per_seed: dict[str, list[Result]] = {m: [] for m in methods}
        for seed in args.seeds:
            data = get_dataset(name, seed=seed, dequantize=name in DEQUANTIZE)
            res = {"cnf": fit_cnf(name, seed, args.quick), **baselines(data, seed, args.quick)}
            for m in methods:
                per_seed[m].append(res[m])
            nlls = ", ".join(f"{m} {res[m].nll:.2f}" for m in methods)
            print(f"{name} seed {seed}: {nlls}", file=sys.stderr, flush=True)
        n_test = len(get_dataset(name, seed=args.seeds[0], dequantize=name in DEQUANTIZE).test())
        dim = get_dataset(name, seed=args.seeds[0]).event_shape[0]
        best = min(np.mean([r.nll for r in per_seed[m]]) for m in methods)
        cells = []
        for m in methods:
            nll = np.mean([r.nll for r in per_seed[m]])
            text = f"{nll:.2f}"
            cells.append(f"**{text}**" if nll == best else text)
        times = [f"{np.mean([r.seconds for r in per_seed[m]]):.1f}" for m in methods]
        choices = "; ".join(
            f"{m}: {', '.join(r.choice for r in per_seed[m])}" for m in ("cnf", "GMM", "KDE")
        )
        seeds = ",".join(map(str, args.seeds))
        rows.append(f"| {name} | {dim} | {n_test} | {seeds} | " + " | ".join(cells) + " | "
                    + " / ".join(times) + f" | {choices} |")  # fmt: skip
    print("\nTest NLL in nats (lower is better), mean over the seeds (each seed its own split); "
          "fit s: cnf / GMM / KDE / Gaussian\n")  # fmt: skip
    print("| dataset | dim | test rows | seeds | cnf | GMM | KDE | Gaussian | fit s | chosen |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
