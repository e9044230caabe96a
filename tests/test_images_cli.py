"""Image models through the trainer and the shell: train, eval (bits/dim), sample (PNG grid)."""

import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import SMALL, config

from cnf.checkpoint import save_checkpoint
from cnf.cli import main
from cnf.data import get_dataset
from cnf.runs import load_run
from cnf.training import setup

# the multiscale model (--objective mle; images default to flow matching on a U-Net): two
# scales of one block each on 8x8 digits, four rk4 steps: seconds on one core
TINY = ["--objective", "mle", "--iters", "24", "--batch-size", "64", "--eval-every", "12",
        "--hidden", "16,16", "--blocks", "1", "--method", "rk4", "--step-size", "0.5",
        "--eval-method", "rk4", "--eval-step-size", "0.5", "--lr", "5e-3", "--test-size", "100",
        "--threads", "1", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("images") / "digits"
    assert main(["train", "--data", "digits", "--out", str(out), *TINY]) == 0
    return out


def test_training_on_digits_lowers_the_loss(run: Path) -> None:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    first = sum(r["nll"] for r in rows[:4]) / 4
    last = sum(r["nll"] for r in rows[-4:]) / 4
    assert last < first - 30  # nats per image: from about 300 to well below 200
    assert rows[11]["val_bits_per_dim"] == pytest.approx(rows[11]["val_nll"] / (64 * math.log(2)))
    report = json.loads((run / "report.json").read_text())
    assert report["n"] == 100 and report["bits_per_dim"] < math.log2(17) + 0.5
    assert (run / "samples.png").is_file()


def test_eval_reports_bits_per_dim(run: Path, capsys) -> None:
    assert main(["eval", str(run), "--n", "50", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 50
    assert result["bits_per_dim"] == pytest.approx(result["nll"] / (64 * math.log(2)))
    assert main(["eval", str(run), "--n", "50"]) == 0
    assert "bits_per_dim" in capsys.readouterr().out


def test_eval_gives_the_importance_weighted_bound(run: Path, capsys) -> None:
    assert main(["eval", str(run), "--n", "20", "--json", "--dequant-samples", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dequant_samples"] == 1 and result["dequant_samples_iw"] == 4
    assert result["bits_per_dim_iw"] == pytest.approx(result["nll_iw"] / (64 * math.log(2)))
    # K > 1 takes the exact trace (Hutchinson's noise would bias the log-mean-exp low); on its
    # own draws the bound is never looser than their K = 1 bound
    assert result["trace_iw"] == "exact"
    assert result["bits_per_dim_iw"] <= result["bits_per_dim_iw_k1"] + 1e-9
    # fresh draws, so not below the K = 1 bound on the fixed ones by construction; but close
    assert abs(result["bits_per_dim_iw"] - result["bits_per_dim"]) < 0.5
    # averaged Hutchinson probes instead of the exact trace: the same draws, and the estimate of
    # the bias their noise leaves in the log-mean-exp
    argv = ["eval", str(run), "--n", "20", "--json", "--dequant-samples", "4", "--iw-probes", "8"]
    assert main(argv) == 0
    probed = json.loads(capsys.readouterr().out)
    assert probed["trace_iw"] == "hutchinson" and probed["probes_iw"] == 8
    assert 0 <= probed["probe_bias_bits_per_dim_iw"] < 0.05 and probed["probe_noise_iw"] > 0
    assert probed["bits_per_dim_iw_k1"] == pytest.approx(result["bits_per_dim_iw_k1"], abs=0.05)


def test_sample_png_grid_and_raw_npy(run: Path, tmp_path: Path, capsys) -> None:
    grid = tmp_path / "grid.png"
    assert main(["sample", str(run), "-n", "9", "-o", str(grid)]) == 0
    image = matplotlib.image.imread(grid)
    assert image.shape[:2] == (8 * (3 * 9 + 1), 8 * (3 * 9 + 1))  # 3x3 tiles, 8x zoom
    assert main(["sample", str(run), "-n", "9", "-o", str(grid)]) == 1  # refuses to overwrite
    # a chosen sampler: the run's own solver spelled out draws the same grid, another does not
    same, euler = tmp_path / "same.png", tmp_path / "euler.png"
    assert main(["sample", str(run), "-n", "9", "-o", str(same), "--method", "rk4",
                 "--step-size", "0.5"]) == 0  # fmt: skip
    assert main(["sample", str(run), "-n", "9", "-o", str(euler), "--method", "euler",
                 "--steps", "1"]) == 0  # fmt: skip
    assert "solved with euler" in capsys.readouterr().out
    assert (matplotlib.image.imread(same) == image).all()
    assert (matplotlib.image.imread(euler) != image).any()
    raw = tmp_path / "raw.npy"
    assert main(["sample", str(run), "-n", "6", "-o", str(raw), "--with-log-prob"]) == 0
    table = np.load(raw)
    assert table.shape == (6, 65) and np.isfinite(table).all()
    assert (table[:, :64] != np.floor(table[:, :64])).any()  # raw, not quantized
    model = load_run(run).model
    with torch.no_grad():
        x = torch.as_tensor(table[:, :64], dtype=torch.float32).reshape(6, 1, 8, 8)
        assert model.log_prob(x).shape == (6,)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sample", "{run}", "-n", "4", "-o", "{tmp}/g.png", "--with-log-prob"],
         "--with-log-prob needs a .npy or .csv output"),
        (["sample", "{toy}", "-n", "4", "-o", "{tmp}/g.png"], "a .png grid is for image models"),
        (["sample", "{run}", "-n", "4", "-o", "{tmp}/g.jpg"], "or .png (a grid of images)"),
        (["eval", "{run}", "--data-dir", "{tmp}"],
         "dataset 'digits' (image data) takes no option data_dir (--data-dir)"),
        (["train", "--data", "mnist", "--out", "{tmp}/m", "--data-dir", "{tmp}/none"],
         "mnist: no train-images-idx3-ubyte[.gz] and"),
        (["train", "--data", "moons", "--out", "{tmp}/m", "--data-dir", "{tmp}"],
         "'moons' (toy data) takes no option data_dir (--data-dir)"),
        (["eval", "{run}", "--dequant-samples", "0"], "--dequant-samples must be an integer >= 1"),
        (["eval", "{toy}", "--dequant-samples", "2"], "--dequant-samples is for image models"),
        (["eval", "{run}", "--iw-probes", "8"], "add --dequant-samples"),
        (["eval", "{run}", "--dequant-samples", "2", "--iw-probes", "1"],
         "--iw-probes must be an integer >= 2"),
        (["train", "--data", "digits", "--out", "{tmp}/m", "--scales", "5", "--objective", "mle"],
         "squeeze 4 times, so the image's height and width must be multiples of 16"),
    ],
)  # fmt: skip
def test_errors_are_one_line(run: Path, tmp_path: Path, capsys, argv: list, message: str) -> None:
    toy = tmp_path / "toy.pt"  # an untrained 2-D flow is enough to be refused a grid
    save_checkpoint(toy, setup(config(data="8gaussians", **SMALL)).checkpoint())
    argv = [a.format(tmp=tmp_path, run=run, toy=toy) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("cnf ")


def test_tf32_flag_can_be_turned_off(tmp_path: Path) -> None:
    out = tmp_path / "r"
    argv = ["train", "--data", "digits", "--out", str(out), *TINY, "--iters", "1", "--no-tf32"]
    assert main(argv) == 0
    assert json.loads((out / "config.json").read_text())["tf32"] is False


@pytest.mark.parametrize("flag", [None, "--no-unet-scale-shift"])
def test_scale_shift_is_the_preset_and_can_be_turned_off(tmp_path: Path, flag) -> None:
    out = tmp_path / "r"
    argv = ["train", "--data", "digits", "--out", str(out), "--iters", "2", "--batch-size", "16",
            "--unet-width", "8", "--eval-method", "rk4", "--eval-step-size", "0.5",
            "--test-size", "20", "--validity-size", "2", "--threads", "1", "--no-progress",
            *([flag] if flag else [])]  # fmt: skip
    assert main(argv) == 0
    on = flag is None
    saved = json.loads((out / "config.json").read_text())["model"]
    assert saved["image"]["field"]["scale_shift"] is on
    field = load_run(out).model.ode_blocks()[0].field  # the checkpoint rebuilds the same U-Net
    assert field.middle.scale_shift is on
    assert field.middle.time.out_features == (2 if on else 1) * 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert main(["train", "--data", "digits", "--out", str(out), *TINY, "--device", "cuda"]) == 0
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    data = get_dataset("digits").to("cuda")
    assert data.train_batch(8, 1).device.type == "cuda"
    model = load_run(out, "cuda").model
    with torch.no_grad():
        assert model.sample(4).device.type == "cuda"


def test_a_labelled_image_run_classifies_and_samples_guided(tmp_path: Path, capsys) -> None:
    """The multiscale model given the digit's label: cnf eval --classify gives its generative
    classifier, and cnf sample --guidance a guided grid of one class."""
    out = tmp_path / "labels"
    argv = ["train", "--data", "digits", "--condition", "label", "--out", str(out), *TINY]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--classify", "--n", "20", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["classification"]
    assert found["n"] == 20 and len(found["confusion"]) == 10
    grid = tmp_path / "threes.png"
    assert main(["sample", str(out), "-n", "4", "-o", str(grid), "--context", "3", "--guidance",
                 "1.5"]) == 0  # fmt: skip
    assert grid.stat().st_size > 0
    assert "trained without --cond-dropout" in capsys.readouterr().err
