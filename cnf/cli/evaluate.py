"""``cnf eval``: the test NLL of a run (or of rows of a file), the validity check, the
importance-weighted bound of image models."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnf.cli.common import (
    TRUST_PICKLE,
    in_range,
    note,
    run_data,
    solver_flags,
    solver_from_flags,
    threads_flag,
    use_threads,
)
from cnf.dequantize import dequantized_bound
from cnf.evaluate import log_probs, mean_and_se
from cnf.io import atomic_path, check_output, json_text
from cnf.report import SE, report, reported_solver, used_solver
from cnf.runs import Run, load_run
from cnf.runtime import check_memory
from cnf.validity import REFERENCE, solver_validity


def add_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a run on fresh test data")
    p.add_argument("run", type=Path, help="run directory or checkpoint file")
    p.add_argument("--n", type=int,
                   help="test samples (default: as many as the run's report_se needs, up to its "
                   "test_size)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--validity", action="store_true",
                   help="also compare the solver (the training one, or the one given with "
                   "--method) with a finer one and a float64 dopri5 reference (Ott et al. "
                   "2021)")  # fmt: skip
    p.add_argument("--device", default="auto")
    threads_flag(p)
    p.add_argument("--data", type=Path, metavar="FILE",
                   help="score the rows of this .csv/.npy/.npz file instead of the run's test "
                   "data (the columns the model was trained on: by name, or in the same "
                   "order); the summary is their NLL")  # fmt: skip
    p.add_argument("--per-row", type=Path, metavar="CSV",
                   help="with --data: write the log-density of each of its rows, in order, to "
                   "this .csv file")  # fmt: skip
    p.add_argument("--force", action="store_true", help="overwrite an existing --per-row file")
    p.add_argument("--data-dir", help="where the dataset's files are now (default: the run's)")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)
    p.add_argument("--dequant-samples", type=int, metavar="K",
                   help="images: also the importance-weighted bits/dim over K dequantization "
                   "draws per image (tighter as K grows; K=1 is the usual bound), with the exact "
                   "trace for K > 1: D times the cost of a Hutchinson solve")  # fmt: skip
    p.add_argument("--iw-probes", type=int, metavar="P",
                   help="with --dequant-samples: P averaged Hutchinson probes per draw instead "
                   "of the exact trace (P times a Hutchinson solve; for large images), and the "
                   "estimate of the bias they leave (probe_bias_bits_per_dim_iw)")  # fmt: skip
    p.add_argument("--classify", action="store_true",
                   help="a model of p(x | label): also the generative classifier argmax_y log "
                   "p(x | y) + log p(y) on the test pairs (exact likelihoods, one solve per "
                   "class), its accuracy and confusion matrix")  # fmt: skip
    solver_flags(p, "evaluate with")


def run(args: argparse.Namespace) -> int:
    _check_eval_options(args)
    run = load_run(args.run, args.device)
    use_threads(run.model, args)
    if run.path.name == "last.pt" and args.run.is_dir():
        note("eval")(f"{args.run} has no best.pt (the run stopped before its first "
                      f"evaluation): evaluating last.pt, iteration {run.iteration}")  # fmt: skip
    if args.n and run.meta.get("kind") == "toy":  # a toy draws as many as asked
        row = math.prod(run.model.event_shape) * 16
        check_memory(args.n * row, f"--n {args.n}: the test samples", "give a smaller --n")
    if args.classify and (run.meta.get("context") or {}).get("kind") != "categorical":
        raise ValueError(f"--classify needs a model of p(x | label), and {run.path} has no label "
                         "condition: drop it")  # fmt: skip
    solver = solver_from_flags(run.model, args)
    checked = solver or used_solver(run.model, run.config)
    validity_n = run.config.get("validity_size", 2000) if args.validity else None
    tol = run.config.get("validity_tol", REFERENCE.atol)
    if solver is None and validity_n is None and args.data is None:  # the test NLL's mean:
        solver = reported_solver(run.path.parent, run.iteration)  # as the report validated
    kw = dict(solver=solver, checked=checked, seed=run.config.get("seed", 0),
              reference=REFERENCE.replace(atol=tol, rtol=tol))  # fmt: skip
    if args.data is not None:
        result, validity = _score_file(run, args, validity_n, **kw)
    else:
        data = _moved(run, args)
        if args.dequant_samples is not None:  # checked before the evaluation, not after it
            _check_dequant_samples(run, data, args)
        se = None if args.n else run.config.get("report_se", SE) or None  # --n: all of them
        outcome = report(run.model, data, n=args.n or run.config.get("test_size"),
                         validity_n=validity_n, progress=None, se=se, **kw)  # fmt: skip
        result, validity = outcome.to_dict(), outcome.validity
        if args.classify:
            result["classification"] = _classification(run, data, args, solver)
        if args.dequant_samples is not None:
            result.update(_importance_weighted(run, data, args, solver))
    if args.json:
        print(json_text(result))
        return 0
    for key, value in result.items():
        if key == "classification":
            print(_confusion_text(value))
        elif key == "cost":
            print(f"{'cost':>14}: " + ", ".join(f"{k} {v:.1f} CPU s" for k, v in value.items()))
        elif key not in ("validity", "evaluation_solver", "solver_choice"):
            print(f"{key:>14}: {value:.5g}" if isinstance(value, float) else f"{key:>14}: {value}")
    if validity is not None:
        for line in validity.summary().splitlines():
            print(f"{'validity':>14}: {line}")
    return 0


CLASSIFY_N = 2000  # test pairs classified by default: each costs one solve per class


def _classification(run: Run, data: Any, args: argparse.Namespace, solver) -> dict[str, Any]:
    """The Bayes classifier of a label-conditional model on test pairs, under the data's class
    prior: accuracy, confusion (rows: true class) and, where the task knows it, the accuracy
    of the true densities' own Bayes classifier."""
    from cnf.classifier import classify
    from cnf.runtime import to_tensors

    p = next(run.model.parameters())
    x, y = to_tensors(data.test(args.n or CLASSIFY_N), p.device, p.dtype)
    spec = getattr(getattr(data, "task", None), "context", None)
    prior = torch.tensor(spec.class_prior, dtype=torch.float64) if spec is not None else None
    result = classify(run.model, x, prior=prior, solver=solver, seed=run.config.get("seed", 0))
    out = {"n": len(x), "accuracy": result.accuracy(y), "confusion": result.confusion(y).tolist()}
    bayes = getattr(getattr(data, "task", None), "bayes_accuracy", lambda seed: None)(seed=1)
    if bayes is not None:  # the true densities' own, where the task knows them
        out["bayes_accuracy"] = bayes.value
    return out


