"""``cnf plot`` and ``cnf datasets``: a run's figures redrawn, the built-in datasets listed."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cnf.cli.common import TRUST_PICKLE, in_range, note, threads_flag
from cnf.data import list_datasets


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plot",
        help="redraw a run's figures",
        description="Redraw a run's figures (training.png, solver.png, and density.png and "
        "samples.png, marginals.png or samples.png by kind of data) from its directory.",
    )
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)
    threads_flag(p)


def run(args: argparse.Namespace) -> int:
    from cnf import viz  # matplotlib only when drawing

    in_range("--threads", args.threads, integer=True)
    figures = viz.plot_run(args.run, trust_pickle=args.trust_pickle, say=note("plot"),
                           threads=args.threads)  # fmt: skip
    print(f"wrote {', '.join(str(p) for p in figures)}")
    return 0


def datasets(args: argparse.Namespace) -> int:
    print(f"{'name':<16}{'kind':<9}{'dim':>5}  truth  note")
    for info in list_datasets():
        truth = "yes" if info.truth else "no"
        print(f"{info.name:<16}{info.kind:<9}{info.dim:>5}  {truth:<5}  {info.note}")
    return 0
