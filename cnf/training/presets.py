"""The defaults per kind of data (:data:`PRESETS`), the recipes a budget trains
(:data:`BUDGET_PRESETS`), and :func:`recipe`, which lays the options a user gives over them."""

from __future__ import annotations

from typing import Any

from cnf.data import dataset_kind
from cnf.model_config import ModelConfig
from cnf.options import leaves
from cnf.solvers import ADAPTIVE

# the options of flow matching, at their defaults (a maximum-likelihood run refuses others)
FM_ONLY = {"coupling": "independent", "sigma_min": 0.0, "time_sampling": "uniform",
           "autocast": "off", "cond_dropout": 0.0, "finetune_iters": 0,
           "finetune_lr": None}  # fmt: skip
# the step of a fixed-step method, by the field that names the method
STEPS = {"step_size": "method", "eval_step_size": "eval_method"}


def recipe(data: str, given: dict[str, Any]) -> dict[str, Any]:
    """The flat options of ``data``'s presets (and budget presets) under ``given``, less the
    presets' options that do not apply to what is given."""
    kind = dataset_kind(data)
    if kind == "image" and given.get("objective", "fm") == "fm":  # the single-scale U-Net
        kind = "image-fm"  # model (the default); --objective mle: the multiscale one
    budget = BUDGET_PRESETS.get(kind, {}) if given.get("budget") else {}
    if "objective" in given:  # a recipe the user chose: the budget only plans its length
        budget = {}
    quick = {} if given.keys() & LENGTHS else QUICK_PRESETS.get(kind, {})
    flat = {**PRESETS.get(kind, {}), **budget, **quick, **given}
    return {k: v for k, v in flat.items() if k in given or not _overruled(k, flat)}


# options that say how a run is trained or for how long: given any, the quick recipe steps aside
LENGTHS = frozenset({"objective", "iters", "finetune_iters", "budget"})


def _overruled(name: str, flat: dict[str, Any]) -> bool:
    """Whether a preset's ``name`` does not apply to the options ``flat``: its flow-matching
    options under maximum likelihood, its U-Net's under another field, its step under an
    adaptive method."""
    if name in FM_ONLY:
        return flat.get("objective") == "mle"
    if name.startswith("unet_"):  # the U-Net's options, when the user picks another field
        return flat.get("field", "unet") != "unet"
    return name in STEPS and method_of(STEPS[name], flat) in ADAPTIVE


def method_of(field_name: str, flat: dict[str, Any]) -> Any:
    return flat.get(field_name, leaves(ModelConfig)[field_name].default)


