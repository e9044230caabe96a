"""The tables part of bench/bench_conditional.py: conditional densities of two of scikit-learn's
bundled tables, scored by the test conditional log-likelihood.

* ``diabetes``: :math:`p(\\text{target} \\mid \\text{10 features})`, 442 rows, original units
  (``load_diabetes(scaled=False)``);
* ``wine``: :math:`p(\\text{13 features} \\mid \\text{class})`, 178 rows, 3 classes.

Each seed splits the rows at random (:func:`cnf.data.tabular.split_indices`) into training
(60%), validation (20%) and test (20%) rows; every system learns from the training and
validation rows, each in its own way (bench/bench_conditional.py's docstring says how), and
is scored by the mean :math:`\\log p(x \\mid c)` of the test rows, in nats per row in the units
of the data (every standardization's log-det counted). The table reports its mean over the
seeds with the standard error across them, and "cnf - system", the mean of the per-seed
differences with their standard error (a split's difficulty is common to both, so the paired
difference is the sharper test).
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from dataclasses import dataclass

import harness
import numpy as np
import torch
from harness import Column

from cnf.data.conditional import Pairs
from cnf.data.tabular import split_indices

TABLES = {"diabetes": "p(target | 10 features)", "wine": "p(13 features | class)"}
SYSTEMS = {"diabetes": ("cnf", "NSF", "GP", "NGBoost"), "wine": ("cnf", "NSF", "GMM")}
VAL_FRACTION, TEST_FRACTION = 0.2, 0.2
# zuko's NSF as on the tables of bench/bench_tabular.py: Adam, batches of 256, a validation
# NLL every 25 steps, stopped after 20 evaluations without a better one
NSF_SHAPE = dict(transforms=3, hidden_features=(64, 64))
NSF_LR, NSF_BATCH, NSF_EVAL_EVERY, NSF_PATIENCE, NSF_MAX_STEPS = 1e-3, 256, 25, 20, 20_000
CNF_QUICK = dict(hidden=(16,), max_iter=30, finetune_iter=10, eval_every=10)
# AdamW's decoupled weight decay, chosen per split by the held-out rows (the default is the
# tabular recipe's 0.3)
CNF_WEIGHT_DECAYS = (1e-2, 0.3, 3.0)
GMM_GRID = [(k, kind) for kind in ("full", "tied", "diag", "spherical") for k in (1, 2, 3)]


@dataclass(frozen=True)
class Split:
    """One seed's rows: ``x`` the modelled columns, ``c`` the condition (wine: the class)."""

    train: Pairs
    val: Pairs
    test: Pairs


@dataclass(frozen=True)
class Fit:
    """A fitted system's test log-likelihood per row, its fit's CPU seconds, what it chose."""

    logp: np.ndarray
    cpu: float
    choice: str = ""


def load(name: str) -> Pairs:
    """The whole table as pairs: ``x`` of shape ``(n, d)``, ``c`` features or class labels."""
    from sklearn import datasets

    if name == "diabetes":
        bunch = datasets.load_diabetes(scaled=False)  # original units, not scikit-learn's
        return Pairs(bunch.target[:, None].astype(np.float64), bunch.data.astype(np.float64))
    bunch = datasets.load_wine()
    return Pairs(bunch.data.astype(np.float64), bunch.target)


def split(name: str, seed: int) -> Split:
    pairs = load(name)
    parts = split_indices(len(pairs.x), VAL_FRACTION, TEST_FRACTION, seed)
    return Split(*(Pairs(pairs.x[rows], pairs.c[rows]) for rows in parts))


def features(c: np.ndarray) -> np.ndarray:
    """The condition as the flows see it: class labels one-hot, features as they are."""
    return np.eye(3)[c] if c.ndim == 1 else c


def _standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The training mean and standard deviation, and the map's log-det per row."""
    mu, sd = x.mean(0), x.std(0)
    return mu, sd, float(-np.log(sd).sum())


def _both(data: Split) -> Pairs:
    """The training and validation rows together."""
    return Pairs(*(np.concatenate(parts) for parts in zip(data.train, data.val, strict=True)))


# --- the systems --------------------------------------------------------------------------------


