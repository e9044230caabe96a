"""One definition per option: a config field carries its help text, configs hold the configs of
their parts (the solvers, the image field, the objectives, the adaptation), and the command
line's flags and help, the presets' names and ``replace`` all come from those definitions."""

import dataclasses

import pytest

from cnf import options
from cnf.adaptation import Adaptation
from cnf.cli.app import build_parser
from cnf.field_configs import ConvConfig, UNetConfig
from cnf.model_config import ImageModel, ModelConfig, TableModel
from cnf.options import ConfigError, leaves
from cnf.solvers import Solver
from cnf.training import TrainConfig
from cnf.training.objectives import FlowMatching, MaximumLikelihood

OWN = {
    "--out",
    "--resume",
    "--force",
    "--no-progress",
    "--json",
    "--tensorboard",
    "--trust-pickle",
    "--help",
    "-h",
}  # fmt: skip  (cnf train's flags that are no option)


def _train_actions() -> dict[str, object]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {s: a for a in sub.choices["train"]._actions for s in a.option_strings}


def test_every_option_has_its_help_beside_it() -> None:
    for leaf in leaves(TrainConfig).values():
        assert len(leaf.help) > 10, leaf.name


def test_the_flags_are_the_options_and_their_help_is_the_options() -> None:
    actions = _train_actions()
    flags = {}
    for leaf in leaves(TrainConfig).values():
        flag = "--" + leaf.name.replace("_", "-")
        flags[flag] = leaf
        if isinstance(leaf.default, bool):
            flags["--no-" + flag[2:]] = leaf
    assert set(actions) - OWN == set(flags)  # no flag without an option, nor the other way
    for flag, leaf in flags.items():
        assert actions[flag].help.replace("%%", "%").startswith(leaf.help), flag


def test_every_field_of_every_config_is_an_option_or_says_why_not() -> None:
    """A setting is an option (a leaf with a flat name) or, for the solvers' and objectives'
    fine controls, reachable from Python alone; no field is dropped without a decision."""
    python_only = {"seminorm", "options", "adjoint_method", "adjoint_atol", "adjoint_rtol",
                   "ot_chunk", "extra"}  # fmt: skip
    paths = {leaf.path for leaf in leaves(TrainConfig).values()}
    for cls, at in [(TrainConfig, ()), (ModelConfig, ("model",)), (Solver, ("model", "solver")),
                    (MaximumLikelihood, ("mle",)), (FlowMatching, ("fm",)),
                    (Adaptation, ("adaptation",)), (TableModel, ("model", "table")),
                    (ImageModel, ("model", "image")), (UNetConfig, ("model", "image", "field")),
                    (ConvConfig, ("model", "image", "field"))]:  # fmt: skip
        for f in dataclasses.fields(cls):
            nested = "nested" in f.metadata
            kind = (*at, f.name, "kind") in paths
            assert nested or kind or (*at, f.name) in paths or f.name in python_only, f.name


def test_the_defaults_shown_are_those_of_the_config_that_holds_them() -> None:
    table = leaves(TrainConfig)
    assert table["eval_atol"].default == 1e-7 and table["atol"].default == 1e-5
    assert table["kinetic"].default == 0.01  # TrainConfig's, not MaximumLikelihood's own 0
    assert table["unet_width"].default == 32 and table["field"].default == "conv"
    assert table["method"].path == ("model", "solver", "method")


@pytest.mark.parametrize("cls", [TrainConfig, ModelConfig])
def test_a_config_rebuilt_from_its_dict_is_itself(cls) -> None:
    config = cls()
    assert cls.from_dict(config.to_dict()) == config


def test_an_image_config_with_its_unet_round_trips_through_its_dict() -> None:
    cfg = TrainConfig.for_data("digits", unet_width=8, eval_max_nfe=99)
    assert isinstance(cfg.model.image.field, UNetConfig) and cfg.model.image.field.width == 8
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["model"]["image"]["field"]["kind"] == "unet"


def test_replace_reaches_the_nested_configs_by_flat_name() -> None:
    cfg = TrainConfig().replace(kinetic=0.5, eval_atol=1e-4, adapt_every=7, coupling="ot",
                                objective="fm")  # fmt: skip
    assert cfg.mle.kinetic == 0.5 and cfg.model.eval_solver.atol == 1e-4
    assert cfg.adaptation.every == 7 and cfg.fm.coupling == "ot"
    assert options.flatten(cfg)["eval_atol"] == 1e-4


@pytest.mark.parametrize(
    ("data", "given", "message"),
    [
        ("moons", dict(unet_width=8), "unet_width is for images"),
        ("moons", dict(preprocess="whiten"), "preprocess is for tables"),
        ("digits", dict(objective="mle", unet_width=8), "unet_width is for field unet, and field "
         "is conv"),
        ("digits", dict(conv_layer="concat"), "conv_layer is for field conv, and field is unet"),
        ("moons", dict(eval_atol=-1.0), "eval_atol must be a positive finite number"),
        ("moons", dict(eval_method="rk4"), "eval_step_size is needed by the fixed-step"),
        ("moons", dict(adapt_threshold=-1.0), "adapt_threshold must be a number >= 0"),
        ("digits", dict(unet_dropout=1.0), "unet_dropout must be in [0, 1)"),
        ("moons", dict(kinetic=float("nan")), "kinetic must be a finite number"),
    ],
)  # fmt: skip
def test_a_refused_option_is_named_by_its_flat_name(data, given, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        TrainConfig.for_data(data, **given)


def test_a_fixed_step_solver_without_a_step_refuses_to_solve_and_says_how() -> None:
    import torch

    solver = Solver("rk4")  # a config may leave the step to the trainer (Hairer's step)
    assert solver.describe() == "rk4(h=unset)"
    with pytest.raises(ValueError, match="give it a step_size"):
        solver.solve(lambda t, y: (-y[0],), (torch.ones(1),), torch.tensor([0.0, 1.0]))


def test_the_estimator_names_a_setting_as_the_configs_do_or_in_its_table() -> None:
    import inspect

    from cnf.density import SKLEARN_NAMES, CNFDensity

    names = set(leaves(TrainConfig))
    for param in inspect.signature(CNFDensity).parameters:
        if param in SKLEARN_NAMES:  # scikit-learn's spelling of a config's setting
            assert SKLEARN_NAMES[param] in names and param not in names, param
        else:  # the config's own name, or scikit-learn's own verbose
            assert param in names or param == "verbose", param