# Defaults per kind of data, over the field defaults (tuned on the 2-D toys); flat, model fields
# included.
PRESETS: dict[str, dict[str, Any]] = {
    # --objective mle on images: FFJORD's multiscale model, small conv fields that train on a
    # CPU (digits); pass FFJORD's flags for 28x28 on a GPU
    "image": dict(
        batch_size=64,
        lr=3e-3,
        hidden=(32, 32),
        blocks=1,
        activation="tanh",
        method="rk4",
        step_size=0.5,
        eval_atol=1e-5,
        eval_rtol=1e-5,
        eval_every=500,
        validity_size=64,
        kinetic=0.0,
        jacobian=0.0,
    ),
    # flow matching on whole images: one block with a U-Net field in the logit space, rk4 for
    # the likelihood (the adapted step, from the largest valid one if a fine-tuning follows).
    # Logit-normal times and dropout 0.1, from python bench/bench_image_recipes.py on digits
    # (the README's table): logit-normal times 1.763 test bits/dim against 1.798 for uniform ones
    # (1,500 iterations), dropout 1.733 against 1.740 (2,900), with a train-test gap of 0.12
    # instead of 0.18; width 64 (3 times the cost), weight decay, sigma_min, no logit, a higher
    # learning rate did no better. --autocast bf16 trains as well and, on a CPU with bfloat16
    # instructions, 1.3 to 1.4 times as fast (bench/bench_fm_speed.py); not the default, measured
    # on one CPU only. The time scales and shifts each block's normalized features
    # (unet_scale_shift, ADM's conditioning): 1.722 and 1.718 test bits/dim on two seeds at 2,900
    # iterations against 1.738 and 1.735 for the shift before the norm (the recipes above were
    # measured with that one, --no-unet-scale-shift)
    "image-fm": dict(
        objective="fm",
        time_sampling="logit-normal",
        scales=1,
        blocks=1,
        field="unet",
        unet_width=32,
        unet_resolutions=2,
        unet_dropout=0.1,
        unet_scale_shift=True,
        finetune_share=0.0,  # --budget: flow matching only (bench_images: fm+mle did worse)
        batch_size=128,
        lr=2e-3,
        method="rk4",
        eval_method="rk4",
        eval_step_size=1 / 16,
        eval_every=1000,
        validity_size=16,
        adapt_size=16,  # a fine-tuning's checks: a dopri5 solve of 128 images took ~55 CPU s
        validity_tol=1e-5,
        kinetic=0.0,
        jacobian=0.0,
    ),
    # small tables (a few hundred rows): whitening makes the untrained flow the Gaussian fit; a
    # field with strong weight decay, a moving average of its weights and early stopping keeps it
    # from memorizing the rows. Flow matching for 1500 iterations, then maximum likelihood from
    # that field until the validation NLL stops improving. Chosen among about 40 recipes on
    # validation NLL over seeds 10 to 15 of wine, iris, breast_cancer and diabetes, splits that
    # bench/bench_tabular.py does not report (its seeds are 0 to 2)
    "tabular": dict(
        objective="fm",
        iters=1500,
        finetune_iters=400,
        finetune_lr=2e-3,
        batch_size=256,
        lr=5e-3,
        weight_decay=0.3,
        ema=0.99,
        hidden=(128, 128),
        preprocess="whiten",
        log_columns="auto",
        kinetic=0.0,
        jacobian=0.0,
        eval_every=50,
        patience=4,
        adapt_size=64,  # the step adapter's checks: 64 rows every 100 iterations
        adapt_every=100,
        eval_atol=1e-6,
        eval_rtol=1e-6,
        test_size=1_000_000,
    ),
}

# What --budget trains, per kind of data, unless --objective is given: the recipes that gave the
# lowest KL (toys) or test NLL (tables) for their time in bench/bench_objectives.py. Images
# already default to flow matching (PRESETS["image-fm"]), which --budget plans as it is.
BUDGET_PRESETS: dict[str, dict[str, Any]] = {
    # SiLU and lr 5e-3 for flow matching: KL after 30 CPU s of it (one seed, bench
    # experiments of 2026-12-06) 0.021 against tanh and 2e-3's 0.027 on 8gaussians, 0.285 against
    # 0.314 on checkerboard, 0.0013 against 0.0126 on 8gaussians-given-component. The plain MLP
    # with the time concatenated (mlp="concat", 0.58 times the ConcatSquash MLP's CPU an
    # iteration) against ConcatSquash, at equal training CPU (python bench/bench_objectives.py
    # --fields concatsquash concat): this recipe's KL after 30 and 120 s, 0.013 and 0.006 against
    # 0.023 and 0.006 on 8gaussians, 0.155 and 0.057 against 0.277 and 0.106 on checkerboard
    "toy": dict(
        objective="fm",
        mlp="concat",
        finetune_share=0.5,
        lr=5e-3,
        activation="silu",
        finetune_lr=1e-3,
        eval_every=0,
    ),
    "tabular": dict(finetune_share=0.3),
}

# What a toy trains when no option says how or for how long (``cnf train --data 8gaussians``):
# the budget recipe at fixed lengths, so that the same command trains the same flow on any
# machine. QUICK_ITERS flow-matching iterations, then QUICK_FINETUNE of maximum likelihood:
# the whole command 88.7 CPU s on one core with another job on the second, KL 0.008 on
# 8gaussians (python bench/bench_speed.py, bench/results/bench_speed.json); in
# training alone, 30,000 then 200 reached 0.0104, 30,000 of flow matching alone 0.0083
QUICK_ITERS, QUICK_FINETUNE = 24_000, 600
QUICK_PRESETS: dict[str, dict[str, Any]] = {
    "toy": {**BUDGET_PRESETS["toy"], "iters": QUICK_ITERS, "finetune_iters": QUICK_FINETUNE},
}
