"""Tabular data: bundled sets, user files, column rules, seeded splits, the MAF layout."""

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from cnf.data import from_file, get_dataset, list_datasets
from cnf.data.columns import ColumnPlan
from cnf.data.tabular import TabularData, split_indices


def _rows(x: np.ndarray) -> set[tuple[float, ...]]:
    return {tuple(r) for r in x}


@pytest.mark.parametrize(
    ("name", "dim"),
    [("breast_cancer", 30), ("wine", 13), ("iris", 4), ("diabetes", 10), ("digits-tabular", 61)],
)
def test_bundled_sets(name: str, dim: int) -> None:
    data = get_dataset(name, seed=0)
    assert data.kind == "tabular" and data.event_shape == (dim,)
    n_train, n_val, n_test = data.meta()["rows"]
    assert data.train_data().shape == (n_train, dim) and data.validation().shape == (n_val, dim)
    assert data.test().shape == (n_test, dim) and data.test(3).shape == (3, dim)


def test_digits_name_is_left_for_images_and_constant_pixels_are_dropped() -> None:
    kinds = {info.name: info.kind for info in list_datasets()}
    assert kinds["digits-tabular"] == "tabular" and kinds["digits"] == "image"
    meta = get_dataset("digits-tabular", seed=0).meta()
    assert "pixel_0_0" in meta["dropped"] and "pixel_0_0" not in meta["columns"]


def test_splits_are_seeded_disjoint_and_complete() -> None:
    a = split_indices(100, 0.2, 0.1, seed=3)
    b = split_indices(100, 0.2, 0.1, seed=3)
    c = split_indices(100, 0.2, 0.1, seed=4)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert [len(i) for i in a] == [70, 20, 10]
    assert sorted(np.concatenate(a).tolist()) == list(range(100))
    data = get_dataset("iris", seed=5)  # duplicates rows exist in iris: compare indices instead
    train, val, test = data.train_data(), data.validation(), data.test()
    assert len(train) + len(val) + len(test) == 150
    np.testing.assert_array_equal(test, get_dataset("iris", seed=5).test())
    assert not np.array_equal(test, get_dataset("iris", seed=6).test())


