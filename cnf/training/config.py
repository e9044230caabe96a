"""The training recipe: :class:`TrainConfig`, with the model's arguments as one field of it,
and the defaults per kind of data (:data:`PRESETS`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from cnf import options
from cnf.adaptation import Adaptation, StepAdapter
from cnf.data import DataSpec, dataset_kind
from cnf.data.tabular import TABLE_DEFAULTS
from cnf.model_config import ModelConfig
from cnf.options import help_of, listed, option
from cnf.solvers import ADAPTIVE
from cnf.training.idle import idle_options
from cnf.training.objectives import FlowMatching, MaximumLikelihood, Objective, Phases
from cnf.training.presets import BUDGET_PRESETS, FM_ONLY, PRESETS, STEPS, method_of, recipe

SCHEDULES = ("cosine", "constant")
OBJECTIVES = ("mle", "fm")
EVALUATIONS = 20  # validation NLLs in a run of --eval-every 0
# the configs a TrainConfig holds, by field
NESTED = {"mle": MaximumLikelihood, "fm": FlowMatching, "adaptation": Adaptation,
          "model": ModelConfig}  # fmt: skip


def _get(cfg: TrainConfig, name: str) -> Any:
    """An option of ``cfg`` by its flat name."""
    value = cfg
    for step in options.leaves(TrainConfig)[name].path:
        value = getattr(value, step)
    return value


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


@dataclass
class TrainConfig:
    """Everything that defines a run: the data, the optimizer and schedule, the objective's
    weights, the step adaptation, evaluation, and the model
    (:class:`~cnf.model_config.ModelConfig`).
    Saved as ``config.json`` and (model apart from the rest) inside every checkpoint.

    The field defaults are the recipe for the 2-D toys (bench/bench_toy.py): rk4 with the
    adapted step, lr 5e-3 on a cosine schedule, and RNODE's kinetic and Jacobian penalties at
    0.01, which keep the field smooth, so the adapted step stays large (few NFE) and the sharp
    densities (checkerboard) train to a lower KL in less time than without them. Other kinds of
    data start from :data:`PRESETS` (:meth:`for_data`, which also refuses a given option that
    would have no effect).
    """

    data: str = option(
        "8gaussians",
        "dataset name (see `cnf datasets`), a .csv/.npy/.npz file or a MAF data directory",
    )
    iters: int = option(3000, "training iterations (optimizer steps)")
    batch_size: int = option(512, "samples per iteration")
    lr: float = option(5e-3, "AdamW learning rate, the peak of the schedule")
    weight_decay: float = option(0.0, "AdamW's decoupled weight decay")
    ema: float = option(
        0.0,
        "decay of an exponential moving average of the weights (e.g. 0.999), which validation, "
        "the checkpoints and the report use (0: off)",
    )
    schedule: str = option(
        "cosine",
        f"learning-rate schedule: {listed(SCHEDULES)} (cosine: down to 1% of --lr)",
    )
    grad_clip: float = option(5.0, "clip the gradient's norm to this (0: off)")
    eval_every: int = option(
        250,
        "iterations between validation NLLs (and checkpoints) (0: automatic, 20 a run; with "
        "--budget, as many as a twentieth of the budget pays for, at most 20)",
    )
    log_every: int = option(
        0,
        "iterations a row of log.jsonl covers: their seconds summed, their losses, NFE and "
        "gradient norms averaged; an evaluation, a phase's end and the last iteration end a row "
        "early (0: automatic, iterations // 1000, at least 1: about 1,000 rows a run)",
    )
    seed: int = option(
        0,
        "seed of the initialization, the data split, batches and probes (0..2**63-1)",
    )
    device: str = option("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    threads: int = option(
        0,
        "CPU threads (0: automatic: 1 for models of up to 16 dimensions, "
        "else as many as the machine has idle cores)",
    )
    tf32: bool = option(
        True,
        "allow TF32 matmuls and convolutions on CUDA (--no-tf32: full float32)",
    )
    # the objective (cnf.training.objectives): "mle", maximum likelihood with RNODE's penalties,
    # or "fm", flow matching (then finetune_iters iterations of maximum likelihood, if any)
    objective: str = option(
        "mle",
        "mle: maximum likelihood through the solver; fm: flow matching (simulation-free "
        "regression of the field; see --coupling, --finetune-iters). Images default to fm on one "
        "U-Net field; mle trains FFJORD's multiscale model",
    )
    finetune_iters: int = option(
        0,
        "flow matching: then this many iterations of maximum likelihood (with the adapted step), "
        "after --iters",
    )
    finetune_lr: float | None = option(
        None,
        "flow matching: the peak learning rate of the --finetune-iters phase, whose cosine starts"
        " again (default: --lr)",
    )
    # a training-time budget in seconds, planned into iters (and finetune_iters, which get
    # finetune_share of it) before training (cnf.training.budget); 0: iters as given
    budget: float = option(
        0.0,
        "CPU seconds the whole command may take, on this machine: times a few iterations and a "
        "validation, prices the report and figures, then sets --iters (and --finetune-iters, "
        "and --eval-every if 0); unless --objective is given, trains the recipe measured best "
        "for a budget (flow matching, then maximum likelihood for the toys) (0: off)",
    )
    finetune_share: float = option(
        0.5,
        "with --budget and --objective fm: the share of the budget for the maximum-likelihood "
        "phase",
    )
    # evaluation: validation every eval_every iterations, the report at the end
    test_size: int = option(
        20_000,
        "test samples in the final report (a table's test split has its own size)",
    )
    validity_size: int = option(2000, "test samples in the final solver-validity check")
    validity_tol: float = option(
        1e-8,
        "tolerance of the validity check's reference solver (dopri5, float64)",
    )
    report_se: float = option(
        0.01,
        "the final report draws test samples (up to --test-size) until the test NLL's standard "
        "error is this many nats (0: every one)",
    )
    val_tol: float = option(
        1e-5,
        "validation NLLs solve at this tolerance (the evaluation solver's method; its own "
        "tolerance if tighter): they only rank checkpoints, the report is exact (0: the "
        "evaluation solver as it is)",
    )
    patience: int = option(
        0,
        "stop after this many validation NLLs without a better one (0: off)",
    )
    # data options: tables (cnf.data.tabular), files of image sets (cnf.data.images)
    columns: str = option(
        "",
        "tables: the columns to model, a comma list of names or 0-based indices",
    )
    val_fraction: float = option(
        0.1,
        "tables: fraction of rows held out for validation (seeded split)",
    )
    test_fraction: float = option(
        0.1,
        "tables: fraction of rows held out for testing (seeded split)",
    )
    dequantize: bool = option(False, "tables: add U[0,1) noise to integer-valued columns")
    target: str = option(
        "",
        "tables: model these columns (names or 0-based indices, comma-separated) given the "
        "others, p(target | rest)",
    )
    drop_nan: bool = option(False, "tables: drop rows with NaN/inf instead of refusing them")
    condition: str = option(
        "",
        "'label' models each point or image given its class label, p(x | label) (toys with "
        "labels, image sets); tables: these columns (names or 0-based indices) are the "
        "condition, p(rest | COLS)",
    )
    data_dir: str | None = option(
        None,
        "directory of the dataset's files (mnist, fashion-mnist, cifar10)",
    )
    extra: dict[str, Any] = field(default_factory=dict)  # further dataset options
    mle: MaximumLikelihood = options.nested(
        MaximumLikelihood,
        "maximum likelihood",
        {"kinetic": "kinetic", "jacobian": "jacobian"},
        default=lambda: MaximumLikelihood(kinetic=0.01, jacobian=0.01),
    )
    fm: FlowMatching = options.nested(
        FlowMatching,
        "flow matching",
        {n: n for n in ("coupling", "sigma_min", "time_sampling", "autocast", "cond_dropout")},
    )
    # keep the trained model an ODE flow (Ott et al. 2021)
    adaptation: Adaptation = options.nested(
        Adaptation,
        "step adaptation",
        {"on": ("adapt", help_of(_field(Adaptation, "on"))), "every": "adapt_every",
         "size": "adapt_size", "threshold": "adapt_threshold", "max_steps": "max_steps"},
    )  # fmt: skip
    model: ModelConfig = options.nested(ModelConfig, "model", None)

    def __post_init__(self) -> None:
        for name, kind in NESTED.items():
            if isinstance(getattr(self, name), dict):  # a config's plain data, as saved
                setattr(self, name, options.from_dict(kind, getattr(self, name)))
        options.finite_floats(self)
        options.booleans(self)
        for name in ("iters", "batch_size", "test_size", "validity_size"):
            options.integer(name, getattr(self, name), 1, "a positive integer")
        for name in ("threads", "patience", "log_every", "eval_every"):
            options.integer(name, getattr(self, name), 0, "an integer >= 0 (0: automatic/off)")
        if not options.is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise options.ConfigError(
                "seed", f"must be an integer in 0..2**63-1, got {self.seed!r}"
            )
        options.number("lr", self.lr)
        options.number("validity_tol", self.validity_tol)
        options.number("report_se", self.report_se, strict=False)
        options.number("val_tol", self.val_tol, strict=False)
        for name in ("weight_decay", "grad_clip"):
            options.number(name, getattr(self, name), strict=False)
        for name in ("val_fraction", "test_fraction"):
            options.within(name, getattr(self, name), 0, 1)
        options.within("ema", self.ema, 0, 1, closed=True)  # 0: off
        options.choice("schedule", self.schedule, SCHEDULES)
        self._check_objective()
        if "trust_pickle" in self.extra:
            raise options.ConfigError(
                "extra",
                "cannot hold trust_pickle: trust is given by the "
                "caller (--trust-pickle), never by a config or checkpoint",
            )

    def _check_objective(self) -> None:
        options.choice("objective", self.objective, OBJECTIVES)
        options.integer("finetune_iters", self.finetune_iters, 0, "an integer >= 0")
        options.number("budget", self.budget, strict=False)
        options.within("finetune_share", self.finetune_share, 0, 1, closed=True)
        if self.objective == "fm" and self.model.learn_T:
            raise options.ConfigError(
                "learn_T", "has no meaning for flow matching (the path fixes the time): drop it"
            )
        if self.finetune_lr is not None:
            options.number("finetune_lr", self.finetune_lr)
        changed = [k for k, v in FM_ONLY.items() if _get(self, k) != v]
        if self.objective == "mle" and changed:
            raise options.ConfigError(
                changed[0], "is an option of flow matching: add --objective fm (--finetune-iters "
                "N then fine-tunes by maximum likelihood for N more iterations)"
            )  # fmt: skip

    def restart(self) -> tuple[int, float] | None:
        """Where the schedule starts again: after flow matching, at ``finetune_lr / lr``."""
        if not self.finetune_iters:
            return None
        return (self.iters, (self.finetune_lr or self.lr) / self.lr)

    @property
    def evaluation_interval(self) -> int:
        """Iterations between validation NLLs: ``eval_every``, or, where that is 0, a
        twentieth of the run."""
        return self.eval_every or max(1, math.ceil(self.total_iters / EVALUATIONS))

    @property
    def total_iters(self) -> int:
        """The run's last iteration: ``iters``, plus ``finetune_iters`` after flow matching."""
        return self.iters + self.finetune_iters

    @property
    def budget_share(self) -> float:
        """The share of ``budget`` planned for maximum likelihood after flow matching (0:
        none; :func:`cnf.training.budget.plan`)."""
        return self.finetune_share if self.budget and self.objective == "fm" else 0.0

    # --- building and saving ------------------------------------------------------------

    @classmethod
    def for_data(cls, data: str, **given: Any) -> TrainConfig:
        """The config for ``data``: the dataset kind's :data:`PRESETS` over the field defaults
        (which suit the 2-D toys), and ``given`` over both; model fields (``hidden``,
        ``method``, ...) may be given flat. ``cnf train`` builds its config so. Given options
        win: a preset's option that does not apply to them is dropped, and a given option that
        would have no effect in the recipe is refused with the reason
        (:func:`cnf.training.idle.idle_options`)."""
        flat = recipe(data, given)
        given = {k: v for k, v in given.items() if v is not None}  # None: the default
        _check_steps(flat, given)  # before the solvers refuse them with less to say
        model = ModelConfig.for_kind(dataset_kind(data))
        cfg = options.apply(cls(data=data, model=model), flat)
        idle = idle_options(cfg)
        for name in given:
            if name in idle:
                raise options.ConfigError(name, idle[name])
        return cfg

    @classmethod
    def plain(cls, data: str = "8gaussians", **given: Any) -> TrainConfig:
        """The field defaults for ``data`` (the model's parts for its kind: a table's or an
        image flow's options), with ``given`` options by flat name; no presets, and no check
        that each has an effect (:meth:`for_data` is the recipe ``cnf train`` uses)."""
        model = ModelConfig.for_kind(dataset_kind(data))
        return options.apply(cls(data=data, model=model), given)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return options.from_dict(cls, values)

    def to_dict(self) -> dict[str, Any]:
        return options.to_dict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with options changed by their flat names (``lr``, ``kinetic``, ``eval_atol``:
        :func:`cnf.options.leaves`)."""
        return options.apply(self, changes)

    def flat_options(self) -> dict[str, Any]:
        """Every option by its flat name (the flags of ``cnf train``)."""
        return options.flatten(self)

    # --- what the recipe makes ----------------------------------------------------------

    def dataset_spec(self) -> DataSpec:
        """How to open the run's data: its name, the seed and the options that differ from
        their defaults."""
        opts = {k: getattr(self, k) for k, v in TABLE_DEFAULTS.items() if getattr(self, k) != v}
        if self.data_dir:
            opts["data_dir"] = self.data_dir
        if self.condition:
            opts["condition"] = self.condition
        return DataSpec(self.data, self.seed, {**self.extra, **opts})

    def make_objective(self) -> Objective:
        """The objective the recipe names (flow matching then maximum likelihood with
        ``finetune_iters``)."""
        if self.objective == "mle":
            return self.mle
        if not self.finetune_iters:
            return self.fm
        return Phases(((self.fm, self.iters), (self.mle, self.total_iters)))

    def adapter(self, dim: int) -> StepAdapter | None:
        """Ott et al.'s adapter for ``dim``-dimensional data, or ``None`` with ``adapt`` off."""
        return self.adaptation.adapter(dim, self.model.T)


def _check_steps(flat: dict[str, Any], given: dict[str, Any]) -> None:
    """Refuse a step given for an adaptive method."""
    for name, method_field in STEPS.items():
        method = method_of(method_field, flat)
        if name in given and method in ADAPTIVE:
            raise options.ConfigError(
                name, f"is for fixed-step methods, and {method_field} {method!r} chooses its own "
                f"steps from its tolerances: drop it, or choose a fixed-step {method_field} such "
                "as rk4"
            )  # fmt: skip


__all__ = ["BUDGET_PRESETS", "PRESETS", "SCHEDULES", "TrainConfig"]
