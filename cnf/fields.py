r"""Time-conditioned vector fields f(t, z) for neural ODEs and CNFs: the MLPs of vector data
(the convolutional fields of images are in :mod:`cnf.conv_fields`, the U-Net in :mod:`cnf.unet`).

A vector field is any ``nn.Module`` called as ``f(t, z)`` with a scalar time tensor ``t`` and a
batch ``z`` of shape ``(n, *event_shape)``, returning a tensor of the same shape. Rows must not
interact (no batch norm): the CNF's density of one sample may not depend on the others.

A conditional field, for a CNF of :math:`p(x \mid c)`, is called as ``f(t, z, context=e)`` with
the encoded condition ``e`` of shape ``(1, width)`` (one for every row) or ``(n, width)`` (one per
row; :mod:`cnf.context` encodes it); an unconditional one keeps the two-argument call.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cnf.unet import SeededDropout as SeededDropout
from cnf.unet import UNet as UNet
from cnf.unet import _ResBlock as _ResBlock
from cnf.unet import seeded_dropout as seeded_dropout

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
}


def _with_derivative(name: str, a: Tensor) -> tuple[Tensor, Tensor]:
    """An activation and its derivative at ``a``, each written from the value where cheaper."""
    if name == "tanh":
        h = torch.tanh(a)
        return h, 1 - h * h
    if name in ("silu", "swish"):
        s = torch.sigmoid(a)
        return a * s, s * (1 + a * (1 - s))
    if name == "softplus":
        return nn.functional.softplus(a), torch.sigmoid(a)
    if name == "sigmoid":
        h = torch.sigmoid(a)
        return h, h * (1 - h)
    if name == "elu":
        h = nn.functional.elu(a)
        return h, torch.where(a > 0, torch.ones_like(a), h + 1)
    return torch.relu(a), (a > 0).to(a)


def make_activation(name: str) -> nn.Module:
    """Return a fresh activation module for ``name``; unknown names list the valid ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid choices: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def call_field(field: nn.Module, t: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
    """``f(t, z)``, or ``f(t, z, context=context)`` for a conditional field: an unconditional
    field keeps its two-argument call."""
    return field(t, z) if context is None else field(t, z, context=context)


class ConcatSquashLinear(nn.Module):
    r"""FFJORD's time-gated linear layer, its gate and shift a hyper-network of the time and,
    for a conditional field, of the encoded context :math:`c`:

    .. math:: y = (W x + b) \odot \sigma(G [t, c] + g) + S [t, c]

    The time's columns are ``gate`` (with the bias :math:`g`) and ``shift``; the context's,
    ``context_gate`` and ``context_shift``, exist only for ``context > 0``, so an unconditional
    layer has FFJORD's parameters exactly.

    Arguments:
        in_features: the input width.
        out_features: the output width.
        context: the width of the encoded context (0: none).

    References:
        Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
        Generative Models", ICLR 2019 (arXiv:1810.01367).
    """

    def __init__(self, in_features: int, out_features: int, context: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(1, out_features)
        self.shift = nn.Linear(1, out_features, bias=False)
        if context > 0:
            self.context_gate = nn.Linear(context, out_features, bias=False)
            self.context_shift = nn.Linear(context, out_features, bias=False)

    def gate_and_shift(self, tt: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The pre-sigmoid gate :math:`G [t, c] + g` and the shift :math:`S [t, c]`, one row per
        row of ``tt`` (shape ``(1 or n, 1)``) and of ``context`` (``(1 or n, width)``)."""
        gate, shift = self.gate(tt), self.shift(tt)
        if context is not None:
            gate, shift = gate + self.context_gate(context), shift + self.context_shift(context)
        return gate, shift

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``t``: one time (a 0-d tensor) or one per row of ``x`` (shape ``(n,)``, as flow
        matching evaluates the field); ``context``: ``(1 or n, width)``, or ``None``."""
        gate, shift = self.gate_and_shift(t.reshape(-1, 1).to(x), context)
        return self.linear(x) * torch.sigmoid(gate) + shift

    def tangent_map(
        self, tt: Tensor, h: Tensor, tangents: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The layer at time ``tt`` (shape ``(1, 1)``) on the values ``h`` ``(n, in)`` and on
        their tangents ``(n, d, in)`` (forward mode): the layer is affine in ``x``, so both go
        through ``diag(sigmoid(gate)) W``. One gate for every row is folded into the (small)
        weight; a gate per row (a per-row context) scales the outputs instead, which costs one
        elementwise product where a per-row weight ``(n, out, in)`` would cost batched ones."""
        gate, shift = self.gate_and_shift(tt, context)
        gate, W, b = torch.sigmoid(gate), self.linear.weight, self.linear.bias
        if gate.shape[0] == 1:
            weight = W * gate[0][:, None]
            return torch.addmm(b * gate[0] + shift[0], h, weight.T), tangents @ weight.T
        return torch.addmm(b, h, W.T) * gate + shift, (tangents @ W.T) * gate[:, None]


class ConcatSquashMLP(nn.Module):
    """An MLP of :class:`ConcatSquashLinear` layers: the default CNF vector field.

    Arguments:
        dim: the data dimension (input and output width).
        hidden: the hidden widths, e.g. ``(64, 64, 64)``.
        activation: a name from :data:`ACTIVATIONS`. Smooth activations (tanh, softplus) keep the
            ODE smooth, which adaptive solvers reward with fewer steps.
        context: the width of the encoded context of a conditional field, which then is called
            as ``f(t, z, context=c)`` (0: unconditional, ``f(t, z)``).

    Example:
        >>> f = ConcatSquashMLP(2, hidden=(16, 16))
        >>> f(torch.tensor(0.5), torch.zeros(3, 2)).shape
        torch.Size([3, 2])
        >>> g = ConcatSquashMLP(2, hidden=(16, 16), context=4)
        >>> g(torch.tensor(0.5), torch.zeros(3, 2), context=torch.ones(3, 4)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64, 64),
        *,
        activation: str = "tanh",
        context: int = 0,
    ) -> None:
        super().__init__()
        _check_widths(hidden, context)
        widths = [dim, *hidden, dim]
        self.layers = nn.ModuleList(
            ConcatSquashLinear(a, b, context) for a, b in itertools.pairwise(widths)
        )
        self.activations = nn.ModuleList(make_activation(activation) for _ in hidden)
        self.activation = activation
        self.context_features = context

    def forward(self, t: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        self.check_context(context, z.shape[0])
        for layer, act in zip(self.layers[:-1], self.activations, strict=True):
            z = act(layer(t, z, context))
        return self.layers[-1](t, z, context)

    def check_context(self, context: Tensor | None, n: int) -> None:
        """Refuse a context this field was not built for, or none where it needs one."""
        width = self.context_features
        if context is None and width == 0:
            return
        if context is None or width == 0:
            raise ValueError(
                f"context: this field was built with context={width} but was called with "
                f"{'none' if context is None else tuple(context.shape)}; call f(t, z) for "
                "context=0 and f(t, z, context=c) otherwise"
            )
        if context.ndim != 2 or context.shape[1] != width or context.shape[0] not in (1, n):
            raise ValueError(
                f"context must have shape (1, {width}) or ({n}, {width}) for {n} rows, got "
                f"{tuple(context.shape)}: one encoded context for every row, or one per row"
            )

    def value_and_jacobian(
        self, t: Tensor, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``f(t, z)`` and its Jacobian ``J[n, i, j] = df_i/dz_j`` by forward mode.

        The value ``(n, width)`` and the ``d`` tangents ``(n, d, width)`` go through each layer
        together, with the time gate folded into the (small) weight matrix, so a layer costs two
        matrix products and a few elementwise ops instead of ``d`` autograd passes: for
        low-dimensional data the cheapest exact Jacobian (bench/bench_core.py). A per-row
        ``context`` gives every row its own gate (:meth:`ConcatSquashLinear.tangent_map`).
        """
        n, d = z.shape
        eye = torch.eye(d, dtype=z.dtype, device=z.device).expand(n, d, d)
        value, tangents = self._push(t, z, eye, context)
        return value, tangents.transpose(1, 2)

    def value_and_jvp(
        self, t: Tensor, z: Tensor, v: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``f(t, z)`` and the Jacobian-vector product ``J v`` (``v`` shaped like ``z``), by
        forward mode as :meth:`value_and_jacobian` with one tangent a row: Hutchinson's ``v^T J
        v`` without a backward pass inside the solve (:class:`~cnf.trace.HutchinsonTrace`)."""
        value, tangent = self._push(t, z, v.unsqueeze(1), context)
        return value, tangent.squeeze(1)

    def _push(
        self, t: Tensor, z: Tensor, tangents: Tensor, context: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The field at ``z`` and its Jacobian applied to ``tangents`` ``(n, k, d)``: ``(n, k,
        d)`` again, row ``[r, j]`` the derivative along ``tangents[r, j]``."""
        self.check_context(context, z.shape[0])
        tt = t.reshape(1, 1).to(z)
        h = z
        for i, layer in enumerate(self.layers):
            pre, tangents = layer.tangent_map(tt, h, tangents, context)
            if i == len(self.layers) - 1:
                return pre, tangents
            h, slope = _with_derivative(self.activation, pre)
            tangents = tangents * slope.unsqueeze(1)
        raise AssertionError("unreachable: the MLP has at least one layer")


def _check_widths(hidden: Sequence[int], context: int) -> None:
    if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in hidden):
        raise ValueError(f"hidden must hold positive integer widths, got {list(hidden)}")
    if not isinstance(context, int) or isinstance(context, bool) or context < 0:
        raise ValueError(f"context must be a width >= 0 (0: unconditional), got {context!r}")


class ConcatMLP(nn.Module):
    r"""A plain MLP that reads the time (and a conditional field's encoded context :math:`c`)
    once, concatenated to its input: :math:`f(t, z) = \mathrm{MLP}([z, t, c])`, the field of
    the peers' toy examples (Meta's flow_matching, TorchCFM), with plain linear layers.

    Arguments:
        dim: the data dimension (the output width; the input is ``dim + 1 + context`` wide).
        hidden: the hidden widths, e.g. ``(64, 64, 64)``.
        activation: a name from :data:`ACTIVATIONS`.
        context: the width of the encoded context of a conditional field, which then is called
            as ``f(t, z, context=c)`` (0: unconditional, ``f(t, z)``).

    Example:
        >>> f = ConcatMLP(2, hidden=(16, 16))
        >>> f(torch.tensor(0.5), torch.zeros(3, 2)).shape
        torch.Size([3, 2])
        >>> g = ConcatMLP(2, hidden=(16, 16), context=4)
        >>> g(torch.tensor(0.5), torch.zeros(3, 2), context=torch.ones(3, 4)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64, 64),
        *,
        activation: str = "tanh",
        context: int = 0,
    ) -> None:
        super().__init__()
        _check_widths(hidden, context)
        widths = [dim + 1 + context, *hidden, dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.activations = nn.ModuleList(make_activation(activation) for _ in hidden)
        self.activation = activation
        self.context_features = context

    check_context = ConcatSquashMLP.check_context  # the same contract

    def forward(self, t: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        """``t``: one time (a 0-d tensor) or one per row (shape ``(n,)``)."""
        self.check_context(context, z.shape[0])
        h = self._input(t, z, context)
        for layer, act in zip(self.layers[:-1], self.activations, strict=True):
            h = act(layer(h))
        return self.layers[-1](h)

    @staticmethod
    def _input(t: Tensor, z: Tensor, context: Tensor | None) -> Tensor:
        parts = [z, t.reshape(-1, 1).to(z).expand(len(z), 1)]
        return torch.cat(parts if context is None else [*parts, context.expand(len(z), -1)], 1)

    # forward mode as the ConcatSquash MLP's: its value_and_jacobian and value_and_jvp call
    # this _push, whose first layer sees the tangents through its weight's columns of z
    value_and_jacobian = ConcatSquashMLP.value_and_jacobian
    value_and_jvp = ConcatSquashMLP.value_and_jvp

    def _push(
        self, t: Tensor, z: Tensor, tangents: Tensor, context: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """As :meth:`ConcatSquashMLP._push`: ``f(t, z)`` and ``J`` applied to ``tangents`` ``(n,
        k, d)``."""
        self.check_context(context, z.shape[0])
        first, *rest = self.layers
        pre = first(self._input(t, z, context))
        tangents = tangents @ first.weight[:, : z.shape[1]].T
        for layer in rest:
            h, slope = _with_derivative(self.activation, pre)
            pre, tangents = layer(h), (tangents * slope.unsqueeze(1)) @ layer.weight.T
        return pre, tangents


# the fields of vector data by name: the model's ``mlp`` option
MLPS: dict[str, type[nn.Module]] = {"concatsquash": ConcatSquashMLP, "concat": ConcatMLP}


def make_mlp(
    name: str, dim: int, hidden: Sequence[int], *, activation: str, context: int = 0
) -> nn.Module:
    """The vector field ``name`` of :data:`MLPS`; unknown names list the valid ones."""
    if name not in MLPS:
        raise ValueError(f"unknown mlp {name!r}; valid choices: {list(MLPS)}")
    return MLPS[name](dim, hidden, activation=activation, context=context)


def check_field(field: object) -> nn.Module:
    """Validate a user vector field: an ``nn.Module``, so that its parameters can be found."""
    if not isinstance(field, nn.Module):
        raise TypeError(
            f"vector_field must be an nn.Module called as f(t, z), got {type(field).__name__}; "
            "wrap a function in a module whose forward(t, z) calls it"
        )
    return field
