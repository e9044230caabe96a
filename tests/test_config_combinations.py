"""Options that have no effect in the combination given are refused, saying why; flags you give
win over the presets (``TrainConfig.for_data``, which ``cnf train`` builds its config with)."""

from pathlib import Path

import pytest

from cnf.cli import main
from cnf.cli.app import _as_flags
from cnf.options import ConfigError
from cnf.training import TrainConfig
from cnf.training.objectives import MaximumLikelihood
from cnf.training.resume import resumed_config

ML_PHASE = "maximum-likelihood phase after flow matching"

# (data, what the user gives, the option refused, words of the reason)
REFUSED = [
    ("8gaussians", dict(objective="fm", finetune_lr=1e-3), "finetune_lr", "give finetune_iters"),
    ("8gaussians", dict(budget=30, finetune_share=0.0, finetune_lr=1e-3), "finetune_lr",
     "finetune_share above 0"),
    ("digits", dict(budget=30, finetune_lr=1e-3), "finetune_lr", "flow matching alone"),
    ("iris", dict(finetune_iters=0, finetune_lr=1e-3), "finetune_lr", "flow matching alone"),
    ("8gaussians", dict(objective="fm", kinetic=0.1), "kinetic", "penalty of maximum-likelihood"),
    ("8gaussians", dict(objective="fm", jacobian=0.0), "jacobian", ML_PHASE),
    ("digits", dict(jacobian=0.1), "jacobian", "flow matching alone"),
    ("8gaussians", dict(objective="fm", adjoint=True), "adjoint", "backpropagates"),
    ("8gaussians", dict(objective="fm", adapt_every=10), "adapt_every", "step adaptation"),
    ("8gaussians", dict(finetune_share=0.3), "finetune_share", "without a budget"),
    ("8gaussians", dict(objective="fm", finetune_iters=5, finetune_share=0.3), "finetune_share",
     "without a budget"),
    ("8gaussians", dict(budget=30, objective="mle", finetune_share=0.3), "finetune_share",
     "under objective mle"),
    ("8gaussians", dict(objective="fm", autocast="bf16", dtype="float64"), "autocast",
     "only float32"),
    ("8gaussians", dict(method="rk4", step_size=0.1, atol=1e-3), "atol", "takes fixed steps"),
    ("8gaussians", dict(method="euler", step_size=0.1, rtol=1e-3), "rtol", "takes fixed steps"),
    ("digits", dict(objective="mle", atol=1e-4), "atol", "step_size 0.5"),  # the preset's step
    ("8gaussians", dict(method="dopri5", step_size=0.1), "step_size", "is for fixed-step methods"),
    ("8gaussians", dict(eval_step_size=0.1), "eval_step_size", "'dopri5' chooses its own steps"),
    ("8gaussians", dict(eval_method="rk4", eval_step_size=0.1, eval_atol=1e-6), "eval_atol",
     "takes fixed steps of eval_step_size 0.1"),
    ("digits", dict(eval_rtol=1e-6), "eval_rtol", "eval_method 'rk4'"),  # the preset's rk4
    ("8gaussians", dict(adapt=False, max_steps=100), "max_steps", "adapt off"),
    ("8gaussians", dict(adapt=False, adapt_threshold=0.01), "adapt_threshold", "adapt off"),
    ("8gaussians", dict(iters=7, budget=30), "iters", "plans the number of iterations"),
    ("iris", dict(budget=30, finetune_iters=100), "finetune_iters", "give one or the other"),
]  # fmt: skip
IDS = [f"{data}-{'-'.join(given)}" for data, given, _, _ in REFUSED]


def _flags(given: dict) -> list[str]:
    """``cnf train`` flags for config values: ``adapt=False`` -> ``--no-adapt``."""
    flags = []
    for name, value in given.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


@pytest.mark.parametrize(("data", "given", "field", "reason"), REFUSED, ids=IDS)
def test_an_option_without_effect_is_refused_in_python(data, given, field, reason) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig.for_data(data, **given)
    assert info.value.field == field
    assert reason in info.value.problem and str(info.value) == f"{field} {info.value.problem}"
    assert "--" not in info.value.problem  # a Python caller typed no flags


@pytest.mark.parametrize(("data", "given", "field", "reason"), REFUSED, ids=IDS)
def test_an_option_without_effect_is_refused_on_the_command_line(
    data, given, field, reason, tmp_path: Path, capsys
) -> None:
    argv = ["train", "--data", data, "--out", str(tmp_path / "run"), "--no-progress"]
    assert main([*argv, *_flags(given)]) == 1
    lines = capsys.readouterr().err.splitlines()
    flag = "--" + field.replace("_", "-")
    assert len(lines) == 1 and lines[0].startswith(f"cnf train: error: {flag} ")
    assert _as_flags(reason) in lines[0]  # the fields it mentions, as the flags of the CLI
    assert list(tmp_path.iterdir()) == []  # refused before any work


