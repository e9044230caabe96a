r"""Classifier-free guidance as an ODE of its own, with the exact density of its samples.

A conditional CNF trained with condition dropout has a field :math:`f(t, z, c)` and, under its
learned null condition :math:`\varnothing` (:mod:`cnf.context`), an unconditional one. Guidance
with weight :math:`w \ge 0` samples with their extrapolation (Ho & Salimans 2022)

.. math:: f_w(t, z \mid c) = (1 + w)\, f(t, z, c) - w\, f(t, z, \varnothing),

integrated from the base at :math:`T` back to :math:`0`, as :meth:`cnf.flow.CNF.sample` does;
:math:`w = 0` is the conditional field itself. The guided sampler is still an ODE, so its samples
have a density by the same instantaneous change of variables, with the trace of the *guided*
field's Jacobian,

.. math:: \log q_w(x \mid c) = \log \mathcal{N}(z(T); 0, I) + \int_0^T \Big[(1 + w)\,
    \mathrm{Tr}\,\frac{\partial f(t, z, c)}{\partial z}
    - w\, \mathrm{Tr}\,\frac{\partial f(t, z, \varnothing)}{\partial z}\Big]\, dt.

:math:`q_w` is the density of the guided flow, **not** the model's :math:`p(x \mid c)` (for
:math:`w > 0` it is no member of the model's family): it says what guidance did to the samples,
e.g. the NLL of held-out data of class :math:`c` under the guided sampler.

:func:`guided_flow` builds it without a solver of its own: a view of the flow, sharing every
parameter, whose field is :class:`GuidedField` and whose encoder :class:`GuidedContext` encodes a
condition together with the null one, :math:`[e(c), e(\varnothing)]`. Every map of the flow (the
solvers, the exact or Hutchinson trace, the adjoint, a table's normalizer) then runs the guided
ODE unchanged.

References:
    Ho and Salimans, "Classifier-Free Diffusion Guidance", 2022 (arXiv:2207.12598).
    Grathwohl et al., "FFJORD", ICLR 2019 (arXiv:1810.01367).
"""

from __future__ import annotations

import copy
import math
import numbers

import torch
from torch import Tensor, nn

from cnf.context import ContextEncoder
from cnf.fields import call_field
from cnf.flow import CNF
from cnf.multiscale import MultiscaleCNF
from cnf.solvers import Solver
from cnf.trace import JacobianField, TangentField


def check_guidance(guidance: object) -> float:
    """``guidance`` as a float: a finite real number ``w >= 0``."""
    if not isinstance(guidance, numbers.Real) or isinstance(guidance, bool):
        raise TypeError(
            f"guidance must be a real number w >= 0 (0: the conditional model), got "
            f"{type(guidance).__name__} {guidance!r}"
        )
    if not math.isfinite(guidance) or guidance < 0:
        raise ValueError(
            f"guidance must be a finite number w >= 0 (0: the conditional model, larger: "
            f"closer to the condition), got {guidance!r}"
        )
    return float(guidance)


def check_conditional(flow: object) -> CNF:
    """``flow`` if it is a conditional :class:`~cnf.flow.CNF`, whose null condition guides."""
    if isinstance(flow, MultiscaleCNF):
        if flow.num_classes is None and flow.context_features is None:
            raise ValueError(
                "flow models p(x) without conditions, so there is nothing to guide: build "
                "MultiscaleCNF(..., num_classes=C) and train it with condition dropout"
            )
        return flow
    if not isinstance(flow, CNF):
        raise TypeError(
            f"flow must be a conditional cnf.CNF, got {type(flow).__name__}: guidance combines "
            "the fields of one ODE block under a condition and under the null one"
        )
    if flow.context_encoder is None:
        raise ValueError(
            "flow models p(x) without conditions, so there is nothing to guide: build "
            "CNF(dim, context=K) or CNF(dim, num_classes=C) and train it with condition dropout "
            "(FlowMatching(cond_dropout=p)) so that its null condition is learned"
        )
    return flow