def fit_cnf(data: Split, seed: int, options: dict) -> Fit:
    """``cnf.CNFRegressor`` with its defaults under ``options``, fitted to the training and
    validation rows together, holding out as many rows as the validation split for its early
    stopping (its own seeded choice of them). Unless ``options`` sets it, the weight decay is
    chosen from :data:`CNF_WEIGHT_DECAYS` by that held-out log-likelihood (every candidate on
    the same rows, so the scores compare), as the GMM chooses its components."""
    from cnf import CNFRegressor

    rows = _both(data)
    held_out = len(data.val.x) / len(rows.x)
    y = rows.x[:, 0] if rows.x.shape[1] == 1 else rows.x
    decays = [options["weight_decay"]] if "weight_decay" in options else CNF_WEIGHT_DECAYS
    fitted = []
    with harness.timed() as t, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # integer-valued columns, modelled as continuous by all
        for decay in decays:
            est = CNFRegressor(random_state=seed, validation_fraction=held_out,
                               **{**options, "weight_decay": decay})  # fmt: skip
            fitted.append(est.fit(features(rows.c), y))
    est = max(fitted, key=lambda e: e.best_validation_score_)
    logp = est.score_samples(features(data.test.c), data.test.x)
    chosen = f"wd {est.weight_decay:g}, " if len(decays) > 1 else ""
    return Fit(logp, t.cpu, f"{chosen}{est.n_iter_} it")


