"""An exponential moving average of the weights (``ema``): it follows its recurrence, validation
scores it while training goes on with the model's own weights, checkpoints give it to users as
``"model"`` and keep the training weights for a resume."""

import copy
from pathlib import Path

import pytest
import torch
from conftest import config

from cnf.checkpoint import load_checkpoint
from cnf.evaluate import evaluate
from cnf.runtime import to_tensors
from cnf.seeds import VALIDATION
from cnf.training import KeepBest, fit, setup, train
from cnf.training.loop import step

SMALL = dict(data="8gaussians", objective="fm", batch_size=64, hidden=(16, 16), lr=1e-2,
             eval_method="rk4", eval_step_size=0.25, seed=1, threads=1, device="cpu")  # fmt: skip


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def test_the_average_follows_its_recurrence() -> None:
    """After each step k (from 1), avg <- d_k avg + (1 - d_k) w_k, d_k = min(decay, (1+k)/(10+k)),
    from the initial weights, computed here in float64 from the weights after every step."""
    decay = 0.9
    run = setup(config(**SMALL, iters=40, ema=decay))
    expected = _params(run.model)
    for k in range(1, 41):
        x, c = to_tensors(run.data.train_batch(64, k), torch.device("cpu"), torch.float32)
        step(run.state, run.objective, x, run.cfg, context=c)
        d = min(decay, (1 + k) / (10 + k))
        w = _params(run.model)
        expected = {n: d * expected[n] + (1 - d) * w[n] for n in w}
    for name, value in run.state.average.items():
        torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-6, msg=name)
        assert not torch.equal(value, run.model.get_parameter(name)), name  # not the weights


def test_validation_scores_the_average_and_training_keeps_its_own_weights() -> None:
    run = setup(config(**SMALL, iters=30, eval_every=30, ema=0.95))
    keep = KeepBest()
    fit(run.state, run.data, run.objective, run.cfg, hooks=keep, progress=False, quiet=True)
    own = _params(run.model)
    averaged = copy.deepcopy(run.model)
    averaged.load_state_dict(run.state.weights())
    x, c = to_tensors(run.data.validation(), torch.device("cpu"), torch.float32)
    ev = evaluate(averaged, x, seed=run.cfg.seed, stream=VALIDATION, context=c)
    assert keep.scores[-1] == pytest.approx(-ev.nll, abs=1e-9)  # the average was scored
    assert all(torch.equal(keep.weights[n], v) for n, v in run.state.average.items())
    assert all(torch.equal(own[n], w) for n, w in _params(run.model).items())  # restored
    assert any(not torch.equal(own[n], a.double()) for n, a in run.state.average.items())


def test_checkpoints_give_the_average_and_keep_the_training_weights(tmp_path: Path) -> None:
    flat = dict(**SMALL, iters=20, eval_every=10, test_size=200, validity_size=100)
    train(config(**flat, ema=0.9), tmp_path / "ema", progress=False)
    ckpt = load_checkpoint(tmp_path / "ema" / "last.pt")
    assert ckpt["average_start"] == 0
    differs = [n for n in ckpt["training_model"]
               if not torch.equal(ckpt["model"][n], ckpt["training_model"][n])]  # fmt: skip
    assert differs  # "model" is the average, "training_model" the weights being trained
    train(config(**flat), tmp_path / "plain", progress=False)
    plain = load_checkpoint(tmp_path / "plain" / "last.pt")
    assert "training_model" not in plain and "average_start" not in plain
