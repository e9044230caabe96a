"""The model's own arguments, apart from any training recipe: :class:`ModelConfig` and the one
function that builds a flow from it and a dataset's description.

A checkpoint stores ``ModelConfig.to_dict()`` as its ``model_args`` (as nanoGPT stores its
model's arguments), so rebuilding a trained model (:func:`cnf.runs.load_run`) needs neither the
trainer nor the recipe it was trained with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cnf import options
from cnf.conv_fields import CONV_LAYERS
from cnf.field_configs import FIELD_CONFIGS, ConvConfig, FieldConfig, UNetConfig, as_field_config
from cnf.fields import ACTIVATIONS, MLPS
from cnf.flow import CNF, Flow
from cnf.multiscale import MultiscaleCNF
from cnf.options import help_of, listed, option
from cnf.solvers import METHODS, Solver
from cnf.table_flow import LOG_COLUMNS, PREPROCESS, TabularCNF
from cnf.trace import NOISES, TRACES

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


@dataclass
class TableModel:
    """What a table's flow adds (:class:`~cnf.table_flow.TabularCNF`)."""

    preprocess: str = option(
        "standardize",
        f"fixed affine layer fitted on the training rows: {listed(PREPROCESS)}",
    )
    log_columns: str = option(
        "none",
        "columns taken on a log scale before it: none, positive (every column positive on the "
        "training rows; rows at or below zero there then have density zero) or auto (whichever "
        "of the two scores better on the training and validation rows after a short flow "
        "matching)",
    )

    def __post_init__(self) -> None:
        options.choice("preprocess", self.preprocess, PREPROCESS)
        options.choice("log_columns", self.log_columns, (*LOG_COLUMNS, "auto"))


@dataclass
class ImageModel:
    """What an image flow adds (:class:`~cnf.multiscale.MultiscaleCNF`): its scales, blocks,
    logit and the field of every block (:mod:`cnf.field_configs`)."""

    scales: int = option(0, "number of scales (0: as many as the image size allows)")
    blocks: int = option(2, "CNF blocks per stage, before and after each squeeze (FFJORD's "
                         "num_blocks)")  # fmt: skip
    alpha: float = option(1e-6, "logit transform's alpha (0: no logit, x - 1/2)")
    field: FieldConfig = options.variants(
        FIELD_CONFIGS,
        "images",
        {
            "kind": ("field", "images: the vector field, conv (FFJORD's stack of convolutions) "
                     "or unet (a time-conditioned U-Net, for the single-scale flow-matching "
                     "model)"),
            "layer": ("conv_layer", f"images: convolution of the vector field: "
                      f"{listed(CONV_LAYERS)}"),
            **{name: (f"unet_{name}", f"images, --field unet: {help_of(f)}")
               for name, f in _fields(UNetConfig).items()},
        },
        default=ConvConfig,
    )  # fmt: skip

    def __post_init__(self) -> None:
        options.finite_floats(self)
        options.integer("blocks", self.blocks, 1, "a positive integer")
        options.integer("scales", self.scales, 0, "an integer >= 0 (0: automatic)")
        options.within("alpha", self.alpha, 0, 0.5, closed=True)
        self.field = as_field_config(self.field)


# the training solver's options by their flags (a fixed-step method without a step starts at
# Hairer's step, measured by the trainer on the first batch)
SOLVER_FLAGS: options.Flags = {
    "method": ("method", f"training ODE solver: {listed(METHODS)}"),
    "atol": ("atol", "absolute tolerance of an adaptive training solver (the adapter changes it)"),
    "rtol": ("rtol", "relative tolerance of an adaptive training solver (the adapter changes it)"),
    "step_size": ("step_size", "first step of a fixed-step training solver, in units of time "
                  "(default: Hairer's heuristic; the adapter changes it)"),
    "adjoint": ("adjoint", "backpropagate with the adjoint method (memory flat in the number of "
                "steps)"),
    "max_nfe": ("max_nfe", "stop a training solve after this many function evaluations per "
                "pass"),
}  # fmt: skip
EVAL_SOLVER_FLAGS: options.Flags = {
    "method": ("eval_method", "evaluation ODE solver (validation, report, eval, sample): "
               f"{listed(METHODS)}"),
    "atol": ("eval_atol", "absolute tolerance of an adaptive evaluation solver"),
    "rtol": ("eval_rtol", "relative tolerance of an adaptive evaluation solver"),
    "step_size": ("eval_step_size", "step of a fixed-step evaluation solver, in units of time"),
    "max_nfe": ("eval_max_nfe", "stop an evaluation solve after this many function evaluations"),
}  # fmt: skip


