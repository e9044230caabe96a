"""``cnf train``: train a flow into a run directory (or resume one)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from cnf.cli.common import TRUST_PICKLE
from cnf.cli.flags import add_config_flags, config_fields, flag_text
from cnf.io import json_text
from cnf.runs import read_log
from cnf.training import PRESETS, RESUMABLE, TrainConfig, train
from cnf.training.distributed import is_main_process


def add_parser(sub: Any) -> None:
    presets = "; ".join(
        f"{kind}: "
        + ", ".join(f"--{k.replace('_', '-')} {flag_text(v)}" for k, v in preset.items())
        for kind, preset in PRESETS.items()
    )
    p = sub.add_parser(
        "train",
        help="train a flow",
        description="Train a flow on a dataset.",
        epilog=f"The defaults shown are those of the 2-D toys; other kinds of data change some "
        f"of them (flags given still win). {presets}.",
    )
    p.add_argument("--out", type=Path, help="run directory (default: runs/DATA)")
    p.add_argument("--resume", type=Path, metavar="DIR",
                   help="continue the run in DIR exactly where it stopped; of the options below "
                   "only these may change: "
                   + ", ".join("--" + o.replace("_", "-") for o in sorted(RESUMABLE)))  # fmt: skip
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true",
                   help="print the report as one JSON object instead of the summary")  # fmt: skip
    p.add_argument("--tensorboard", action="store_true",
                   help="also log to TensorBoard, in DIR/tensorboard (needs the tensorboard "
                   'package: pip install "cnf[tensorboard]")')  # fmt: skip
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)
    add_config_flags(p)


def _spent(result: Any, drawn: float) -> str:
    """Where the command's CPU seconds went: training, validation, report, figures."""
    log = read_log(result.out / "log.jsonl")
    report = sum((result.report or {}).get("cost", {}).values())
    return (f"CPU seconds: {time.process_time():.0f} this command; the run's training "
            f"{log.total('cpu'):.1f} and validation {log.total('val_cpu'):.1f}, the report "
            f"{report:.1f}, the figures {drawn:.1f}")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from cnf import viz  # matplotlib only when drawing

    given = {name: getattr(args, name) for name, _, _ in config_fields()
             if getattr(args, name) is not None}  # fmt: skip
    common = dict(progress=not args.no_progress, trust_pickle=args.trust_pickle,
                  tensorboard=args.tensorboard)  # fmt: skip
    if args.resume is not None:
        if args.out is not None and args.out != args.resume:
            raise ValueError("--resume DIR names the run directory: drop --out")
        if args.force:
            raise ValueError(
                "--resume and --force contradict each other: --resume continues the run in DIR, "
                "--force replaces it; choose one"
            )
        result = train(TrainConfig(), args.resume, resume=True, changes=given, **common)
    else:
        cfg = TrainConfig.for_data(given.pop("data", TrainConfig.data), **given)
        out = args.out or Path("runs") / Path(cfg.data.split(".npz:")[0]).stem
        result = train(cfg, out, force=args.force, **common)
    if result.interrupted:
        return 128 + result.interrupted  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    if not is_main_process():  # rank 0 draws and prints
        return 0
    if not args.no_progress:
        print("drawing the figures", file=sys.stderr)
    start = time.process_time()
    figures = viz.plot_run(result.out, data=result.data, trust_pickle=args.trust_pickle)
    drawn = time.process_time() - start
    if args.json:
        print(json_text(result.report))
        return 0
    print((result.out / "summary.txt").read_text().rstrip())
    print(_spent(result, drawn))
    names = ", ".join(p.name for p in figures)
    print(f"run saved in {result.out}: report.json (every number), best.pt, last.pt, log.jsonl; "
          f"figures {names}")  # fmt: skip
    return 0