@pytest.mark.parametrize(("val", "test"), [(0.0, 0.1), (0.1, 1.0), (0.6, 0.4)])
def test_impossible_split_fractions(val: float, test: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        get_dataset("wine", val_fraction=val, test_fraction=test)


def test_batches_are_seeded_epochs() -> None:
    data = get_dataset("wine", seed=1)
    n = len(data.splits.train)
    np.testing.assert_array_equal(
        data.train_batch(32, 7), get_dataset("wine", seed=1).train_batch(32, 7)
    )
    batch = 20
    epoch = np.concatenate([data.train_batch(batch, i) for i in range(1, n // batch + 1)])
    assert len(_rows(epoch)) == len(epoch)  # no row twice within an epoch
    assert _rows(epoch) <= _rows(data.splits.train)


def test_dequantization_noise_is_uniform_on_integer_columns_only() -> None:
    data = get_dataset("digits-tabular", seed=0, dequantize=True)
    raw = data.splits.train
    batch = data.train_batch(len(raw), 1)
    noisy = data.train_data() - raw
    assert (noisy >= 0).all() and (noisy < 1).all()
    assert abs(noisy.mean() - 0.5) < 0.01 and abs(noisy.var() - 1 / 12) < 0.005
    assert not np.array_equal(batch, data.train_batch(len(raw), 2))  # fresh every iteration
    np.testing.assert_array_equal(
        data.validation(), get_dataset("digits-tabular", seed=0, dequantize=True).validation()
    )
    cancer = get_dataset("breast_cancer", seed=0, dequantize=True)  # no integer columns
    np.testing.assert_array_equal(cancer.train_data(), cancer.splits.train)


def test_integer_columns_without_dequantization_get_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="cnf"):
        get_dataset("wine")
    assert (
        "magnesium, proline take only integer values" in caplog.text
        and "--dequantize" in caplog.text
    )


# --- user files ------------------------------------------------------------------------------


@pytest.fixture
def table() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.column_stack([rng.normal(size=40), rng.normal(size=40) * 10, rng.random(40)])


def test_csv_with_header_and_column_selection(tmp_path: Path, table: np.ndarray) -> None:
    path = tmp_path / "t.csv"
    np.savetxt(path, table, delimiter=",", header="a,b,c", comments="")
    data = get_dataset(str(path), seed=0, columns="c,a")
    assert data.meta()["columns"] == ["c", "a"] and data.meta()["name"] == str(path.resolve())
    every = np.concatenate([data.splits.train, data.splits.validation, data.splits.test])
    assert _rows(every) == _rows(table[:, [2, 0]])
    by_index = get_dataset(str(path), seed=0, columns="2,0")
    np.testing.assert_array_equal(by_index.test(), data.test())


def test_csv_without_header_npy_and_npz_agree(tmp_path: Path, table: np.ndarray) -> None:
    np.savetxt(tmp_path / "t.csv", table, delimiter=",")
    np.save(tmp_path / "t.npy", table)
    np.savez(tmp_path / "one.npz", table)
    np.savez(tmp_path / "two.npz", data=table, other=table[:, :2])
    names = ["t.csv", "t.npy", "one.npz", "two.npz:data"]
    sets = [get_dataset(str(tmp_path / n), seed=2) for n in names]
    for data in sets:
        assert data.meta()["columns"] == ["x0", "x1", "x2"]
        np.testing.assert_allclose(data.test(), sets[1].test(), rtol=1e-15)
    with pytest.raises(ValueError, match=r"holds arrays \['data', 'other'\]: choose one with"):
        get_dataset(str(tmp_path / "two.npz"))


@pytest.mark.parametrize(
    ("columns", "match"),
    [
        (
            "a,z",
            r"unknown column 'z' in .*t.csv: it has 3 columns \(a, b, c\); give names or indices",
        ),
        ("0,7", "unknown column '7'"),
        ("a,0", "names a column twice"),
    ],
)
def test_bad_columns(tmp_path: Path, table: np.ndarray, columns: str, match: str) -> None:
    path = tmp_path / "t.csv"
    np.savetxt(path, table, delimiter=",", header="a,b,c", comments="")
    with pytest.raises(ValueError, match=match):
        get_dataset(str(path), columns=columns)


def test_text_columns_can_be_left_out(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    rows = [f"{i * 0.5},{i % 3}.25,label{i % 2}" for i in range(30)]
    path.write_text("x,y,kind\n" + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"non-numeric value 'label0' in column 'kind'.*--columns"):
        get_dataset(str(path))
    assert get_dataset(str(path), columns="x,y").event_shape == (2,)


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no data file at .*nothing.csv"):
        get_dataset(str(tmp_path / "nothing.csv"))
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    with pytest.raises(ValueError, match="line 2 has 1 fields, expected 2"):
        get_dataset(str(tmp_path / "ragged.csv"))
    np.save(tmp_path / "flat.npy", np.arange(5.0))
    with pytest.raises(ValueError, match=r"expected a 2-D numeric array .* got shape \(5,\)"):
        get_dataset(str(tmp_path / "flat.npy"))
    with pytest.raises(ValueError, match=r"valid names: .*or a path"):
        get_dataset("no_such_set")


# --- degenerate columns and NaN rows ---------------------------------------------------------


def test_constant_and_duplicate_columns_are_dropped_with_a_warning(
    tmp_path: Path, table: np.ndarray, caplog
) -> None:
    full = np.column_stack([table, np.full(40, 7.0), table[:, 1]])
    np.savetxt(tmp_path / "t.csv", full, delimiter=",", header="a,b,c,k,b2", comments="")
    with caplog.at_level(logging.WARNING, logger="cnf"):
        data = get_dataset(str(tmp_path / "t.csv"))
    assert data.meta()["columns"] == ["a", "b", "c"] and data.meta()["dropped"] == ["k", "b2"]
    assert "1 constant columns (no density): k" in caplog.text
    assert "repeat another exactly: b2=b" in caplog.text
    plan = ColumnPlan.fit(full, ["a", "b", "c", "k", "b2"])
    np.testing.assert_array_equal(plan.restore(plan.apply(full)), full)
    with pytest.raises(ValueError, match=r"every column .* is constant"):
        ColumnPlan.fit(np.ones((5, 2)), ["a", "b"])


def test_nan_rows_are_refused_or_dropped(tmp_path: Path, table: np.ndarray, caplog) -> None:
    bad = table.copy()
    bad[[3, 17], 1] = np.nan
    bad[5, 0] = np.inf
    np.savetxt(tmp_path / "t.csv", bad, delimiter=",")
    with pytest.raises(
        ValueError, match=r"NaN or inf values in 3 rows \(data rows 3, 5, 17\).*--drop-nan"
    ):
        get_dataset(str(tmp_path / "t.csv"))
    with caplog.at_level(logging.WARNING, logger="cnf"):
        data = get_dataset(str(tmp_path / "t.csv"), drop_nan=True)
    assert "dropped 3 rows with NaN or inf values (data rows 3, 5, 17)" in caplog.text
    assert sum(data.meta()["rows"]) == 37
    (tmp_path / "na.csv").write_text("a,b\n1,2\nNA,3\n4,?\n" + "5,6\n" * 20)
    with pytest.raises(ValueError, match=r"in 2 rows \(data rows 1, 2\)"):
        get_dataset(str(tmp_path / "na.csv"))


def test_toy_densities_refuse_tabular_options() -> None:
    with pytest.raises(
        ValueError, match=r"'moons' \(toy data\) takes no option columns \(--columns\)"
    ):
        get_dataset("moons", columns="a")


# --- the MAF layout --------------------------------------------------------------------------


def test_power_follows_the_maf_preprocessing(tmp_path: Path) -> None:
    raw = np.random.default_rng(0).normal(size=(200, 8)) * np.arange(1, 9)
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", raw)
    data = get_dataset(str(tmp_path / "power"))
    # MAF: shuffle with RandomState(42), drop columns 3 and 1, add its noise, last 10% test,
    # last 10% of the rest validation, normalize with train+validation statistics
    rng = np.random.RandomState(42)
    x = raw.copy()
    rng.shuffle(x)
    x = np.delete(np.delete(x, 3, 1), 1, 1)
    noise = [0.01 * rng.rand(200, 1), 0.001 * rng.rand(200, 1), rng.rand(200, 3)]
    x = x + np.hstack([noise[1], noise[0], noise[2], np.zeros((200, 1))])
    train, val, test = x[:162], x[162:180], x[180:]
    mu, s = x[:180].mean(0), x[:180].std(0)
    np.testing.assert_allclose(data.test(), (test - mu) / s)
    np.testing.assert_allclose(data.validation(), (val - mu) / s)
    np.testing.assert_allclose(data.train_data(), (train - mu) / s)
    assert data.meta()["source"] == "maf-power" and data.event_shape == (6,)


def test_miniboone_and_hepmass_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone" / "data.npy", rng.normal(size=(100, 5)))
    mini = get_dataset(str(tmp_path / "miniboone"))
    assert [len(mini.train_data()), len(mini.validation()), len(mini.test())] == [81, 9, 10]
    np.testing.assert_allclose(
        np.vstack([mini.train_data(), mini.validation()]).mean(0), 0, atol=1e-12
    )

    hep = tmp_path / "hepmass"
    hep.mkdir()
    n = 60
    label = np.arange(n) % 2
    feats = rng.normal(size=(n, 4))
    feats[:, 2] = np.clip(np.round(feats[:, 2]), 0, None)  # its minimum recurs: MAF drops it
    train = np.column_stack([label, feats])
    np.savetxt(
        hep / "1000_train.csv", train, delimiter=",", header="# label,f0,f1,f2,mass", comments=""
    )
    test = np.column_stack([label, feats, np.zeros(n)])  # the test file's extra last column
    np.savetxt(
        hep / "1000_test.csv", test, delimiter=",", header="# label,f0,f1,f2,mass,x", comments=""
    )
    data = get_dataset(str(hep))
    signal = feats[label == 1][:, [0, 1, 3]]
    mu, s = signal.mean(0), signal.std(0, ddof=1)
    np.testing.assert_allclose(data.test(), (signal - mu) / s)
    np.testing.assert_allclose(data.train_data(), ((signal - mu) / s)[:27])
    assert data.event_shape == (3,)


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("power", "power/data.npy"),
        ("miniboone", "miniboone/data.npy"),
        ("hepmass", "hepmass/1000_train.csv"),
        ("gas", "gas/ethylene_CO.pickle"),
        ("BSDS300", "BSDS300/BSDS300.hdf5"),
    ],
)
def test_missing_maf_files_name_the_expected_path(
    tmp_path: Path, folder: str, expected: str
) -> None:
    (tmp_path / folder).mkdir()
    with pytest.raises(FileNotFoundError, match=f"expected {tmp_path / expected}"):
        get_dataset(str(tmp_path / folder))


@pytest.mark.parametrize(
    ("folder", "file", "module"),
    [("gas", "ethylene_CO.pickle", "pandas"), ("BSDS300", "BSDS300.hdf5", "h5py")],
)
def test_optional_packages_are_named(
    tmp_path: Path, monkeypatch, folder: str, file: str, module: str
) -> None:
    (tmp_path / folder).mkdir()
    (tmp_path / folder / file).write_bytes(b"")
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(ImportError, match=rf"needs {module}.*pip install {module}"):
        from_file(str(tmp_path / folder), trust_pickle=True)


def test_other_directories_and_fixed_maf_splits(tmp_path: Path) -> None:
    (tmp_path / "mydata").mkdir()
    with pytest.raises(ValueError, match="not a MAF dataset directory: expected one named power"):
        get_dataset(str(tmp_path / "mydata"))
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", np.random.default_rng(0).normal(size=(50, 8)))
    with pytest.raises(ValueError, match="keeps the MAF paper's fixed split"):
        get_dataset(str(tmp_path / "power"), val_fraction=0.2)


def test_tabular_meta_is_plain_data() -> None:
    import json

    data = get_dataset("wine", seed=0)
    assert json.loads(json.dumps(data.meta())) == data.meta()
    assert isinstance(data, TabularData)
