"""The plain time-concatenated MLP field (``--mlp concat``): its forward-mode Jacobian against
autograd in float64, a CNF built with it against the exact change of variables, and the option
through the configs, the checkpoint and the command line."""

import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL, cli_flags

from cnf import CNF, Solver
from cnf.cli import main
from cnf.fields import ACTIVATIONS, MLPS, ConcatMLP, ConcatSquashMLP, make_mlp
from cnf.model_config import ModelConfig, build_model
from cnf.options import ConfigError
from cnf.runs import load_run
from cnf.trace import ExactTrace, JacobianField

TIGHT = Solver("dopri5", atol=1e-10, rtol=1e-10)


def _jacobians(field, t, z, context=None) -> torch.Tensor:
    """Each row's ``df/dz`` by autograd, its own context row (or the shared one) held fixed."""
    rows = []
    for i, zi in enumerate(z):
        ci = None if context is None else context[min(i, len(context) - 1)][None]
        extra = {} if ci is None else {"context": ci}
        one = lambda v, extra=extra: field(t, v[None], **extra)[0]  # noqa: E731
        rows.append(torch.autograd.functional.jacobian(one, zi))
    return torch.stack(rows)


@pytest.mark.parametrize("dim", [1, 2, 5])
@pytest.mark.parametrize("context", ["none", "shared", "per-row"])
def test_value_and_jacobian_equals_autograd(float64, dim: int, context: str) -> None:
    width = 0 if context == "none" else 3
    field = ConcatMLP(dim, (16, 16), activation="silu", context=width)
    t, z = torch.tensor(0.37), torch.randn(7, dim) * 2
    c = {"none": None, "shared": torch.randn(1, 3), "per-row": torch.randn(7, 3)}[context]
    extra = {} if c is None else {"context": c}
    value, jac = field.value_and_jacobian(t, z, **extra)
    assert jac.shape == (7, dim, dim)
    torch.testing.assert_close(value, field(t, z, **extra), rtol=0, atol=1e-12)
    torch.testing.assert_close(jac, _jacobians(field, t, z, c), rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_forward_mode_jacobian_for_every_activation(float64, activation: str) -> None:
    field = ConcatMLP(3, (8, 8), activation=activation)
    t, z = torch.tensor(0.8), torch.randn(9, 3) * 2
    assert isinstance(field, JacobianField)  # the exact trace's fast path
    value, jac = field.value_and_jacobian(t, z)
    torch.testing.assert_close(value, field(t, z))
    torch.testing.assert_close(jac, _jacobians(field, t, z))
    ev = ExactTrace()(field, t, z, None, frobenius=True)
    torch.testing.assert_close(ev.trace, jac.diagonal(dim1=1, dim2=2).sum(1))


def test_the_field_is_an_mlp_of_the_concatenated_input(float64) -> None:
    """f(t, z, c) = MLP([z, t, c]) written out from the parameters, with one time per row (as
    flow matching calls it) or one for every row."""
    field = ConcatMLP(2, (5,), activation="tanh", context=3)
    first, last = field.layers
    t, z, c = torch.rand(4), torch.randn(4, 2), torch.randn(4, 3)
    expected = last(torch.tanh(first(torch.cat([z, t[:, None], c], 1))))
    torch.testing.assert_close(field(t, z, context=c), expected)
    one = field(t[0], z, context=c[:1])
    torch.testing.assert_close(one, field(t[0].expand(4), z, context=c[:1].expand(4, 3)))
    assert first.in_features == 2 + 1 + 3 and last.out_features == 2


@pytest.mark.parametrize("context", [None, 3])
def test_log_prob_is_the_exact_change_of_variables(float64, context: int | None) -> None:
    """log q(x) = log N(z(x)) + log |det dz/dx|, with dz/dx by autograd through a tight solve."""
    flow = CNF(2, hidden=(16, 16), mlp="concat", trace="exact", solver=TIGHT, context=context)
    assert isinstance(flow.field, ConcatMLP)
    with torch.no_grad():  # a strong random field: log-dets of order one
        for layer in flow.field.layers:
            layer.weight.mul_(3)
    x = torch.randn(5, 2)
    c = None if context is None else torch.randn(5, context)
    expected = []
    for i in range(5):
        extra = {} if c is None else {"context": c[i]}
        to_z = lambda v, extra=extra: flow.to_latent(v[None], **extra).value[0]  # noqa: E731
        z, jac = to_z(x[i]), torch.autograd.functional.jacobian(to_z, x[i])
        expected.append(flow.base_log_prob(z[None])[0] + torch.linalg.slogdet(jac).logabsdet)
    extra = {} if c is None else {"context": c}
    logdets = torch.stack(expected) - flow.base_log_prob(flow.to_latent(x, **extra).value)
    assert logdets.abs().max() > 0.1  # not a near-identity map
    torch.testing.assert_close(flow.log_prob(x, **extra), torch.stack(expected), rtol=0, atol=1e-7)


def test_the_option_builds_the_field_for_toys_and_tables_and_is_refused_for_images() -> None:
    toy = build_model(ModelConfig(mlp="concat", hidden=(8,)), {"kind": "toy", "event_shape": [2]})
    assert isinstance(toy.field, ConcatMLP)
    table_cfg = ModelConfig.for_kind("tabular", mlp="concat", hidden=(8,))
    table = build_model(table_cfg, {"kind": "tabular", "event_shape": [3]})
    assert isinstance(table.field, ConcatMLP)  # and it starts at the identity flow
    assert all(bool((p == 0).all()) for p in table.field.layers[-1].parameters())
    plain = build_model(ModelConfig(hidden=(8,)), {"kind": "toy", "event_shape": [2]})
    assert isinstance(plain.field, ConcatSquashMLP)  # the default
    saved = ModelConfig(mlp="concat").to_dict()
    assert saved["mlp"] == "concat" and ModelConfig.from_dict(saved).mlp == "concat"
    del saved["mlp"]  # a checkpoint from before the option
    assert ModelConfig.from_dict(saved).mlp == "concatsquash"
    with pytest.raises(ConfigError, match="mlp 'dense' is unknown; valid choices") as err:
        ModelConfig(mlp="dense")
    assert err.value.field == "mlp"
    with pytest.raises(ConfigError, match="mlp is for vector data") as err:
        ModelConfig.for_kind("image").replace(mlp="concat")
    with pytest.raises(ValueError, match=r"unknown mlp 'dense'; valid choices"):
        make_mlp("dense", 2, (8,), activation="tanh")
    assert list(MLPS) == ["concatsquash", "concat"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mlp") / "run"
    flags = cli_flags(**{**SMALL, "iters": 20})
    argv = ["train", "--data", "8gaussians", "--mlp", "concat", "--out", str(out), *flags]
    assert main([*argv, "--no-progress"]) == 0
    return out


def test_a_run_reloads_with_its_field(run: Path) -> None:
    assert json.loads((run / "config.json").read_text())["model"]["mlp"] == "concat"
    loaded = load_run(run)
    assert isinstance(loaded.model.field, ConcatMLP)
    saved = torch.load(run / "best.pt", weights_only=False)["model"]
    assert loaded.model.state_dict().keys() == saved.keys()
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, saved[key])


def test_eval_works_on_the_run(run: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["eval", str(run), "--n", "200", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 200 and torch.isfinite(torch.tensor([result["nll"], result["kl"]])).all()


@pytest.mark.parametrize(
    ("data", "value", "message"),
    [
        ("8gaussians", "dense", "--mlp 'dense' is unknown; valid choices: ['concatsquash', "),
        ("digits", "concat", "--mlp is for vector data (toys and tables)"),
    ],
)
def test_a_wrong_mlp_is_one_line(tmp_path: Path, capsys, data: str, value: str, message) -> None:
    argv = ["train", "--data", data, "--mlp", value, "--out", str(tmp_path / "x")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x").exists()