def _confusion_text(result: dict[str, Any]) -> str:
    lines = [f"{'accuracy':>14}: {result['accuracy']:.4f} on {result['n']} test pairs"]
    if "bayes_accuracy" in result:
        lines.append(f"{'bayes':>14}: {result['bayes_accuracy']:.4f} (the true densities' own)")
    lines.append(f"{'confusion':>14}: rows are the true class, columns the predicted one")
    lines += [" " * 16 + " ".join(f"{v:5d}" for v in row) for row in result["confusion"]]
    return "\n".join(lines)


def _moved(run: Run, args: argparse.Namespace):
    """The run's data, with the way forward when it is gone from where it was trained."""
    try:
        return run_data(run, args)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}: the run's data has moved or gone; score a file of rows with "
            "cnf eval RUN --data FILE, or give an image set's new folder with --data-dir"
        ) from None


def _check_eval_options(args: argparse.Namespace) -> None:
    in_range("--n", args.n, integer=True, low=1)
    in_range("--threads", args.threads, integer=True)
    in_range("--iw-probes", args.iw_probes, integer=True, low=2)
    if args.iw_probes is not None and args.dequant_samples is None:
        raise ValueError("--iw-probes is for the importance-weighted bound: add --dequant-samples")
    if args.classify and args.data is not None:
        raise ValueError("--classify classifies the run's test pairs: drop --data")
    if args.per_row is not None and args.data is None:
        raise ValueError("--per-row writes the log-density of each row of --data FILE: add it")
    if args.data is not None:
        for flag, value in (("--n", args.n), ("--dequant-samples", args.dequant_samples),
                            ("--data-dir", args.data_dir)):  # fmt: skip
            if value is not None:
                raise ValueError(f"{flag} is for the run's own test data; --data scores every "
                                 f"row of {args.data}: drop {flag}")  # fmt: skip
    if args.per_row is not None:
        if args.per_row.suffix.lower() != ".csv":
            raise ValueError(f"--per-row {args.per_row}: the log-densities are written as a .csv")
        check_output(args.per_row, flag="--per-row", force=args.force)