def fit_nsf(data: Split, seed: int, steps: int = NSF_MAX_STEPS) -> Fit:
    """zuko's conditional NSF on z-scored rows and features (classes one-hot) by maximum
    likelihood, stopped early on the validation rows."""
    import zuko

    mu, sd, logdet = _standardizer(data.train.x)
    one_hot = data.train.c.ndim == 1
    c_mu, c_sd, _ = (0.0, 1.0, 0.0) if one_hot else _standardizer(data.train.c)

    def tensors(p: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
        c = (features(p.c) - c_mu) / c_sd
        return (torch.as_tensor((p.x - mu) / sd, dtype=torch.float32),
                torch.as_tensor(c, dtype=torch.float32))  # fmt: skip

    (x, c), (x_val, c_val), (x_test, c_test) = map(tensors, (data.train, data.val, data.test))
    with harness.timed() as t:
        torch.manual_seed(seed)
        flow = zuko.flows.NSF(features=x.shape[1], context=c.shape[1], **NSF_SHAPE)
        steps = _early_stopped(flow, (x, c), (x_val, c_val), seed, steps)
    with torch.no_grad():
        logp = flow(c_test).log_prob(x_test).double().numpy() + logdet
    return Fit(logp, t.cpu, f"{steps} it")


def _early_stopped(flow, train, val, seed: int, steps: int) -> int:
    """Adam on batches of ``train`` until the validation NLL stops improving (or for ``steps``);
    the flow is left with its best weights. Returns the steps taken."""
    opt = torch.optim.Adam(flow.parameters(), lr=NSF_LR)
    rng = np.random.default_rng(seed)
    best, best_state, stale, n = math.inf, None, 0, len(train[0])
    for step in range(1, steps + 1):
        rows = torch.as_tensor(rng.choice(n, min(NSF_BATCH, n), replace=False))
        loss = -flow(train[1][rows]).log_prob(train[0][rows]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % NSF_EVAL_EVERY:
            continue
        with torch.no_grad():
            nll = -float(flow(val[1]).log_prob(val[0]).mean())
        if nll < best:
            best, stale = nll, 0
            best_state = {k: v.clone() for k, v in flow.state_dict().items()}
        elif (stale := stale + 1) >= NSF_PATIENCE:
            break
    flow.load_state_dict(best_state)
    return step


def fit_gp(data: Split, seed: int) -> Fit:
    """scikit-learn's Gaussian process, ``ConstantKernel * RBF + WhiteKernel`` with a length
    scale per (standardized) feature, ``normalize_y``, fitted to the training and validation
    rows (its hyperparameters maximize their marginal likelihood); the predictive density is
    the normal of the predictive mean and standard deviation, the white noise included."""
    from scipy.stats import norm
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

    rows = _both(data)
    mu, sd, _ = _standardizer(rows.c)
    kernel = ConstantKernel() * RBF(np.ones(rows.c.shape[1])) + WhiteKernel()
    gp = GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=2,
                                  random_state=seed)  # fmt: skip
    with harness.timed() as t:
        gp.fit((rows.c - mu) / sd, rows.x[:, 0])
    mean, std = gp.predict((data.test.c - mu) / sd, return_std=True)
    noise = math.sqrt(gp.kernel_.k2.noise_level) * rows.x[:, 0].std()  # normalize_y's units
    return Fit(norm.logpdf(data.test.x[:, 0], mean, std), t.cpu, f"noise sd {noise:.1f}")


def fit_ngboost(data: Split, seed: int, trees: int = 500) -> Fit:
    """NGBoost with a normal predictive distribution (its defaults: 500 trees of depth 3, lr
    0.01), stopped early on the validation rows (50 rounds), scored at its best iteration."""
    from ngboost import NGBRegressor
    from ngboost.distns import Normal

    model = NGBRegressor(Dist=Normal, n_estimators=trees, random_state=seed, verbose=False)
    with harness.timed() as t:
        model.fit(data.train.c, data.train.x[:, 0], data.val.c, data.val.x[:, 0],
                  early_stopping_rounds=50)  # fmt: skip
    best = model.best_val_loss_itr + 1
    logp = model.pred_dist(data.test.c, max_iter=best).logpdf(data.test.x[:, 0])
    return Fit(logp, t.cpu, f"{best} it")


def fit_gmm(data: Split, seed: int) -> Fit:
    """A Gaussian mixture per class on the standardized rows, its components and covariance
    type (one choice for all classes) those of the best validation log-likelihood."""
    from sklearn.mixture import GaussianMixture

    mu, sd, logdet = _standardizer(data.train.x)
    classes = np.unique(data.train.c)
    z = {part: (p.x - mu) / sd for part, p in vars(data).items()}

    def fitted(k: int, kind: str) -> dict:
        return {y: GaussianMixture(k, covariance_type=kind, n_init=2, random_state=seed)
                .fit(z["train"][data.train.c == y]) for y in classes}  # fmt: skip

    def logp(models: dict, part: str) -> np.ndarray:
        c, out = getattr(data, part).c, np.empty(len(z[part]))
        for y, model in models.items():
            out[c == y] = model.score_samples(z[part][c == y])
        return out

    with harness.timed() as t:
        usable = [(k, kind) for k, kind in GMM_GRID
                  if k <= min((data.train.c == y).sum() for y in classes) // 2]  # fmt: skip
        models = {choice: fitted(*choice) for choice in usable}
        best = max(models, key=lambda choice: logp(models[choice], "val").mean())
    return Fit(logp(models[best], "test") + logdet, t.cpu, f"{best[0]} {best[1]}")


def fit(system: str, data: Split, seed: int, options: dict, quick: bool = False) -> Fit:
    """One system fitted to one seed's split and scored on its test rows (``quick``: tiny)."""
    if system == "cnf":
        return fit_cnf(data, seed, {**(CNF_QUICK if quick else {}), **options})
    if system == "NSF":
        return fit_nsf(data, seed, steps=60 if quick else NSF_MAX_STEPS)
    if system == "NGBoost":
        return fit_ngboost(data, seed, trees=50 if quick else 500)
    return {"GP": fit_gp, "GMM": fit_gmm}[system](data, seed)


# --- the part --------------------------------------------------------------------------------


def systems(name: str, skip: set[str]) -> tuple[str, ...]:
    return tuple(s for s in SYSTEMS[name] if s not in skip)


def rows(name: str, seeds: list[int], skip: set[str], options: dict, quick: bool) -> list[dict]:
    """Every system on every seed of one table: a row per system."""
    runs: dict[str, list[Fit]] = {s: [] for s in systems(name, skip)}
    for seed in seeds:
        data = split(name, seed)
        for system, fitted in runs.items():
            fitted.append(fit(system, data, seed, options, quick))
            print(f"  {name} seed {seed} {system}: {fitted[-1].logp.mean():.3f} nats a row, "
                  f"{fitted[-1].cpu:.1f} CPU s ({fitted[-1].choice})", file=sys.stderr,
                  flush=True)  # fmt: skip
    cnf = np.array([f.logp.mean() for f in runs["cnf"]]) if "cnf" in runs else None
    return [_row(name, system, fitted, cnf) for system, fitted in runs.items()]


def _row(name: str, system: str, fitted: list[Fit], cnf: np.ndarray | None) -> dict:
    scores = np.array([f.logp.mean() for f in fitted])
    lead = None if cnf is None or system == "cnf" else cnf - scores
    return dict(dataset=name, system=system, loglik=float(scores.mean()), se=_se(scores),
                lead=None if lead is None else float(lead.mean()),
                lead_se=None if lead is None else _se(lead),
                per_seed=", ".join(f"{s:.3f}" for s in scores),
                cpu=float(np.mean([f.cpu for f in fitted])),
                chosen=", ".join(f.choice for f in fitted))  # fmt: skip


def _se(values: np.ndarray) -> float | None:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def columns() -> list[Column]:
    return [
        Column("dataset", "dataset"),
        Column("system", "system"),
        Column("loglik", "test log-lik", "{:.3f}", "nats",
               "mean log p(x | c) of the test rows, in the data's units, mean over the seeds"),
        Column("se", "± SE", "{:.3f}", "nats", "standard error across the seeds"),
        Column("lead", "cnf - system", "{:+.3f}", "nats",
               "cnf's test log-likelihood less the system's, mean over the seeds"),
        Column("lead_se", "± SE", "{:.3f}", "nats", "standard error of the paired differences"),
        Column("per_seed", "per seed", about="each seed's test log-likelihood"),
        Column("cpu", "fit CPU s", "{:.1f}", "s", "CPU seconds of a fit, mean over the seeds"),
        Column("chosen", "chosen", about="per seed: iterations, or what validation chose"),
    ]  # fmt: skip


def run(results: harness.Results, args: argparse.Namespace) -> None:
    """The tables part of bench_conditional: one table, a row per dataset and system."""
    skip = {"NGBoost"} if not _have("ngboost") else set()
    skip |= {"NSF"} if args.no_zuko or not _have("zuko") else set()
    options = dict(args.cnf)
    results.settings.update(ngboost="NGBoost" not in skip)
    found = [row for name in args.tables
             for row in rows(name, args.seeds, skip, options, args.quick)]  # fmt: skip
    given = f", cnf with {_options(options)}" if options else ""
    results.table("tables", "Test conditional log-likelihood (nats per row, higher is better; "
                  f"{int(100 * TEST_FRACTION)}% of the rows), mean over seeds "
                  f"{', '.join(map(str, args.seeds))}{given}", columns(), found)  # fmt: skip
    _floor(found)


def _floor(found: list[dict]) -> None:
    """Say whether cnf is ahead of the NSF and the GP on diabetes (the issue's floor)."""
    for row in found:
        if row["dataset"] == "diabetes" and row["system"] in ("NSF", "GP"):
            verdict = "ahead of" if row["lead"] > 0 else "behind"
            print(f"floor: cnf is {verdict} {row['system']} on diabetes by {row['lead']:+.3f} "
                  "nats a row", file=sys.stderr)  # fmt: skip


def _options(options: dict) -> str:
    return " ".join(f"{k}={v!r}" for k, v in options.items())


def cnf_option(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` of ``--cnf``: a CNFRegressor parameter and a Python literal (or a word)."""
    import ast

    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (max_iter=3000), got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=list(TABLES),
                        help="the tables part's datasets")  # fmt: skip
    parser.add_argument("--cnf", nargs="+", type=cnf_option, default=[], metavar="NAME=VALUE",
                        help="CNFRegressor parameters over its defaults on the tables (e.g. "
                        "max_iter=3000 'hidden=(32, 32)')")  # fmt: skip


def _have(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        print(f"{module} is not installed (pip install {module}): left out of the tables",
              file=sys.stderr)  # fmt: skip
        return False
    return True
