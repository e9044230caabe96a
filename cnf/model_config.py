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
from cnf.fields import ACTIVATIONS, CONV_LAYERS
from cnf.flow import CNF, Flow
from cnf.multiscale import MultiscaleCNF
from cnf.options import listed, option
from cnf.solvers import FIXED_STEP, METHODS, Solver
from cnf.table_flow import PREPROCESS, TabularCNF
from cnf.trace import NOISES, TRACES

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class ModelConfig:
    """A flow's architecture, its solvers and its dtype: everything needed to rebuild it.

    The defaults are those of the 2-D toys; :data:`cnf.training.PRESETS` changes some of them per
    kind of data. Which fields matter depends on the kind: ``preprocess`` is for tables
    (:class:`~cnf.table_flow.TabularCNF`); ``scales``, ``blocks``, ``alpha`` and ``conv_layer`` for
    images (:class:`~cnf.multiscale.MultiscaleCNF`).
    """

    hidden: tuple[int, ...] = option(
        (64, 64, 64),
        "hidden widths of the vector field, e.g. 64,64,64",
    )
    activation: str = option(
        "tanh",
        f"activation of the vector field: {listed(sorted(ACTIVATIONS))}",
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
    # training solver; a fixed-step method without step_size starts from Hairer's heuristic
    method: str = option(
        "rk4",
        f"training ODE solver: {listed(METHODS)}",
    )
    atol: float = option(
        1e-5,
        "absolute tolerance of an adaptive training solver (the adapter changes it)",
    )
    rtol: float = option(
        1e-5,
        "relative tolerance of an adaptive training solver (the adapter changes it)",
    )
    step_size: float | None = option(
        None,
        "first step of a fixed-step training solver, in units of time (default: Hairer's "
        "heuristic; the adapter changes it)",
    )
    adjoint: bool = option(
        False,
        "backpropagate with the adjoint method (memory flat in the number of steps)",
    )
    max_nfe: int = option(10_000, "stop a solve after this many function evaluations per pass")
    # evaluation solver
    eval_method: str = option(
        "dopri5",
        f"evaluation ODE solver (validation, report, eval, sample): {listed(METHODS)}",
    )
    eval_atol: float = option(1e-7, "absolute tolerance of an adaptive evaluation solver")
    eval_rtol: float = option(1e-7, "relative tolerance of an adaptive evaluation solver")
    eval_step_size: float | None = option(
        None,
        "step of a fixed-step evaluation solver, in units of time",
    )
    dtype: str = option(
        "float32",
        f"parameters and densities in {' or '.join(DTYPES)}",
    )
    # tables
    preprocess: str = option(
        "standardize",
        f"tables: fixed affine layer fitted on the training rows: {listed(PREPROCESS)}",
    )
    # images
    scales: int = option(0, "images: number of scales (0: as many as the image size allows)")
    blocks: int = option(
        2,
        "images: CNF blocks per stage, before and after each squeeze (FFJORD's num_blocks)",
    )
    alpha: float = option(1e-6, "images: logit transform's alpha (0: no logit, x - 1/2)")
    conv_layer: str = option(
        "concatsquash",
        f"images: convolution of the vector field: {listed(CONV_LAYERS)}",
    )
    field: str = option(
        "conv",
        "images: the vector field, conv (FFJORD's stack of convolutions) or unet (a "
        "time-conditioned U-Net, for the single-scale flow-matching model)",
    )
    unet_width: int = option(
        32,
        "images, --field unet: channels at full resolution (doubled per level)",
    )
    unet_resolutions: int = option(
        2,
        "images, --field unet: levels of the U (the image halves one less time)",
    )
    unet_depth: int = option(1, "images, --field unet: residual blocks per level and direction")
    unet_dropout: float = option(
        0.0,
        "images, --field unet: dropout rate in the residual blocks while training (a regularizer "
        "for small datasets; never in evaluation)",
    )
    unet_scale_shift: bool = option(
        False,
        "images, --field unet: the time scales and shifts each block's normalized features (ADM's"
        " conditioning; the image preset's) instead of only shifting them before the norm "
        "(--no-unet-scale-shift)",
    )

    def __post_init__(self) -> None:
        self.hidden = options.widths("hidden", self.hidden)
        options.finite_floats(self)
        options.booleans(self)
        for name in ("T", "atol", "rtol", "eval_atol", "eval_rtol"):
            options.number(name, getattr(self, name))
        for name in ("step_size", "eval_step_size"):
            if getattr(self, name) is not None:
                options.number(name, getattr(self, name))
        options.integer("max_nfe", self.max_nfe, 1, "a positive integer")
        options.integer("blocks", self.blocks, 1, "a positive integer")
        options.integer("scales", self.scales, 0, "an integer >= 0 (0: automatic)")
        options.within("alpha", self.alpha, 0, 0.5, closed=True)
        options.choice("activation", self.activation, sorted(ACTIVATIONS))
        options.choice("trace", self.trace, TRACES)
        options.choice("noise", self.noise, NOISES)
        options.choice("dtype", self.dtype, tuple(DTYPES))
        options.choice("preprocess", self.preprocess, PREPROCESS)
        options.choice("conv_layer", self.conv_layer, tuple(CONV_LAYERS))
        options.choice("field", self.field, ("conv", "unet"))
        for name in ("unet_width", "unet_resolutions", "unet_depth"):
            options.integer(name, getattr(self, name), 1, "a positive integer")
        if not 0 <= self.unet_dropout < 1:
            raise options.ConfigError(
                "unet_dropout", f"must be in [0, 1), got {self.unet_dropout!r}"
            )
        self.solver, self.eval_solver  # noqa: B018  validates methods, steps and tolerances

    @property
    def solver(self) -> Solver:
        """The training solver; a fixed-step method without a step gets a placeholder of T/8
        until the trainer measures Hairer's step on the first batch."""
        step = self.step_size
        if step is None and self.method in FIXED_STEP:
            step = self.T / 8
        return Solver(
            self.method, self.atol, self.rtol, step, adjoint=self.adjoint, max_nfe=self.max_nfe
        )

    @property
    def eval_solver(self) -> Solver:
        return Solver(
            self.eval_method,
            self.eval_atol,
            self.eval_rtol,
            self.eval_step_size,
            max_nfe=self.max_nfe,
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        return options.from_dict(cls, values)

    def to_dict(self) -> dict[str, Any]:
        return options.to_dict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _vector(cfg: ModelConfig, meta: dict[str, Any]) -> CNF:
    (dim,) = meta["event_shape"]
    return CNF(dim, **_common(cfg))


def _tabular(cfg: ModelConfig, meta: dict[str, Any]) -> TabularCNF:
    (dim,) = meta["event_shape"]
    return TabularCNF(dim, preprocess=cfg.preprocess, **_common(cfg))


def _image(cfg: ModelConfig, meta: dict[str, Any]) -> MultiscaleCNF:
    return MultiscaleCNF(
        tuple(meta["event_shape"]),
        levels=meta["levels"],
        scales=cfg.scales or None,
        blocks=cfg.blocks,
        alpha=cfg.alpha,
        conv_layer=cfg.conv_layer,
        field=cfg.field,
        unet_width=cfg.unet_width,
        unet_resolutions=cfg.unet_resolutions,
        unet_depth=cfg.unet_depth,
        unet_dropout=cfg.unet_dropout,
        unet_scale_shift=cfg.unet_scale_shift,
        **_common(cfg),
    )


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
