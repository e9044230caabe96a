"""Writing outputs safely: every file the package writes is written atomically, and a full disk
is one clear error.

A write goes to a temporary file in the target's directory, is flushed to disk and renamed over
the target, so a crash, a kill or a full disk never leaves a half-written or empty file where a
good one was (or where a user would take it for a result). The file gets the permissions that
``open()`` would give it under the current umask (``mkstemp`` alone gives 0600).
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO


class DiskFullError(OSError):
    """No space left on the device that holds an output; the message names it."""


def current_umask() -> int:
    """The process's umask (read without changing it for longer than a call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _free(directory: Path) -> str:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return "unknown space"
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if free < 1000 or unit == "TB":
            return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
        free /= 1000
    return ""  # unreachable


def disk_full(path: str | Path, err: OSError | None = None) -> DiskFullError:
    """The error for a write to ``path`` that found its disk full."""
    path = Path(path)
    directory = path.parent if path.parent.exists() else Path.cwd()
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on the disk holding {directory} ({_free(directory)} free) while writing "
        f"{path.name}: free some space there, or write to another disk",
    )


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch's C++ writer reports a failed write as a RuntimeError ("file write failed")
    return isinstance(err, RuntimeError) and "write failed" in str(err)


@contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix) for writers that need a file name; renamed
    over ``path`` when the block succeeds, removed when it fails. With ``overwrite=False`` an
    existing ``path`` is refused first."""
    path = Path(path)
    if not overwrite:
        check_output(path, flag="path", force=False, hint="overwrite=True")
    _check_directory(path, "path")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}",
                               dir=path.parent)  # fmt: skip
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except BaseException as err:
        tmp_path.unlink(missing_ok=True)
        if _is_disk_full(err):
            raise disk_full(path) from err
        raise


def write_bytes(path: str | Path, data: bytes, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see the module's docstring)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)


def open_append(path: str | Path) -> TextIO:
    """``path`` opened for appending text (created if missing), never through a symbolic link:
    a link there is an error (``ELOOP``) instead of a write wherever it points."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | nofollow, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise FileExistsError(
                f"refusing to append to {path}: it is a symbolic link; replace it with a file"
            ) from err
        raise
    return os.fdopen(fd, "a")


def json_text(value: Any, **kwargs: Any) -> str:
    """``value`` as standard JSON: a non-finite float (a standard error of one point, say)
    becomes ``null``, where ``json.dumps`` would write a bare ``NaN`` that most parsers refuse.

    Example:
        >>> json_text({"se": float("nan"), "nll": [1.5, float("inf")]})
        '{"se": null, "nll": [1.5, null]}'
    """
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def save_figure(fig: Any, path: str | Path, *, overwrite: bool = True, **kwargs: Any) -> None:
    """``fig.savefig`` into memory, then an atomic write: no empty PNG on a full disk. With
    ``overwrite=False`` an existing file is refused before anything is drawn."""
    if not overwrite:
        check_output(path, flag="path", force=False, hint="overwrite=True")
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    write_bytes(path, buffer.getvalue())


def check_output(path: str | Path, *, flag: str, force: bool, hint: str = "--force") -> Path:
    """Check, before any work, that ``path`` can be written: no part of its directory is a file,
    it is not a directory, and an existing file is only replaced with ``force`` (``hint`` names
    the way to ask for that)."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(
                f"cannot write {flag} {path}: {parent} is a file, not a directory"
            )
    _check_directory(path, flag)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a directory: name a file inside it")
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists: pass {hint} to overwrite it")
    return path


def _check_directory(path: Path, flag: str) -> None:
    """A missing directory is named as such (the temporary file's name would be in the error)."""
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"cannot write {flag} {path}: the directory {path.parent} does not exist (create it "
            "first, or name a file in an existing directory)"
        )
