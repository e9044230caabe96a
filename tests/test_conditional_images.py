"""Class-conditional image flows p(image | label): the U-Net's condition added to its time
embedding, a MultiscaleCNF whose every block takes the label (its log-density against the
log-determinant of its map, round trips), the digits with their labels, training by flow
matching through the one loop, and the class grid of samples."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

from cnf import Solver
from cnf.data import get_dataset, is_conditional
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


def test_the_conv_field_refuses_a_condition_with_the_fix() -> None:
    with pytest.raises(ValueError, match="field='unet'"):
        ConvConfig().build((1, 8, 8), (8,), "tanh", context=16)
    with pytest.raises(ValueError, match="field='unet'"):
        MultiscaleCNF((1, 8, 8), levels=17, num_classes=10, hidden=(8,))


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
    with pytest.raises(ValueError, match="takes no option condition"):
        get_dataset("fashion-mnist", condition="label")


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
