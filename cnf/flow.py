r"""The continuous normalizing flow: state and log-density integrated jointly.

Data :math:`x` sits at :math:`t = 0` and the base (standard normal) at :math:`t = T`. The flow
integrates

.. math::
    \frac{dz}{dt} = f(t, z), \qquad \frac{da}{dt} = \mathrm{Tr}\,\frac{\partial f}{\partial z},
    \qquad z(0) = x,\ a(0) = 0,

so that :math:`a(T) = \log\lvert\det \partial z(T) / \partial x\rvert` and, by the instantaneous
change of variables,

.. math:: \log p(x) = \log \mathcal{N}(z(T); 0, I) + \int_0^T \mathrm{Tr}\,
    \frac{\partial f}{\partial z(t)}\, dt.

Sampling draws :math:`z \sim \mathcal{N}(0, I)` and integrates from :math:`T` back to :math:`0`.
A conditional flow models :math:`p(x \mid c)` with a field :math:`f(t, z, c)`: the condition is
held fixed along the ODE (:mod:`cnf.context`).

References:
    Chen et al., "Neural Ordinary Differential Equations", NeurIPS 2018 (arXiv:1806.07366).
    Grathwohl et al., "FFJORD", ICLR 2019 (arXiv:1810.01367).
    Finlay et al., "How to train your neural ODE", ICML 2020 (arXiv:2002.02798).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cnf.context import ContextEncoder, check_field_context, encode_context, make_context_encoder
from cnf.fields import call_field, make_mlp
from cnf.ode import ODEBlock
from cnf.runtime import ruled
from cnf.solvers import Solver
from cnf.trace import JointDynamics, ProbeSource, make_trace

_matmul = torch.backends.cuda.matmul  # its allow_tf32 is process-wide (cnf.runtime)


@dataclass(frozen=True)
class FlowResult:
    """One pass of the flow.

    Attributes:
        value: where the inputs went (latents for :meth:`CNF.to_latent`, data for
            :meth:`CNF.to_data`), or the states at every requested time for
            :meth:`CNF.trajectory` (leading time axis).
        logdet: ``log|det d value / d input|`` per sample (same leading axes as ``value``).
        kinetic: ``int ||f||^2 dt`` per sample, when regularization was requested.
        jacobian: ``int ||df/dz||_F^2 dt`` per sample (Hutchinson estimate under that trace).
    """

    value: Tensor
    logdet: Tensor
    kinetic: Tensor | None = None
    jacobian: Tensor | None = None


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, then back in the mode it was in; on CUDA also with
    full float32 matrix products and convolutions (TF32, which training may allow, off):
    likelihoods, samples and the validity check are float32 or float64 as written."""
    was, tf32 = model.training, (_matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    model.eval()
    _matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield model
    finally:
        model.train(was)
        _matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


class Flow:
    """What every flow of this package shares, over a subclass's maps ``to_latent`` (data to
    latent, ``logdet = log|det dz/dx|``) and ``to_data`` (back): the standard normal base, the
    density ``log p(x) = log N(z) + log|det dz/dx|``, calling the flow for ``log_prob``,
    sampling with or without the density, and its solvers. A subclass has ``dim`` and
    ``event_shape``, lists its CNF blocks in ``ode_blocks()`` and names, in ``_like()``, a tensor
    whose dtype and device the base noise takes."""

    dim: int
    event_shape: tuple[int, ...]
    levels: int | None = None  # the pixel values of an image model (its densities are of them)
    context_features: int | None = None  # continuous condition features of p(x | c)
    num_classes: int | None = None  # class labels of p(x | c)
    preprocessed = False  # whether the flow fits a preprocessing layer (fit_preprocessing)

    # the public maps, under cnf's thread rule when a user's code calls them (cnf.runtime.ruled)
    RULED = ("log_prob", "sample", "sample_and_log_prob", "to_latent", "to_data", "trajectory")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in set(Flow.RULED) & set(vars(cls)):
            setattr(cls, name, ruled(vars(cls)[name]))

    def fit_preprocessing(self, x: Any, context: Any = None) -> None:
        """Fit the flow's fixed preprocessing on the training rows (a table's normalizer); only
        flows with ``preprocessed`` have one."""
        raise TypeError(f"{type(self).__name__} has no preprocessing to fit")

    def ode_blocks(self) -> list[CNF]:
        """Every CNF block, in the order data meet them (one for a plain CNF)."""
        raise NotImplementedError

    # ``solver``, ``eval_solver`` (the training and the eval-mode solver, shared by every block)
    # and ``nfe`` (the latest pass's function evaluations) come from the subclass

    def set_solver(self, solver: Solver | None = None, *, eval_solver: Solver | None = None):
        """Replace the training solver, the evaluation solver, or both, in every block: the one
        way solvers change (the trainer's step adaptation uses it)."""
        for block in self.ode_blocks():
            ODEBlock.set_solver(block, solver, eval_solver=eval_solver)

    def base_log_prob(self, z: Tensor) -> Tensor:
        """``log N(z; 0, I)`` summed over the event dimensions."""
        flat = z.flatten(1)
        return -0.5 * (flat.square().sum(1) + self.dim * math.log(2 * math.pi))

    @ruled
    def log_prob(self, x: Tensor, **kwargs: Any) -> Tensor:
        """``log p(x)`` per sample: ``log N(z(T)) + log|det dz(T)/dx|``.

        Keyword arguments (``solver``, ``trace``, ``generator``) are those of ``to_latent``.
        """
        out = self.to_latent(x, **kwargs)
        return self.base_log_prob(out.value) + out.logdet

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        return self.log_prob(x, **kwargs)

    @ruled
    def sample_and_log_prob(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        solver: Solver | None = None,
        trace: str | None = None,
        **condition: Any,
    ) -> tuple[Tensor, Tensor]:
        """Draw ``n`` samples with their log-density ``log N(z) - log|det dx/dz|``; a
        conditional flow takes ``context=`` (and ``drop=``) as in ``to_data``."""
        z = self._base_noise(n, generator)
        out = self.to_data(z, solver=solver, trace=trace, generator=generator, **condition)
        return out.value, self.base_log_prob(z) - out.logdet

    def _base_noise(self, n: int, generator: torch.Generator | None) -> Tensor:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive integer number of samples, got {n!r}")
        like = self._like()
        return torch.randn((n, *self.event_shape), generator=generator, dtype=like.dtype,
                           device=like.device)  # fmt: skip

    def _like(self) -> Tensor:
        raise NotImplementedError

    # implemented by subclasses
    def to_latent(self, x: Tensor, **kwargs: Any) -> FlowResult:
        raise NotImplementedError

    def to_data(self, z: Tensor, **kwargs: Any) -> FlowResult:
        raise NotImplementedError


class CNF(Flow, ODEBlock):
    r"""A continuous normalizing flow with a standard normal base.

    Arguments:
        dim: the data dimension, or an event shape such as ``(1, 8, 8)`` for images.
        vector_field: an ``nn.Module`` ``f(t, z)``; by default the field ``mlp`` names
            (``"concatsquash"``: a :class:`~cnf.fields.ConcatSquashMLP`, ``"concat"``: a
            :class:`~cnf.fields.ConcatMLP`) with widths ``hidden`` and ``activation`` (vector
            data only).
        trace: ``"exact"``, ``"hutchinson"`` or ``"auto"`` (exact up to
            :data:`cnf.trace.AUTO_EXACT_MAX_DIM` dimensions).
        noise: the Hutchinson probe, ``"rademacher"`` or ``"gaussian"``.
        T: the integration time, as in :class:`~cnf.ode.ODEBlock`.
        learn_T: make ``T`` a trained parameter, as in :class:`~cnf.ode.ODEBlock`.
        solver: the training :class:`~cnf.solvers.Solver`, as in :class:`~cnf.ode.ODEBlock`.
        eval_solver: the :class:`~cnf.solvers.Solver` of ``eval()`` mode.
        context: model :math:`p(x \mid c)` for ``K`` continuous features ``c``
            (:class:`~cnf.context.FeatureContext`); the field must then take ``context=``.
        num_classes: model :math:`p(x \mid c)` for class labels ``c`` in ``0..C-1``, embedded in
            ``embed`` dimensions (:class:`~cnf.context.LabelContext`); not with ``context``.

    Every map, density and sample of a conditional flow takes ``context=``: one condition for
    every row (shape ``(K,)``, or one label) or one per row (``(n, K)``, or ``(n,)``), and
    ``drop=``, a boolean ``(n,)`` whose True rows take the learned null condition.

    Example:
        >>> flow = CNF(2, hidden=(16, 16), solver=Solver("rk4", step_size=0.25))
        >>> x = flow.sample(5)
        >>> flow.log_prob(x).shape
        torch.Size([5])
        >>> labelled = CNF(2, hidden=(16,), num_classes=3, solver=Solver("rk4", step_size=0.25))
        >>> labelled.log_prob(x, context=torch.tensor([0, 1, 2, 2, 0])).shape
        torch.Size([5])
    """

    def __init__(
        self,
        dim: int | Sequence[int],
        vector_field: nn.Module | None = None,
        *,
        hidden: Sequence[int] = (64, 64, 64),
        activation: str = "tanh",
        mlp: str = "concatsquash",
        trace: str = "auto",
        noise: str = "rademacher",
        T: float = 1.0,
        learn_T: bool = False,
        solver: Solver | Mapping[str, Any] | None = None,
        eval_solver: Solver | Mapping[str, Any] | None = None,
        context: int | None = None,
        num_classes: int | None = None,
        embed: int = 16,
    ) -> None:
        event_shape = _event_shape(dim)
        encoder = make_context_encoder(context, num_classes, embed)
        width = 0 if encoder is None else encoder.width
        if vector_field is None:
            if len(event_shape) != 1:
                raise ValueError(
                    f"the default vector field is for vector data; for event shape {event_shape} "
                    "pass vector_field= (a convolutional one: cnf.ConvField)"
                )
            vector_field = make_mlp(mlp, event_shape[0], hidden, activation=activation,
                                    context=width)  # fmt: skip
        check_field_context(vector_field, width)
        super().__init__(vector_field, T=T, learn_T=learn_T, solver=solver, eval_solver=eval_solver)
        self.context_encoder: ContextEncoder | None = encoder  # after the field: keys keep order
        self.context_features, self.num_classes = context, num_classes
        self.event_shape = event_shape
        self.dim = math.prod(event_shape)
        self.trace_name, self.noise = trace, noise
        self.estimator = make_trace(trace, self.dim, noise)

    def ode_blocks(self) -> list[CNF]:
        return [self]

    def extra_repr(self) -> str:
        condition = "" if self.context_encoder is None else f"{self.context_encoder.describe()}, "
        return (
            f"event_shape={self.event_shape}, {condition}trace={self.estimator.name!r}, "
            f"solver={self.solver.describe()}, eval_solver={self.eval_solver.describe()}"
        )

    def dynamics_parameters(self) -> tuple[Tensor, ...]:
        """Every parameter but the context encoder's, which reach the dynamics only through the
        encoded context (:meth:`~cnf.ode.ODEBlock.integrate`)."""
        encoder = {id(p) for p in self.context_encoder.parameters()} if self.context_encoder else ()
        return tuple(p for p in self.parameters() if id(p) not in encoder)

    def encode_context(self, context: object, n: int, drop: Tensor | None = None) -> Tensor | None:
        """The checked, encoded condition the field sees for ``n`` rows (``(1 or n, width)``;
        ``None`` for an unconditional flow); rows where ``drop`` is True take the null one."""
        return encode_context(self.context_encoder, context, n, drop)

    def velocity(
        self, t: Tensor, x: Tensor, *, context: object = None, drop: Tensor | None = None
    ) -> Tensor:
        """The field ``f(t, x)``, or ``f(t, x, c)``, at one time or one per row (``t`` of shape
        ``(n,)``), in the field's coordinates: the evaluation flow matching regresses."""
        return call_field(self.field, t, x, self.encode_context(context, len(x), drop))

    # --- densities ------------------------------------------------------------------------

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        solver: Solver | None = None,
        context: object = None,
        drop: Tensor | None = None,
    ) -> Tensor:
        """Draw ``n`` samples: base noise integrated from ``T`` back to 0 (no trace computed),
        of ``p(x | context)`` for a conditional flow."""
        z = self._base_noise(n, generator)
        c = self.encode_context(context, n, drop)
        return self.solve_states(z, self.times(z, reverse=True), solver, c)[-1]

    # --- maps -----------------------------------------------------------------------------

    def to_latent(self, x: Tensor, **kwargs: Any) -> FlowResult:
        """Map data to latents (``t: 0 -> T``); ``logdet = log|det dz/dx|``.

        Keyword arguments: ``solver`` (a :class:`Solver`, default the active one), ``trace``
        (a trace name overriding the flow's), ``generator`` (for the Hutchinson probe),
        ``regularize`` (also integrate the kinetic energy and Jacobian norm), ``probes`` (a
        :data:`~cnf.trace.ProbeSource` that gives the Hutchinson probe instead of drawing it
        from ``generator``, such as :class:`~cnf.trace.RowsOfBatch` for a share of a batch) and
        ``logdet`` (``False``: the map alone, no trace integrated, ``logdet`` zero; for round
        trips); a conditional flow's ``context`` and ``drop`` (as in :class:`CNF`).
        """
        x = self.check_input(x, "x")
        return self._last(self._joint(x, self.times(x), **kwargs))

    def to_data(self, z: Tensor, **kwargs: Any) -> FlowResult:
        """Map latents to data (``t: T -> 0``); ``logdet = log|det dx/dz|``. Keywords as in
        :meth:`to_latent`."""
        z = self.check_input(z, "z")
        return self._last(self._joint(z, self.times(z, reverse=True), **kwargs))

    def trajectory(self, y: Tensor, t: Tensor, **kwargs: Any) -> FlowResult:  # type: ignore[override]
        """Integrate from ``y`` at time ``t[0]`` through every time of ``t`` (1-D, monotone, in
        ``[0, T]``); ``value`` and ``logdet`` carry a leading time axis. One solve serves all
        times. Keywords as in :meth:`to_latent`."""
        y = self.check_input(y, "y")
        if not isinstance(t, Tensor) or t.ndim != 1 or len(t) < 2:
            raise ValueError(f"t must be a 1-D tensor of at least 2 times, got {t!r}")
        return self._joint(y, t, **kwargs)

    def field_coordinates(self, x: Tensor) -> Tensor:
        """Data in the coordinates the vector field sees at ``t = 0``: the data itself here (a
        table's flow normalizes it first). Flow matching regresses the field in them."""
        return self.check_input(x, "x")

    def _joint(
        self,
        y: Tensor,
        t: Tensor,
        *,
        solver: Solver | None = None,
        trace: str | None = None,
        generator: torch.Generator | None = None,
        regularize: bool = False,
        probes: ProbeSource | None = None,
        logdet: bool = True,
        context: object = None,
        drop: Tensor | None = None,
    ) -> FlowResult:
        c = self.encode_context(context, len(y), drop)  # once per solve, fixed along it
        if not logdet and not regularize and len(y):  # the map alone: no trace to integrate
            values = self.solve_states(y, t, solver, c)
            return FlowResult(values, y.new_zeros((len(t), y.shape[0])))
        estimator = self.estimator if trace is None else make_trace(trace, self.dim, self.noise)
        if len(y) == 0:  # nothing to integrate: empty results of the right shapes
            empty = y.new_zeros((len(t), 0))
            parts = (empty, empty) if regularize else (None, None)
            return FlowResult(y.expand(len(t), *y.shape), empty, *parts)
        probe = estimator.probe(y, generator) if probes is None else probes(estimator, y)
        zeros = y.new_zeros(y.shape[0])
        y0 = (y, zeros, zeros, zeros) if regularize else (y, zeros)
        dynamics = JointDynamics(self, estimator, probe, regularize, c)
        states = self.integrate(dynamics, y0, t, solver, context=c)
        return FlowResult(*states)

    @staticmethod
    def _last(result: FlowResult) -> FlowResult:
        return FlowResult(*(None if x is None else x[-1] for x in vars(result).values()))

    def _like(self) -> Tensor:
        return self.log_T

    def check_input(self, x: Tensor, name: str) -> Tensor:
        """Validate a batch: a floating tensor of shape ``(n, *event_shape)`` on the flow's device
        and in its dtype, with no NaN or inf."""
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor, got {type(x).__name__}; convert with "
                f"torch.as_tensor({name}, dtype={self.log_T.dtype})"
            )
        expected = ("n", *self.event_shape)
        if x.ndim != len(expected) or tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(
                f"expected {name} of shape {_shape_str(expected)}, got {tuple(x.shape)}: this flow "
                f"models {self.dim}-dimensional data"
            )
        if not x.dtype.is_floating_point:
            raise TypeError(
                f"{name} has dtype {x.dtype}, but the flow takes floating-point data: call "
                f"{name}.to({self.log_T.dtype})"
            )
        if x.dtype != self.log_T.dtype:
            raise TypeError(
                f"{name} has dtype {x.dtype} but the flow's parameters are {self.log_T.dtype}: "
                f"call {name}.to({self.log_T.dtype}) or flow.to({x.dtype})"
            )
        if x.device != self.log_T.device:
            raise ValueError(
                f"{name} is on {x.device} but the flow is on {self.log_T.device}: call "
                f"{name}.to('{self.log_T.device}') or flow.to('{x.device}')"
            )
        bad = ~torch.isfinite(x.flatten(1)).all(1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten()[:5].tolist()
            raise ValueError(
                f"{name} has NaN or inf values in {int(bad.sum())} rows (first: {rows}); drop or "
                "impute them before calling the flow"
            )
        return x


def _event_shape(dim: int | Sequence[int]) -> tuple[int, ...]:
    if not isinstance(dim, int | Sequence) or isinstance(dim, str):
        raise ValueError(f"dim must be a positive integer or a shape of them, got {dim!r}")
    shape = (dim,) if isinstance(dim, int) else tuple(dim)
    if not shape or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in shape):
        raise ValueError(f"dim must be a positive integer or a shape of them, got {dim!r}")
    return shape


def _shape_str(shape: tuple[Any, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
