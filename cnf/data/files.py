"""Reading a user's table: ``.csv`` (a header detected), ``.npy`` and ``.npz``, never unpickled,
every failure a ``ValueError`` that names the file."""

from __future__ import annotations

import csv
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from cnf.data.columns import MISSING, Table

FILE_SUFFIXES = (".csv", ".npy", ".npz")
# what numpy raises on a .npy/.npz file that is truncated, corrupt, pickled or absurdly large
LOAD_ERRORS = (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error, MemoryError)


def read_table(path: Path, key: str | None = None) -> Table:
    """Read ``.csv`` (header detected: a first row that is not all numbers), ``.npy`` or ``.npz``
    (one array, or ``key``) into a :class:`Table`; headerless columns are named ``x0, x1, ...``."""
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(f"cannot read {path}: expected a {', '.join(FILE_SUFFIXES)} file")
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    if suffix == ".csv":
        return read_csv(path)
    return _named(load_array(path, key, "save it with np.save of a float array, or as .csv"), path)


def load_array(path: Path, key: str | None = None, fix: str = "save it again") -> np.ndarray:
    """The array of a ``.npy`` file, or one of a ``.npz`` file (``key``, needed when it holds
    several), never unpickled; whatever fails, a ``ValueError`` that names the file and ``fix``."""
    try:  # never with allow_pickle: an object array would unpickle, and so could run code
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as archive:
            return _member(archive, key, path)
    except LOAD_ERRORS as err:
        if str(err).startswith(str(path)):
            raise
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"{path} is not a numeric {path.suffix} array numpy can read without unpickling, "
            f"or is truncated or corrupt ({detail}): {fix}"
        ) from err


def _member(archive: Any, key: str | None, path: Path) -> np.ndarray:
    keys = list(archive.keys())
    if key is None and len(keys) != 1:
        raise ValueError(f"{path} holds arrays {keys}: choose one with --data {path}:NAME")
    if key is not None and key not in keys:
        raise ValueError(f"{path} has no array {key!r}; it holds {keys}")
    return archive[key or keys[0]]


def _named(array: np.ndarray, path: Path) -> Table:
    if array.ndim != 2 or array.dtype.kind not in "fiub":
        raise ValueError(
            f"{path}: expected a 2-D numeric array (rows x columns), got shape {array.shape} of "
            f"dtype {array.dtype}"
        )
    return Table(array, tuple(f"x{i}" for i in range(array.shape[1])))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text.strip().lower() in MISSING - {""}
    return True


def read_csv(path: Path) -> Table:
    """A CSV file as a :class:`Table`; text that is not CSV (binary, a field beyond the csv
    module's limit) is a ``ValueError`` naming the file."""
    try:
        return _parse_csv(path)
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(
            f"{path} is not a CSV text file, or is corrupt ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}): save it as UTF-8 text of "
            "comma-separated numbers, or as .npy"
        ) from err


def _parse_csv(path: Path) -> Table:
    with open(path, newline="") as f:
        first = next((r for r in csv.reader(f) if any(c.strip() for c in r)), None)
    if first is None:
        raise ValueError(f"{path} is empty")
    header = not all(_is_number(c) for c in first)
    columns = (
        tuple(c.strip() for c in first) if header else tuple(f"x{i}" for i in range(len(first)))
    )
    try:  # numpy's C parser for all-numeric files (MAF's HEPMASS has millions of rows)
        with warnings.catch_warnings():  # "input contained no data": our own error says it
            warnings.simplefilter("ignore")
            values = np.loadtxt(path, delimiter=",", skiprows=int(header), ndmin=2, comments=None)
        if values.shape[1] == len(columns) and len(values):
            return Table(values, columns)
    except ValueError:
        pass
    return _read_csv_text(path, header, columns)


def _read_csv_text(path: Path, header: bool, columns: tuple[str, ...]) -> Table:
    """The slow path: text cells (converted after column selection) and missing values."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    body = rows[1:] if header else rows
    for i, row in enumerate(body):
        if len(row) != len(columns):
            raise ValueError(
                f"{path}: line {i + 1 + header} has {len(row)} fields, expected {len(columns)}"
            )
    if not body:
        raise ValueError(f"{path} has a header but no data rows")
    return Table(np.array(body, dtype=object), columns)


def looks_like_path(name: str) -> bool:
    """Whether ``get_dataset`` should treat ``name`` as a file or directory."""
    base = name.split(".npz:")[0] if ".npz:" in name else name
    return Path(base).expanduser().exists() or base.lower().endswith(FILE_SUFFIXES) or "/" in base
