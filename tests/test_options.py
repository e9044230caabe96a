"""One definition per option: a config field carries its help text, and the command line's
flags and help are made from the fields, nowhere else."""

import dataclasses

import pytest

from cnf.cli.app import build_parser
from cnf.model_config import ModelConfig
from cnf.options import help_of
from cnf.training import TrainConfig

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


def _fields() -> list[dataclasses.Field]:
    return [f for cls in (TrainConfig, ModelConfig) for f in dataclasses.fields(cls)
            if f.name not in ("extra", "model")]  # fmt: skip


def _train_actions() -> dict[str, object]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {s: a for a in sub.choices["train"]._actions for s in a.option_strings}


def test_every_option_has_its_help_beside_it() -> None:
    for f in _fields():
        assert len(help_of(f)) > 10, f.name


def test_the_flags_are_the_fields_and_their_help_is_the_fields() -> None:
    actions = _train_actions()
    flags = {}
    for f in _fields():
        flag = "--" + f.name.replace("_", "-")
        flags[flag] = f
        if isinstance(f.default, bool):
            flags["--no-" + flag[2:]] = f
    assert set(actions) - OWN == set(flags)  # no flag without a field, no field without a flag
    for flag, f in flags.items():
        assert actions[flag].help.replace("%%", "%").startswith(help_of(f)), flag


@pytest.mark.parametrize("cls", [TrainConfig, ModelConfig])
def test_a_config_rebuilt_from_its_dict_is_itself(cls) -> None:
    config = cls()
    assert cls.from_dict(config.to_dict()) == config


def test_the_estimator_names_a_setting_as_the_configs_do_or_in_its_table() -> None:
    import inspect

    from cnf.density import SKLEARN_NAMES, CNFDensity

    names = {f.name for f in _fields()}
    for param in inspect.signature(CNFDensity).parameters:
        if param in SKLEARN_NAMES:  # scikit-learn's spelling of a config's setting
            assert SKLEARN_NAMES[param] in names and param not in names, param
        else:  # the config's own name, or scikit-learn's own verbose
            assert param in names or param == "verbose", param