@pytest.mark.parametrize(
    ("data", "given"),
    [
        ("8gaussians", dict(objective="fm", finetune_iters=5, finetune_lr=1e-3)),
        ("8gaussians", dict(objective="fm", finetune_iters=5, kinetic=0.1, adjoint=True)),
        ("8gaussians", dict(objective="fm", adapt_every=10, finetune_iters=5)),
        ("8gaussians", dict(objective="fm", autocast="bf16")),
        ("8gaussians", dict(budget=30)),  # the toys' budget recipe: fm, then mle at finetune_lr
        ("8gaussians", dict(budget=30, finetune_lr=2e-3, kinetic=0.1, finetune_share=0.3)),
        ("8gaussians", dict(budget=30, objective="fm", finetune_lr=2e-3)),  # share 0.5 default
        ("8gaussians", dict(budget=30, objective="mle", kinetic=0.1)),
        ("8gaussians", dict(objective="fm", finetune_lr=None)),  # None: the default
        ("8gaussians", dict(method="rk4", atol=1e-3, rtol=1e-3)),  # Hairer's start reads them
        ("8gaussians", dict(method="implicit_adams", step_size=0.1, atol=1e-3)),  # its corrector
        ("8gaussians", dict(method="dopri5", atol=1e-3, eval_atol=1e-6)),
        ("8gaussians", dict(eval_method="rk4", eval_step_size=0.1)),
        ("8gaussians", dict(adapt=False, method="euler", step_size=0.5)),
        ("8gaussians", dict(kinetic=0.1, jacobian=0.0, adjoint=True, max_steps=100)),
        ("iris", {}),  # the tabular preset: fm, then mle at finetune_lr
        ("iris", dict(budget=30)),
        ("iris", dict(objective="mle")),  # the preset's flow-matching options drop out
        ("digits", {}),
        ("digits", dict(objective="mle")),
        ("digits", dict(budget=30)),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(v) or "preset",
)
def test_the_neighbours_that_have_an_effect_still_construct(data: str, given: dict) -> None:
    cfg = TrainConfig.for_data(data, **given)
    assert all(cfg.flat_options()[k] == v
               for k, v in given.items() if v is not None)  # fmt: skip


def test_the_budget_recipe_keeps_its_presets_and_plans_the_fine_tuning() -> None:
    toy = TrainConfig.for_data("8gaussians", budget=30)
    assert (toy.objective, toy.finetune_lr, toy.budget_share) == ("fm", 1e-3, 0.5)
    assert TrainConfig.for_data("digits", budget=30).budget_share == 0.0  # fm alone
    assert TrainConfig.for_data("8gaussians", budget=30, objective="mle").budget_share == 0.0
    assert TrainConfig.for_data("8gaussians", objective="fm").budget_share == 0.0  # no budget


def test_a_step_the_preset_set_gives_way_to_an_adaptive_method_given() -> None:
    # README's FFJORD configuration: --method dopri5 over the image preset's rk4 step of 0.5
    ffjord = TrainConfig.for_data("digits", objective="mle", method="dopri5", atol=1e-5,
                                  rtol=1e-5, eval_atol=1e-5, eval_rtol=1e-5)  # fmt: skip
    assert (ffjord.model.solver.method, ffjord.model.solver.step_size) == ("dopri5", None)
    fm = TrainConfig.for_data("digits", eval_method="dopri5", eval_atol=1e-6)
    check = fm.model.eval_solver
    assert (check.method, check.step_size, check.atol) == (
        "dopri5", None, 1e-6)  # fmt: skip


def test_defaults_and_saved_configs_are_never_refused() -> None:
    # the refusal is of options given: the defaults (kinetic 0.01, the toys' recipe) are not
    assert TrainConfig(objective="fm").mle.kinetic == 0.01
    mle = MaximumLikelihood(kinetic=0.5)
    assert TrainConfig(objective="fm", mle=mle).mle.kinetic == 0.5  # Python's own records
    # a budget run's saved config holds its budget and the iterations planned for it
    planned = TrainConfig.for_data("8gaussians", budget=30).replace(iters=310, finetune_iters=90)
    assert TrainConfig.from_dict(planned.to_dict()) == planned


def test_a_budget_run_resumes_with_more_iterations() -> None:
    planned = TrainConfig.for_data("8gaussians", budget=30).replace(iters=310, finetune_iters=90)
    saved = planned.to_dict()
    ckpt = {"config": {k: v for k, v in saved.items() if k != "model"},
            "model_args": saved["model"], "iteration": 350}  # fmt: skip
    resumed = resumed_config(ckpt, {"finetune_iters": 200})
    assert (resumed.budget, resumed.iters, resumed.total_iters) == (30, 310, 510)
    mle = TrainConfig.for_data("8gaussians", budget=30, objective="mle").replace(iters=400)
    saved = mle.to_dict()
    ckpt = {"config": {k: v for k, v in saved.items() if k != "model"},
            "model_args": saved["model"], "iteration": 400}  # fmt: skip
    assert resumed_config(ckpt, {"iters": 600}).iters == 600