def _score_file(run: Run, args: argparse.Namespace, validity_n: int | None, **kw: Any):
    """The NLL of the rows of ``--data`` (and their validity check), each row's log-density
    in ``--per-row``."""
    p = next(run.model.parameters())
    c = None
    if run.meta.get("context") is not None:  # rows with their conditions
        x, c = run.pairs(args.data)
        c = torch.as_tensor(c, device=p.device, dtype=None if c.dtype == np.int64 else p.dtype)
    else:
        x = run.rows(args.data)
    x = torch.as_tensor(x, dtype=p.dtype, device=p.device)
    if len(x) == 0:
        raise ValueError(f"{args.data} has no rows to score")
    logp, nfe = log_probs(run.model, x, seed=kw["seed"], solver=kw["solver"], context=c)
    nll, se = mean_and_se(-logp)
    result: dict[str, Any] = {"data": str(args.data), "nll": nll, "nll_se": se, "nfe": nfe,
                              "n": len(logp)}  # fmt: skip
    validity = None
    if validity_n is not None:
        validity = solver_validity(run.model, x, solver=kw["checked"], start=validity_n,
                                   seed=kw["seed"], reference=kw["reference"],
                                   context=c)  # fmt: skip
        result["validity"] = validity.to_dict()
    if args.per_row is not None:
        with atomic_path(args.per_row, overwrite=True) as tmp:
            np.savetxt(tmp, logp.cpu().numpy(), fmt="%.17g", header="log_prob", comments="")
        result["per_row"] = str(args.per_row)
    return result, validity


def _check_dequant_samples(run: Run, data: Any, args: argparse.Namespace) -> None:
    in_range("--dequant-samples", args.dequant_samples, integer=True, low=1)
    if data.kind != "image":
        raise ValueError("--dequant-samples is for image models (discrete pixels); this run "
                         f"models {run.meta.get('kind')} data")  # fmt: skip
    images = len(data.test_pixels(args.n or run.config.get("test_size")))
    check_memory(args.dequant_samples * images * 8 * (2 if args.iw_probes else 1),
                 f"--dequant-samples {args.dequant_samples}: the draws of {images} images",
                 "give fewer draws, or fewer images with --n")  # fmt: skip


def _importance_weighted(run: Run, data: Any, args: argparse.Namespace, solver) -> dict:
    pixels = data.test_pixels(args.n or run.config.get("test_size"))
    gen = torch.Generator().manual_seed(0)
    bound = dequantized_bound(run.model, pixels, args.dequant_samples, probes=args.iw_probes,
                              generator=gen, solver=solver, progress=not args.json)  # fmt: skip
    out = {"nll_iw": bound.nll, "nll_iw_se": bound.nll_se, "bits_per_dim_iw": bound.bits_per_dim,
           "dequant_samples_iw": bound.samples, "bits_per_dim_iw_k1": bound.single_bits_per_dim,
           "trace_iw": bound.trace}  # fmt: skip
    if bound.probes is not None:
        out.update(probes_iw=bound.probes, probe_bias_bits_per_dim_iw=bound.probe_bias_bits_per_dim,
                   probe_noise_iw=bound.probe_noise)  # fmt: skip
    return out
