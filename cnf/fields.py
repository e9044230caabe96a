"""Time-conditioned vector fields f(t, z) for neural ODEs and CNFs.

A vector field is any ``nn.Module`` called as ``f(t, z)`` with a scalar time tensor ``t`` and a
batch ``z`` of shape ``(n, *event_shape)``, returning a tensor of the same shape. Rows must not
interact (no batch norm): the CNF's density of one sample may not depend on the others.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
}


def make_activation(name: str) -> nn.Module:
    """Return a fresh activation module for ``name``; unknown names list the valid ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid choices: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class ConcatSquashLinear(nn.Module):
    r"""FFJORD's time-gated linear layer.

    .. math:: y = (W x + b) \odot \sigma(W_g t + b_g) + W_b t

    References:
        Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
        Generative Models", ICLR 2019 (arXiv:1810.01367).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(1, out_features)
        self.shift = nn.Linear(1, out_features, bias=False)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = t.reshape(1, 1).to(x)
        return self.linear(x) * torch.sigmoid(self.gate(tt)) + self.shift(tt)


class ConcatSquashMLP(nn.Module):
    """An MLP of :class:`ConcatSquashLinear` layers: the default CNF vector field.

    Arguments:
        dim: the data dimension (input and output width).
        hidden: the hidden widths, e.g. ``(64, 64, 64)``.
        activation: a name from :data:`ACTIVATIONS`. Smooth activations (tanh, softplus) keep the
            ODE smooth, which adaptive solvers reward with fewer steps.

    Example:
        >>> f = ConcatSquashMLP(2, hidden=(16, 16))
        >>> f(torch.tensor(0.5), torch.zeros(3, 2)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self, dim: int, hidden: Sequence[int] = (64, 64, 64), *, activation: str = "tanh"
    ) -> None:
        super().__init__()
        widths = [dim, *hidden, dim]
        if any(int(w) < 1 for w in widths):
            raise ValueError(f"layer widths must be positive integers, got {widths}")
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in itertools.pairwise(widths))
        self.activations = nn.ModuleList(make_activation(activation) for _ in hidden)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        for layer, act in zip(self.layers[:-1], self.activations, strict=True):
            z = act(layer(t, z))
        return self.layers[-1](t, z)


def check_field(field: object) -> nn.Module:
    """Validate a user vector field: an ``nn.Module``, so that its parameters can be found."""
    if not isinstance(field, nn.Module):
        raise TypeError(
            f"vector_field must be an nn.Module called as f(t, z), got {type(field).__name__}; "
            "wrap a function in a module whose forward(t, z) calls it"
        )
    return field