@dataclass
class ModelConfig:
    """A flow's architecture, its solvers and its dtype: everything needed to rebuild it.

    The defaults are those of the 2-D toys; :data:`cnf.training.PRESETS` changes some of them per
    kind of data. A table's flow has ``table`` options (:class:`TableModel`), an image flow
    ``image`` options (:class:`ImageModel`, with its field's own config); both are ``None`` for
    other data (:meth:`for_kind`).
    """

    hidden: tuple[int, ...] = option(
        (64, 64, 64),
        "hidden widths of the vector field, e.g. 64,64,64",
    )
    activation: str = option(
        "tanh",
        f"activation of the vector field: {listed(sorted(ACTIVATIONS))}",
    )
    mlp: str = option(
        "concatsquash",
        f"vector data: the field's MLP, {listed(MLPS)} (concatsquash: FFJORD's, every layer "
        "gated and shifted by the time; concat: a plain MLP with the time concatenated to its "
        "input once, about 0.6 times the cost of a flow-matching iteration)",
    )
    trace: str = option(
        "auto",
        f"divergence: {listed(TRACES)} (auto: exact up to 8 dimensions)",
    )
    noise: str = option(
        "rademacher",
        f"Hutchinson probe: {listed(NOISES)}",
    )
    T: float = option(1.0, "integration time of each CNF block (data at t=0, the Gaussian at t=T)")
    learn_T: bool = option(False, "make T a trained parameter")
    dtype: str = option(
        "float32",
        f"parameters and densities in {' or '.join(DTYPES)}",
    )
    embed: int = option(16, "conditional models of labels: the width of a label's embedding")
    solver: Solver = options.nested(
        Solver, "training solver", SOLVER_FLAGS, default=lambda: Solver("rk4", max_nfe=10_000)
    )
    eval_solver: Solver = options.nested(
        Solver,
        "evaluation solver",
        EVAL_SOLVER_FLAGS,
        default=lambda: Solver("dopri5", 1e-7, 1e-7, max_nfe=10_000),
    )
    table: TableModel | None = options.nested(
        TableModel,
        "tables",
        {name: (name, f"tables: {help_of(f)}") for name, f in _fields(TableModel).items()},
        optional="is for tables, and these data are not a table: drop it",
    )
    image: ImageModel | None = options.nested(
        ImageModel,
        "images",
        {name: (name, f"images: {help_of(f)}") for name, f in _fields(ImageModel).items()
         if name != "field"},
        optional="is for images, and these data are not images: drop it",
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.hidden = options.widths("hidden", self.hidden)
        options.finite_floats(self)
        options.booleans(self)
        options.number("T", self.T)
        options.integer("embed", self.embed, 1, "a positive integer")
        options.choice("activation", self.activation, sorted(ACTIVATIONS))
        options.choice("mlp", self.mlp, tuple(MLPS))
        options.choice("trace", self.trace, TRACES)
        options.choice("noise", self.noise, NOISES)
        options.choice("dtype", self.dtype, tuple(DTYPES))
        for name, kind in (("solver", Solver), ("table", TableModel), ("image", ImageModel)):
            value = getattr(self, name)
            if isinstance(value, dict):  # a config's plain data, as saved
                setattr(self, name, options.from_dict(kind, value))
        if isinstance(self.eval_solver, dict):
            self.eval_solver = options.from_dict(Solver, self.eval_solver)
        self._check_solvers()
        if self.image is not None and self.mlp != "concatsquash":
            raise options.ConfigError(
                "mlp", "is for vector data (toys and tables), and these data are images (their "
                "field is a conv or unet one): drop it"
            )  # fmt: skip

    def _check_solvers(self) -> None:
        for flags, solver in ((SOLVER_FLAGS, self.solver), (EVAL_SOLVER_FLAGS, self.eval_solver)):
            if not isinstance(solver, Solver):
                raise TypeError(f"expected a cnf.Solver, got {type(solver).__name__}")
            options.integer(flags["max_nfe"][0], solver.max_nfe, 1, "a positive integer")
        if self.eval_solver.fixed_step and self.eval_solver.step_size is None:
            raise options.ConfigError(
                "eval_step_size", f"is needed by the fixed-step eval_method "
                f"{self.eval_solver.method!r} (for instance 0.0625): give it, or choose an "
                "adaptive eval_method such as dopri5"
            )  # fmt: skip

    @classmethod
    def for_kind(cls, kind: str, **values: Any) -> ModelConfig:
        """The defaults for data of ``kind`` (``"toy"``, ``"tabular"``, ``"image"``): the
        options of that kind present, those of the others absent."""
        parts = {"tabular": {"table": TableModel()}, "image": {"image": ImageModel()}}
        return cls(**{**parts.get(kind, {}), **values})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        return options.from_dict(cls, values)

    def to_dict(self) -> dict[str, Any]:
        return options.to_dict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with options changed by their flat names (``eval_atol``, ``unet_width``)."""
        return options.apply(self, changes)


def _vector(cfg: ModelConfig, meta: dict[str, Any]) -> CNF:
    (dim,) = meta["event_shape"]
    return CNF(dim, mlp=cfg.mlp, **_common(cfg), **_condition(cfg, meta))


def _tabular(cfg: ModelConfig, meta: dict[str, Any]) -> TabularCNF:
    (dim,) = meta["event_shape"]
    table = cfg.table or TableModel()
    # "auto" is resolved by training (cnf.training.choice) before the model that trains is
    # built; a model built before that choice takes the log, as one candidate does
    log_columns = "positive" if table.log_columns == "auto" else table.log_columns
    return TabularCNF(dim, preprocess=table.preprocess, log_columns=log_columns,
                      mlp=cfg.mlp, **_common(cfg), **_condition(cfg, meta))  # fmt: skip


def _image(cfg: ModelConfig, meta: dict[str, Any]) -> MultiscaleCNF:
    image = cfg.image or ImageModel()
    return MultiscaleCNF(
        tuple(meta["event_shape"]),
        levels=meta["levels"],
        scales=image.scales or None,
        blocks=image.blocks,
        alpha=image.alpha,
        field=image.field,
        **_common(cfg),
        **_condition(cfg, meta),
    )


def _condition(cfg: ModelConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """A conditional model's arguments for data with conditions (``meta["context"]``)."""
    context = meta.get("context")
    if context is None:
        return {}
    if context["kind"] == "categorical":
        return {"num_classes": context["classes"], "embed": cfg.embed}
    return {"context": context["features"]}


def _common(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        hidden=cfg.hidden,
        activation=cfg.activation,
        trace=cfg.trace,
        noise=cfg.noise,
        T=cfg.T,
        learn_T=cfg.learn_T,
        solver=cfg.solver,
        eval_solver=cfg.eval_solver,
    )


# the flow for each kind of dataset
BUILDERS: dict[str, Callable[[ModelConfig, dict[str, Any]], Flow]] = {
    "toy": _vector,
    "tabular": _tabular,
    "image": _image,
}


def build_model(cfg: ModelConfig, meta: dict[str, Any]) -> Flow:
    """The flow ``cfg`` describes for the data ``meta`` describes (a dataset's ``meta()``: its
    kind, event shape and, for images, levels), in ``cfg.dtype``."""
    if meta.get("kind") not in BUILDERS:
        raise ValueError(
            f"no model for datasets of kind {meta.get('kind')!r}; known kinds: {list(BUILDERS)}"
        )
    return BUILDERS[meta["kind"]](cfg, meta).to(DTYPES[cfg.dtype])


def model_shapes(cfg: ModelConfig, meta: dict[str, Any]) -> dict[str, torch.Size]:
    """The shape of every tensor of the flow's ``state_dict``, found without allocating it (the
    flow is built on PyTorch's meta device): a size can be checked before it costs memory."""
    with torch.device("meta"):
        skeleton = build_model(cfg, meta)
    return {k: v.shape for k, v in skeleton.state_dict().items()}
