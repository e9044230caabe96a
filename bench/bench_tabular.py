"""Tabular benchmark: test NLL (nats) of a CNF against scikit-learn's density estimators.

    python bench/bench_tabular.py                  # wine, iris, breast_cancer, diabetes, 3 seeds
    python bench/bench_tabular.py --datasets digits-tabular --seeds 0
    python bench/bench_tabular.py --quick          # a smoke run (tiny CNF, a few seconds each)

Every method sees the same data: the seeded train / validation / test split of
:mod:`cnf.data.tabular` (constant and duplicated columns dropped on the training split; digits
dequantized with U[0, 1) noise, once for the baselines' training rows and for validation and
test, afresh every batch for the CNF). Every method standardizes with the training statistics
and counts that map's log-det, so all NLLs are in the original units of the data:

* cnf: ``cnf.training.train`` (the code of ``cnf train``) with ``cnf train``'s tabular settings
  (``cnf.training.PRESETS["tabular"]``: ConcatSquash MLP 128-128, whitening, AdamW with weight
  decay and a moving average of the weights; flow matching, then maximum likelihood, each stopped
  early on the validation NLL; positive columns on a log scale where a short pilot of each
  scores better), the best checkpoint evaluated on the test split (exact trace);
* cnf mle: the same with maximum likelihood throughout (``--objective mle``, the earlier preset:
  2000 iterations, validation every 25, patience 8);
* cnf fm: the preset's flow matching alone (``--finetune-iters 0``): what its maximum-likelihood
  phase adds, per table;
* cnf log, cnf no log: the preset with ``--log-columns positive`` (the log of every column
  positive on the training rows, before the whitening) and ``none``, where the preset chooses
  between the two by a short pilot of each (``auto``, :mod:`cnf.training.choice`): what a
  log scale gives each table, and what the choice costs;
* zuko NSF and MAF (``pip install zuko``; ``--no-zuko`` to leave them out): zuko's neural spline
  and masked autoregressive flows (3 transforms, hidden 64-64), Adam 1e-3, batch 256, early
  stopping on the validation NLL (patience 20 evaluations of 25 steps), on the standardized data;
* GaussianMixture (full covariance): ``n_components`` chosen on the validation split;
* KernelDensity (Gaussian kernel): bandwidth chosen on the validation split;
* Gaussian: one full-covariance Gaussian (GaussianMixture with one component).

"fit CPU s" is the CPU time of the whole fit, selection on validation included (the CNF and zuko
on one thread; scikit-learn's BLAS may use more), the mean over the seeds; for the CNF that is
everything ``train`` does, the test report included. The table also gives the CNF's lead over
the best of GMM, KDE and NSF (negative: cnf ahead) with its standard error over the seeds (the
per-seed differences, each seed's split shared), and its longest fit over the seeds: the bar it
is held to is ahead of all three on every dataset, each fit under 30 CPU s. On tables of 15 to
60 test rows a split, three seeds leave that lead a few tenths of a nat uncertain; ``--seeds 0 1
2 3 4 5 6 7 8 9`` narrows it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from dataclasses import dataclass

import harness
import numpy as np
import torch
from harness import Column
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import KernelDensity

from cnf.data import get_dataset
from cnf.training import TrainConfig, train

MLE_PRESET = dict(objective="mle", iters=2000, eval_every=25, patience=8, finetune_iters=0,
                  finetune_lr=None)  # fmt: skip

DATASETS = ("wine", "iris", "breast_cancer", "diabetes")  # digits-tabular too, by --datasets
DEQUANTIZE = {"digits-tabular"}
RIVALS = ("GMM", "KDE", "NSF")  # the estimators cnf should beat, each fit in under FIT_BOUND_S
FIT_BOUND_S = 30.0

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

    with harness.timed() as t:
        gauss = GaussianMixture(1, covariance_type="full", random_state=seed).fit(tr)
    out["Gaussian"] = Result(-(gauss.score_samples(te).mean() + logdet), t.cpu)

    with harness.timed() as t:
        ks = (1, 2, 3) if quick else (1, 2, 3, 4, 5, 6, 8, 10)
        make = lambda k: GaussianMixture(k, covariance_type="full", n_init=2, random_state=seed)  # noqa: E731
        gmm, k = _select(make, ks, tr, va)
    out["GMM"] = Result(-(gmm.score_samples(te).mean() + logdet), t.cpu, f"k={k}")

    with harness.timed() as t:
        bandwidths = np.logspace(-1.5, 0.5, 5 if quick else 30)
        kde, h = _select(lambda b: KernelDensity(bandwidth=b), bandwidths, tr, va)
    out["KDE"] = Result(-(kde.score_samples(te).mean() + logdet), t.cpu, f"h={h:.3g}")
    return out


def fit_cnf(name: str, seed: int, quick: bool, **overrides) -> Result:
    # cnf train's settings for tables (cnf.training.PRESETS["tabular"]), all test rows evaluated
    flat = {**overrides, **(QUICK if quick else {})}
    if quick and flat.get("objective", "fm") == "fm" and "finetune_iters" not in overrides:
        flat.update(finetune_iters=10)
    cfg = TrainConfig.for_data(name, seed=seed, dequantize=name in DEQUANTIZE, **flat)
    with tempfile.TemporaryDirectory() as tmp:
        result = train(cfg, f"{tmp}/run", progress=False)
        saved = json.loads((result.out / "config.json").read_text())["model"]["table"]
    log = " log" if saved.get("log_columns") == "positive" else ""
    return Result(result.report["nll"], 0.0, f"{result.iteration} it{log}")


def fit_zuko(kind: str, data, seed: int, quick: bool) -> Result:
    """zuko's NSF or MAF on the standardized training rows, early stopping on validation."""
    import zuko

    train_x, val_x, test_x = data.train_data(), data.validation(), data.test()
    mu, sd, logdet = _standardizer(train_x)
    tr, va, te = (
        torch.as_tensor((x - mu) / sd, dtype=torch.float32) for x in (train_x, val_x, test_x)
    )
    torch.manual_seed(seed)
    make = {"NSF": zuko.flows.NSF, "MAF": zuko.flows.MAF}[kind]
    flow = make(features=tr.shape[1], transforms=3, hidden_features=(64, 64))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    best, best_state, stale = math.inf, None, 0
    for it in range(1, (60 if quick else 20_000) + 1):
        rows = rng.choice(len(tr), min(256, len(tr)), replace=False)
        loss = -flow().log_prob(tr[rows]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 25 == 0:
            with torch.no_grad():
                val = -float(flow().log_prob(va).mean())
            if val < best:
                best, best_state, stale = (
                    val,
                    {k: v.clone() for k, v in flow.state_dict().items()},
                    0,
                )
            else:
                stale += 1
                if stale >= 20:
                    break
    flow.load_state_dict(best_state)
    with torch.no_grad():
        nll = -float(flow().log_prob(te).mean()) - logdet
    return Result(nll, 0.0, f"{it} it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="tiny CNF: a smoke run")
    parser.add_argument("--no-zuko", action="store_true", help="leave out zuko's NSF and MAF")
    parser.add_argument("--methods", nargs="+", help="only these columns (e.g. cnf GMM)")
    harness.add_arguments(parser)
    args = parser.parse_args()
    results = harness.start(__file__, parser, args, smoke=args.quick)
    torch.set_num_threads(1)
    logging.getLogger("cnf").setLevel(logging.ERROR)  # the dropped-column notes, once per fit

    zuko = not args.no_zuko and _have_zuko()
    results.settings["zuko"] = zuko
    methods = ("cnf", "cnf mle", "cnf fm", "cnf log", "cnf no log", "GMM", "KDE", "Gaussian",
               *(("NSF", "MAF") if zuko else ()))  # fmt: skip
    methods = tuple(m for m in methods if args.methods is None or m in args.methods)
    rows = [dataset_row(name, methods, args) for name in args.datasets]
    columns = [
        Column("dataset", "dataset"),
        Column("dim", "dim"),
        Column("test_rows", "test rows"),
        Column("seeds", "seeds"),
        *(Column(m, m, "{:.2f}", "nats", f"{m}: test NLL, mean over the seeds", "min")
          for m in methods),
        *_lead_columns(methods),
        Column("fit_s", "fit CPU s: " + " / ".join(methods), "{:.1f}", "s", "mean per fit"),
        Column("chosen", "chosen", about="iterations, or the hyperparameter chosen, per seed"),
    ]  # fmt: skip
    seeds = f"seed {args.seeds[0]}" if len(args.seeds) == 1 else "mean over the seeds"
    results.table("nll", f"Test NLL in nats (lower is better), {seeds} (each seed its own split)",
                  columns, rows)  # fmt: skip
    results.write()


def _lead_columns(methods: tuple[str, ...]) -> list[Column]:
    """cnf's lead over its rivals and its longest fit, where the table has cnf and a rival."""
    rivals = [m for m in RIVALS if m in methods]
    if "cnf" not in methods or not rivals:
        return []
    bar = f"cnf's longest fit over the seeds (the bar: under {FIT_BOUND_S:g} s)"
    return [Column("gap", "cnf - best of " + ", ".join(rivals), "{:+.2f}", "nats",
                   "cnf's mean test NLL minus the lowest of the rivals' (negative: cnf ahead)"),
            Column("gap_se", "± se", "{:.2f}", "nats", "the gap's standard error over the "
                   "seeds (the per-seed differences' spread over the square root of their count)"),
            Column("cnf_fit_max", "cnf fit CPU s, longest", "{:.1f}", "s", bar)]  # fmt: skip


def _gap(per_seed: dict[str, list[Result]], rivals: list[str]) -> dict:
    """cnf's mean NLL minus the best rival's, that gap's standard error over the seeds (each
    seed's split is shared by both), and cnf's longest fit."""
    best = min(rivals, key=lambda m: np.mean([r.nll for r in per_seed[m]]))
    diff = [c.nll - r.nll for c, r in zip(per_seed["cnf"], per_seed[best], strict=True)]
    se = float(np.std(diff, ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.nan
    return dict(gap=float(np.mean(diff)), gap_se=se,
                cnf_fit_max=max(r.seconds for r in per_seed["cnf"]))  # fmt: skip


def dataset_row(name: str, methods: tuple[str, ...], args: argparse.Namespace) -> dict:
    """Every method on every seed of one dataset: the mean NLL of each, fit times, choices."""
    per_seed: dict[str, list[Result]] = {m: [] for m in methods}
    for seed in args.seeds:
        data = get_dataset(name, seed=seed, dequantize=name in DEQUANTIZE)
        res = {m: fit_one(m, name, data, seed, args.quick) for m in methods if m in FITS}
        if {"GMM", "KDE", "Gaussian"} & set(methods):
            res.update(baselines(data, seed, args.quick))
        for m in methods:
            per_seed[m].append(res[m])
        nlls = ", ".join(f"{m} {res[m].nll:.2f}" for m in methods)
        print(f"{name} seed {seed}: {nlls}", file=sys.stderr, flush=True)
    n_test = len(get_dataset(name, seed=args.seeds[0], dequantize=name in DEQUANTIZE).test())
    dim = get_dataset(name, seed=args.seeds[0]).event_shape[0]
    choices = "; ".join(f"{m}: {', '.join(r.choice for r in per_seed[m])}"
                        for m in ("cnf", "cnf mle", "cnf fm", "GMM", "KDE")
                        if m in methods)  # fmt: skip
    nll = {m: float(np.mean([r.nll for r in per_seed[m]])) for m in methods}
    row = dict(dataset=name, dim=dim, test_rows=n_test, seeds=",".join(map(str, args.seeds)),
               **nll, fit_s=[float(np.mean([r.seconds for r in per_seed[m]])) for m in methods],
               chosen=choices)  # fmt: skip
    row["per_seed"] = {m: [r.nll for r in per_seed[m]] for m in methods}
    rivals = [m for m in RIVALS if m in methods]
    if "cnf" in methods and rivals:
        row.update(_gap(per_seed, rivals))
    return row


# one fit each; the scikit-learn baselines go together
FITS = ("cnf", "cnf mle", "cnf fm", "cnf log", "cnf no log", "NSF", "MAF")


def fit_one(method: str, name: str, data, seed: int, quick: bool) -> Result:
    """One fit, its CPU seconds measured here."""
    with harness.timed() as t:
        if method == "cnf":
            result = fit_cnf(name, seed, quick)
        elif method == "cnf mle":
            result = fit_cnf(name, seed, quick, **MLE_PRESET)
        elif method == "cnf fm":
            result = fit_cnf(name, seed, quick, finetune_iters=0)
        elif method in ("cnf log", "cnf no log"):
            option = "positive" if method == "cnf log" else "none"
            result = fit_cnf(name, seed, quick, log_columns=option)
        else:
            result = fit_zuko(method, data, seed, quick)
    result.seconds = t.cpu
    return result


def _have_zuko() -> bool:
    try:
        import zuko  # noqa: F401
    except ImportError:
        print("zuko is not installed (pip install zuko): its NSF and MAF are left out",
              file=sys.stderr)  # fmt: skip
        return False
    return True


if __name__ == "__main__":
    main()
