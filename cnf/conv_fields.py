"""Time-conditioned convolutional vector fields on images ``(n, C, H, W)``: FFJORD's image
``ODEnet`` (:class:`ConvField`) and its layers. The U-Net of flow matching is in
:mod:`cnf.unet`; the fields of vector data in :mod:`cnf.fields`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cnf.fields import ConcatSquashMLP, make_activation


class ConcatConv2d(nn.Module):
    """FFJORD's ``concat`` layer for images: time enters as one more input channel filled with
    ``t``, then a convolution (``3x3``, padding 1: the image size is kept).

    A conditional layer (``context > 0``) adds ``S c`` to each output channel: what more input
    channels filled with the encoded context ``c`` would add, without their zero padding at the
    border.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, context: int = 0
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 1, out_channels, kernel_size, padding=kernel_size // 2)
        if context > 0:
            self.context_shift = nn.Linear(context, out_channels, bias=False)

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        tt = t.reshape(-1, 1, 1, 1).to(x).expand(x.shape[0], 1, *x.shape[2:])
        y = self.conv(torch.cat([tt, x], 1))
        return y if context is None else y + self.context_shift(context)[:, :, None, None]


class ConcatSquashConv2d(nn.Module):
    r"""The convolutional :class:`~cnf.fields.ConcatSquashLinear`: a gate and shift per output
    channel, of the time and, for a conditional layer, of the encoded context :math:`c`:

    .. math:: y = (W * x + b) \odot \sigma(G [t, c] + g) + S [t, c]

    The context's columns (``context_gate``, ``context_shift``) exist only for ``context > 0``,
    so an unconditional layer keeps its parameters exactly.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, context: int = 0
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.gate = nn.Linear(1, out_channels)
        self.shift = nn.Linear(1, out_channels, bias=False)
        if context > 0:
            self.context_gate = nn.Linear(context, out_channels, bias=False)
            self.context_shift = nn.Linear(context, out_channels, bias=False)

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        tt = t.reshape(-1, 1).to(x)  # one time, or one per image
        gate, shift = self.gate(tt), self.shift(tt)
        if context is not None:  # (1 or n, width): one condition for every image, or one each
            gate, shift = gate + self.context_gate(context), shift + self.context_shift(context)
        return self.conv(x) * torch.sigmoid(gate)[:, :, None, None] + shift[:, :, None, None]


CONV_LAYERS: dict[str, type[nn.Module]] = {
    "concatsquash": ConcatSquashConv2d,
    "concat": ConcatConv2d,
}


class ConvField(nn.Module):
    """A time-conditioned convolutional vector field on images ``(n, C, H, W)``: FFJORD's image
    ``ODEnet``, a stack of ``3x3`` convolutions that keep the image size.

    Arguments:
        channels: the image channels (input and output).
        hidden: the hidden channel widths, e.g. ``(64, 64, 64)`` (FFJORD's ``--dims``).
        layer: ``"concatsquash"`` (time-gated, :class:`ConcatSquashConv2d`) or ``"concat"``
            (time as an input channel, :class:`ConcatConv2d`, FFJORD's image default).
        activation: a name from :data:`~cnf.fields.ACTIVATIONS` (FFJORD uses softplus).
        context: the width of the encoded condition of a conditional field, which then is
            called as ``f(t, z, context=e)`` with ``e`` of shape ``(1 or n, context)``: every
            layer shifts its channels by it, and a ``concatsquash`` layer gates them too
            (0: unconditional, ``f(t, z)``, with FFJORD's parameters exactly).

    Example:
        >>> f = ConvField(2, hidden=(8, 8))
        >>> f(torch.tensor(0.5), torch.zeros(3, 2, 4, 4)).shape
        torch.Size([3, 2, 4, 4])
        >>> g = ConvField(2, hidden=(8, 8), context=5)
        >>> g(torch.tensor(0.5), torch.zeros(3, 2, 4, 4), context=torch.ones(1, 5)).shape
        torch.Size([3, 2, 4, 4])
    """

    def __init__(
        self,
        channels: int,
        hidden: Sequence[int] = (64, 64, 64),
        *,
        layer: str = "concatsquash",
        activation: str = "softplus",
        context: int = 0,
    ) -> None:
        super().__init__()
        if layer not in CONV_LAYERS:
            raise ValueError(f"unknown conv layer {layer!r}; valid choices: {list(CONV_LAYERS)}")
        widths = [channels, *hidden, channels]
        if any(int(w) < 1 for w in widths):
            raise ValueError(f"channel widths must be positive integers, got {widths}")
        if not isinstance(context, int) or isinstance(context, bool) or context < 0:
            raise ValueError(f"context must be a width >= 0 (0: unconditional), got {context!r}")
        make = CONV_LAYERS[layer]
        self.layers = nn.ModuleList(
            make(a, b, context=context) for a, b in itertools.pairwise(widths)
        )
        self.activations = nn.ModuleList(make_activation(activation) for _ in hidden)
        self.context_features = context

    check_context = ConcatSquashMLP.check_context  # the same contract as the MLP's

    def forward(self, t: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        self.check_context(context, z.shape[0])
        for layer, act in zip(self.layers[:-1], self.activations, strict=True):
            z = act(layer(t, z, context))
        return self.layers[-1](t, z, context)
