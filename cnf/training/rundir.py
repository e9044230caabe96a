"""Run directories: what belongs to a run, and replacing one without losing anything else.

A run directory holds the files the trainer writes (:data:`RUN_FILES`) and a marker,
``.cnf-run``, written first. ``--force`` replaces a directory only when it is provably a cnf run
(the marker, or a checkpoint that loads as ours) and holds nothing but a run's files; anything
else is refused by name. The replacement is a swap: the new run directory is made beside the old
one, then the old one is renamed away and the new one into its place, so an interruption leaves
either run whole, never a half-deleted mixture.

A run directory is data that someone may have sent you: nothing cnf writes into it may follow a
symbolic link out of it. A run whose files (or ``tensorboard/``) are links is refused before
anything is written (:func:`check_own_files`), and the log is opened without following links.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from cnf.checkpoint import CheckpointError, load_checkpoint
from cnf.io import current_umask, write_text

MARKER = ".cnf-run"
CHECKPOINTS = ("last.pt", "best.pt")
FIGURES = ("density.png", "samples.png", "solver.png", "marginals.png", "training.png")
RUN_FILES = frozenset(
    {MARKER, "config.json", "log.jsonl", "report.json", "summary.txt", *CHECKPOINTS, *FIGURES}
)
RUN_DIRECTORIES = frozenset({"tensorboard"})  # --tensorboard's event files
# the temporaries of cnf.io's atomic writes, which a kill can leave behind
_TEMPORARY = re.compile(r"^\.[\w.-]+\.tmp(\.\w+)?$")


def _is_run_file(name: str, directory: bool = False) -> bool:
    if directory:
        return name in RUN_DIRECTORIES
    return name in RUN_FILES or bool(_TEMPORARY.match(name))


def is_run(path: Path) -> bool:
    """Whether ``path`` is provably a cnf run: it has the marker, or a checkpoint of ours."""
    if (path / MARKER).is_file():
        return True
    for name in CHECKPOINTS:
        try:
            load_checkpoint(path / name)
            return True
        except CheckpointError:
            continue
    return False


def check_new(out: Path, *, force: bool) -> None:
    """Refuse, before anything is written, a run directory that cannot be (re)created: one whose
    path crosses a file, or an existing non-empty directory without ``force``, or with ``force``
    one that is not provably a run or holds anything a run does not write."""
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(
                f"cannot write to run directory {out}: {parent} is a file, not a directory"
            )
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise FileExistsError(
            f"run directory {out} already exists and is not empty: pass --resume to continue "
            "it, --force to overwrite it, or choose another --out"
        )
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    check_own_files(out, "--force")
    if not is_run(out):
        raise FileExistsError(
            f"refusing to --force {out}: it does not look like a cnf run (no {MARKER} marker and "
            f"no cnf checkpoint), and --force would delete {_listing(entries)}; choose another "
            "--out"
        )
    foreign = [e for e in entries if not _is_run_file(e.rstrip("/"), e.endswith("/"))]
    if foreign:
        shown = _listing(foreign)
        raise FileExistsError(
            f"refusing to --force {out}: besides a cnf run it holds {shown}, which --force would "
            "delete; move them out of it, or choose another --out"
        )


def check_own_files(out: Path, action: str) -> None:
    """Refuse a run directory in which a file cnf writes (or anything in ``tensorboard/``) is a
    symbolic link: writing it would write wherever the link points, outside the run."""
    names = [p for p in out.iterdir() if _is_run_file(p.name) or p.name in RUN_DIRECTORIES]
    board = out / "tensorboard"
    if board.is_dir() and not board.is_symlink():
        names += sorted(board.rglob("*"))
    for path in names:
        if path.is_symlink():
            target = os.readlink(path)
            gone = "" if path.exists() else ", which does not exist"
            raise FileExistsError(
                f"refusing to {action} {out}: {path.relative_to(out)} is a symbolic link (to "
                f"{target}{gone}), and cnf writes only files of its own in a run directory: "
                "replace the link with a copy of what it points to, or choose another --out"
            )


def _listing(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def create(out: Path) -> Path:
    """Make ``out`` a fresh run directory with its marker, replacing a run checked by
    :func:`check_new` (by a swap, see the module's docstring)."""
    try:
        if out.exists() and any(out.iterdir()):
            _swap(out)
        else:
            out.mkdir(parents=True, exist_ok=True)
            _mark(out)
    except OSError as err:
        raise PermissionError(
            f"cannot write to run directory {out}: {err.strerror or err}"
        ) from err
    return out


def _mark(directory: Path) -> None:
    write_text(directory / MARKER, json.dumps({"format": "cnf-run", "version": 1}) + "\n")


def _swap(out: Path) -> None:
    out = out.resolve()  # a link to the run stays a link: the directory it names is swapped
    if out.is_mount():  # a mount point cannot be renamed: empty it instead
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        _mark(out)
        return
    new = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    os.chmod(new, 0o777 & ~current_umask())
    _mark(new)
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    os.rename(new, out)
    shutil.rmtree(old)
