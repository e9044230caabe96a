"""Resuming a run: its last checkpoint, the saved config with the changes a resume may make
(:data:`RESUMABLE`), and the log brought back to the checkpoint (rows past it, an incomplete last
line dropped)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from cnf.checkpoint import CheckpointError, load_checkpoint
from cnf.io import write_text
from cnf.options import ConfigError
from cnf.runs import RunLog
from cnf.training.config import TrainConfig

# options that a resumed run may change: they steer neither the model nor the data
RESUMABLE = frozenset(
    {
        "finetune_iters",
        "iters",
        "device",
        "threads",
        "lr",
        "max_nfe",
        "grad_clip",
        "patience",
        "eval_every",
        "log_every",
        "test_size",
        "report_se",
        "val_tol",
        "validity_size",
        "eval_method",
        "eval_atol",
        "eval_rtol",
        "eval_step_size",
    }
)


def last_checkpoint(out: Path) -> dict[str, Any]:
    if not (out / "last.pt").is_file():
        hint = (
            " (the run stopped before its first checkpoint: start it again with --force)"
            if (out / "config.json").is_file()
            else ""
        )
        raise CheckpointError(f"cannot resume: {out / 'last.pt'} does not exist{hint}")
    return load_checkpoint(out / "last.pt")


def resumed_config(ckpt: dict[str, Any], changes: dict[str, Any]) -> TrainConfig:
    clash = sorted(set(changes) - RESUMABLE)
    if ckpt["config"].get("objective", "mle") == "mle" and changes.get("finetune_iters"):
        raise ConfigError(
            "finetune_iters", "is the maximum-likelihood phase that follows flow matching, but "
            "this run trains by maximum likelihood throughout (its objective cannot change on a "
            "resume): give --iters to train it longer"
        )  # fmt: skip
    if ckpt["config"].get("finetune_iters") and "iters" in changes:
        raise ConfigError(
            "iters", "is the flow-matching phase of this run, which cannot change when resuming: "
            "give --finetune-iters to change the maximum-likelihood phase after it"
        )  # fmt: skip
    if clash:
        flags = ", ".join("--" + c.replace("_", "-") for c in clash)
        allowed = ", ".join("--" + c.replace("_", "-") for c in sorted(RESUMABLE))
        raise ValueError(
            f"{flags} cannot change when resuming (the saved config is used; these options may: "
            f"{allowed}): start a new run to change them"
        )
    cfg = TrainConfig.from_dict({**ckpt["config"], "model": ckpt["model_args"]}).replace(**changes)
    if cfg.total_iters < ckpt["iteration"]:
        raise ConfigError(
            "iters",
            f"gives {cfg.total_iters} iterations in all, below the {ckpt['iteration']} this "
            "run has already trained: give a larger number to train further",
        )
    return cfg


def truncate_log(path: Path, log: RunLog, iteration: int) -> None:
    """Rewrite the log at ``path`` (read as ``log``) without the rows past the checkpoint (a
    hard kill can leave some) and an incomplete last line (the remains of an interrupted
    write), saying so. A row covers ``iters`` iterations up to its ``iter``; none straddles the
    checkpoint, since the recorder writes the row of what it holds before each checkpoint
    (:class:`~cnf.training.logrows.LogRows`), so the rows kept cover iterations 1 to
    ``iteration`` once each."""
    if log.incomplete:
        print(f"{path}: dropped an incomplete last line ({len(log.incomplete)} characters, the "
              "remains of an interrupted write)", file=sys.stderr)  # fmt: skip
    kept = [line for row, line in zip(log.rows, log.lines, strict=True) if row["iter"] <= iteration]
    write_text(path, "".join(kept))