class GuidedContext(ContextEncoder):
    """A flow's encoder, encoding a condition ``c`` as ``[e(c), e(null)]`` (twice its width)
    for :class:`GuidedField`; its own null is ``[e(null), e(null)]``, under which the guided
    field is the null field. Checks and messages are the wrapped encoder's.

    Arguments:
        encoder: the conditional flow's encoder.
    """

    def __init__(self, encoder: ContextEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.width = 2 * encoder.width

    def check(self, context: object, n: int) -> Tensor:
        return self.encoder.check(context, n)

    def encode(self, context: Tensor) -> Tensor:
        return torch.cat([self.encoder.encode(context), self.encoder.null(len(context))], 1)

    def null(self, rows: int = 1) -> Tensor:
        return self.encoder.null(rows).repeat(1, 2)

    def describe(self) -> str:
        return self.encoder.describe()

    def expected(self, n: int) -> str:
        return self.encoder.expected(n)


class GuidedField(nn.Module):
    r"""The guided field :math:`(1 + w) f(t, z, c) - w f(t, z, \varnothing)` of a conditional
    field ``f``, called as ``guided(t, z, context=[e(c), e(null)])`` (:class:`GuidedContext`).

    Arguments:
        field: the conditional flow's field, shared (not copied).
        guidance: the weight :math:`w \ge 0`.
    """

    def __init__(self, field: nn.Module, guidance: float) -> None:
        super().__init__()
        self.field, self.guidance = field, check_guidance(guidance)

    def forward(self, t: Tensor, z: Tensor, context: Tensor) -> Tensor:
        c, null = _halves(context)
        w = self.guidance
        return (1 + w) * call_field(self.field, t, z, c) - w * call_field(self.field, t, z, null)

    def extra_repr(self) -> str:
        return f"guidance={self.guidance}"


class GuidedJacobianField(GuidedField):
    """A :class:`GuidedField` over a field with ``value_and_jacobian``: the guided Jacobian is
    the same combination, ``(1 + w) J(c) - w J(null)``, so the exact trace keeps its forward-mode
    path (:class:`~cnf.trace.JacobianField`)."""

    def value_and_jacobian(
        self, t: Tensor, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        c, null = _halves(context)
        value_c, jac_c = self.field.value_and_jacobian(t, z, context=c)
        value_0, jac_0 = self.field.value_and_jacobian(t, z, context=null)
        w = self.guidance
        return (1 + w) * value_c - w * value_0, (1 + w) * jac_c - w * jac_0


class GuidedTangentField(GuidedJacobianField):
    """A :class:`GuidedJacobianField` over a field with ``value_and_jvp`` too: the guided ``J
    v`` is ``(1 + w) J(c) v - w J(null) v``, so Hutchinson's estimate keeps its forward-mode
    path (:class:`~cnf.trace.TangentField`)."""

    def value_and_jvp(
        self, t: Tensor, z: Tensor, v: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        c, null = _halves(context)
        value_c, jv_c = self.field.value_and_jvp(t, z, v, context=c)
        value_0, jv_0 = self.field.value_and_jvp(t, z, v, context=null)
        w = self.guidance
        return (1 + w) * value_c - w * value_0, (1 + w) * jv_c - w * jv_0


def _halves(context: Tensor | None) -> tuple[Tensor, Tensor]:
    if context is None:
        raise ValueError(
            "a guided field takes context=[e(c), e(null)]: encode the condition with "
            "GuidedContext (guided_flow does)"
        )
    c, null = context.chunk(2, dim=-1)
    return c, null


def guided_flow(flow: CNF, guidance: float) -> CNF:
    r"""The guided flow of weight ``guidance``: a view of ``flow`` (the same parameters, buffers,
    solvers and trace estimator, in its mode) whose field is :class:`GuidedField`.

    Its ``sample``, ``log_prob``, ``sample_and_log_prob``, ``to_latent``, ``to_data``,
    ``trajectory`` and ``velocity`` take ``context=`` as the flow's do and are those of the
    guided ODE: densities are the guided sampler's :math:`q_w(x \mid c)`, not :math:`p(x \mid
    c)`. The view's ``nfe`` is its own latest solve's. It is for sampling and densities, not for
    saving (save ``flow``); build it again after changing ``flow``'s solvers, device or dtype.

    Arguments:
        flow: a conditional :class:`~cnf.flow.CNF`, trained with condition dropout.
        guidance: the weight ``w >= 0`` (0: the conditional flow).
    """
    w = check_guidance(guidance)
    flow = check_conditional(flow)
    if isinstance(flow, MultiscaleCNF):  # every block guided, each with the same weight
        return _guided_multiscale(flow, w)
    view = copy.copy(flow)  # a new module over the same tensors: flow itself is not changed
    view._modules = dict(flow._modules)  # its own table of submodules, so the swaps stay here
    kind = _guided_kind(flow.field)
    view.field = kind(flow.field, w)
    view.context_encoder = GuidedContext(flow.context_encoder)
    return view


def _guided_kind(field: nn.Module) -> type[GuidedField]:
    """The guided field that keeps ``field``'s forward-mode paths."""
    if not isinstance(field, JacobianField):
        return GuidedField
    return GuidedTangentField if isinstance(field, TangentField) else GuidedJacobianField


def _guided_multiscale(flow: MultiscaleCNF, guidance: float) -> MultiscaleCNF:
    """A view of a multiscale flow whose every block is :func:`guided_flow`'s."""
    view = copy.copy(flow)
    view._modules = dict(flow._modules)
    scales = []
    for scale in flow.scales:
        part = copy.copy(scale)
        part._modules = dict(scale._modules)
        part.pre = nn.ModuleList(guided_flow(b, guidance) for b in scale.pre)
        part.post = nn.ModuleList(guided_flow(b, guidance) for b in scale.post)
        scales.append(part)
    view.scales = nn.ModuleList(scales)
    return view


def guided_field(flow: CNF, t: Tensor, z: Tensor, context: object, guidance: float) -> Tensor:
    r"""The guided field :math:`f_w(t, z \mid c) = (1 + w) f(t, z, c) - w f(t, z,
    \varnothing)` at ``t`` (one time, or one per row) and ``z``, under ``context`` as in
    :meth:`~cnf.flow.CNF.velocity`.

    Example:
        >>> flow = CNF(2, hidden=(8,), num_classes=3)
        >>> guided_field(flow, torch.tensor(0.5), torch.zeros(4, 2), 1, guidance=2.0).shape
        torch.Size([4, 2])
    """
    return guided_flow(flow, guidance).velocity(t, z, context=context)


def guided_sample(
    flow: CNF,
    n: int,
    context: object,
    guidance: float,
    *,
    generator: torch.Generator | None = None,
    solver: Solver | None = None,
) -> Tensor:
    r"""Draw ``n`` samples of the guided flow: base noise integrated from ``T`` back to 0 along
    :math:`f_w(t, z \mid c)` (no trace), as :meth:`~cnf.flow.CNF.sample` does; at ``guidance``
    0, exactly ``flow.sample(n, context=context)`` for the same ``generator``.

    Arguments:
        flow: a conditional :class:`~cnf.flow.CNF` trained with condition dropout.
        n: the number of samples.
        context: the condition, one for every sample or one per sample (as the flow takes it).
        guidance: the weight ``w >= 0``.
        generator: where the base noise comes from.
        solver: overrides the flow's active solver.

    Returns:
        The samples, ``(n, *event_shape)`` (in a table's original units).

    Example:
        >>> from cnf import Solver
        >>> flow = CNF(2, hidden=(8,), num_classes=3, solver=Solver("rk4", step_size=0.25))
        >>> x = guided_sample(flow, 4, context=1, guidance=2.0)
        >>> guided_log_prob(flow, x, context=1, guidance=2.0).shape
        torch.Size([4])
    """
    view = guided_flow(flow, guidance)
    z = view._base_noise(n, generator)  # the draw of CNF.sample, which a table's flow overrides
    return view.to_data(z, context=context, solver=solver, logdet=False).value


def guided_sample_and_log_prob(
    flow: CNF,
    n: int,
    context: object,
    guidance: float,
    *,
    generator: torch.Generator | None = None,
    solver: Solver | None = None,
    trace: str | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Draw ``n`` guided samples with their log-density under the guided flow,
    :math:`\log q_w(x \mid c) = \log \mathcal{N}(z) - \log\lvert\det \partial x / \partial z
    \rvert` (not :math:`\log p(x \mid c)`). Arguments as in :func:`guided_sample`; ``trace``
    (``"exact"``, ``"hutchinson"``) overrides the flow's estimator, whose probe ``generator``
    also draws.
    """
    view = guided_flow(flow, guidance)
    return view.sample_and_log_prob(n, generator=generator, solver=solver, trace=trace,
                                    context=context)  # fmt: skip


def guided_log_prob(
    flow: CNF,
    x: Tensor,
    context: object,
    guidance: float,
    *,
    solver: Solver | None = None,
    generator: torch.Generator | None = None,
    trace: str | None = None,
) -> Tensor:
    r"""The log-density of ``x`` under the guided flow (the density of :func:`guided_sample`'s
    samples), by the instantaneous change of variables with the guided field's trace:

    .. math:: \log q_w(x \mid c) = \log \mathcal{N}(z(T); 0, I) + \int_0^T \mathrm{Tr}\,
        \frac{\partial f_w(t, z \mid c)}{\partial z}\, dt.

    This is **not** :math:`\log p(x \mid c)` (``flow.log_prob(x, context=c)``), except at
    ``guidance`` 0, where the two agree.

    Arguments:
        flow: a conditional :class:`~cnf.flow.CNF` trained with condition dropout.
        x: the points, ``(n, *event_shape)``, on the flow's device and in its dtype.
        context: the condition, one for every row or one per row (as the flow takes it).
        guidance: the weight ``w >= 0``.
        solver: overrides the flow's active solver.
        generator: where the Hutchinson probe comes from.
        trace: ``"exact"`` or ``"hutchinson"``, overriding the flow's estimator.

    Returns:
        ``log q_w(x | c)`` per row, ``(n,)``.

    References:
        Ho and Salimans, "Classifier-Free Diffusion Guidance", 2022 (arXiv:2207.12598).
    """
    view = guided_flow(flow, guidance)
    return view.log_prob(x, context=context, solver=solver, generator=generator, trace=trace)


def given(flow: CNF, context: object) -> CNF:
    r"""The flow of :math:`p(x \mid c)` for one condition ``c``, as a flow of :math:`p(x)`: a
    view of ``flow`` (the same parameters, buffers and solvers) whose calls without ``context``
    use ``context`` (calls with one use theirs), for code that draws flows of :math:`p(x)`,
    such as :func:`cnf.viz.animate`. Build it again after changing ``flow``'s device or dtype.

    Arguments:
        flow: a conditional :class:`~cnf.flow.CNF`.
        context: one condition, as the flow takes it for every row (a label, or the features).

    Example:
        >>> flow = CNF(2, hidden=(8,), num_classes=3)
        >>> x = torch.zeros(4, 2)
        >>> bool(torch.equal(given(flow, 1).log_prob(x), flow.log_prob(x, context=1)))
        True
    """
    flow = check_conditional(flow)
    flow.encode_context(context, 1)  # checked now, where the mistake is made
    view = copy.copy(flow)
    encode = flow.encode_context

    def encode_given(condition: object, n: int, drop: Tensor | None = None) -> Tensor | None:
        return encode(context if condition is None else condition, n, drop)

    view.encode_context = encode_given  # type: ignore[method-assign]
    return view
