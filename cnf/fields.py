"""Time-conditioned vector fields f(t, z) for neural ODEs and CNFs.

A vector field is any ``nn.Module`` called as ``f(t, z)`` with a scalar time tensor ``t`` and a
batch ``z`` of shape ``(n, *event_shape)``, returning a tensor of the same shape. Rows must not
interact (no batch norm): the CNF's density of one sample may not depend on the others.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

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
        """``t``: one time (a 0-d tensor) or one per row of ``x`` (shape ``(n,)``, as flow
        matching evaluates the field)."""
        tt = t.reshape(-1, 1).to(x)
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
        if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in hidden):
            raise ValueError(f"hidden must hold positive integer widths, got {list(hidden)}")
        widths = [dim, *hidden, dim]
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in itertools.pairwise(widths))
        self.activations = nn.ModuleList(make_activation(activation) for _ in hidden)
        self.activation = activation

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        for layer, act in zip(self.layers[:-1], self.activations, strict=True):
            z = act(layer(t, z))
        return self.layers[-1](t, z)

    def value_and_jacobian(self, t: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """``f(t, z)`` and its Jacobian ``J[n, i, j] = df_i/dz_j`` by forward mode.

        The value ``(n, width)`` and the ``d`` tangents ``(n, d, width)`` go through each layer
        together, with the time gate folded into the (small) weight matrix, so a layer costs two
        matrix products and a few elementwise ops instead of ``d`` autograd passes: for
        low-dimensional data the cheapest exact Jacobian (bench/bench_core.py).
        """
        n, d = z.shape
        tt = t.reshape(1, 1).to(z)
        h = z
        tangents = torch.eye(d, dtype=z.dtype, device=z.device).expand(n, d, d)
        for i, layer in enumerate(self.layers):
            gate = torch.sigmoid(layer.gate(tt)).squeeze(0)  # (out,)
            weight = layer.linear.weight * gate[:, None]  # diag(gate) W
            bias = layer.linear.bias * gate + layer.shift(tt).squeeze(0)
            pre = torch.addmm(bias, h, weight.T)
            tangents = tangents @ weight.T
            if i == len(self.layers) - 1:
                return pre, tangents.transpose(1, 2)
            h, slope = _with_derivative(self.activation, pre)
            tangents = tangents * slope.unsqueeze(1)
        raise AssertionError("unreachable: the MLP has at least one layer")


class ConcatConv2d(nn.Module):
    """FFJORD's ``concat`` layer for images: time enters as one more input channel filled with
    ``t``, then a convolution (``3x3``, padding 1: the image size is kept)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 1, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = t.reshape(-1, 1, 1, 1).to(x).expand(x.shape[0], 1, *x.shape[2:])
        return self.conv(torch.cat([tt, x], 1))


class ConcatSquashConv2d(nn.Module):
    r"""The convolutional :class:`ConcatSquashLinear`: a time gate and shift per output channel.

    .. math:: y = (W * x + b) \odot \sigma(w_g t + b_g) + w_b t
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.gate = nn.Linear(1, out_channels)
        self.shift = nn.Linear(1, out_channels, bias=False)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = t.reshape(-1, 1).to(x)  # one time, or one per image
        gate = torch.sigmoid(self.gate(tt))[:, :, None, None]
        return self.conv(x) * gate + self.shift(tt)[:, :, None, None]


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
        activation: a name from :data:`ACTIVATIONS` (FFJORD uses softplus).

    Example:
        >>> f = ConvField(2, hidden=(8, 8))
        >>> f(torch.tensor(0.5), torch.zeros(3, 2, 4, 4)).shape
        torch.Size([3, 2, 4, 4])
    """

    def __init__(
        self,
        channels: int,
        hidden: Sequence[int] = (64, 64, 64),
        *,
        layer: str = "concatsquash",
        activation: str = "softplus",
    ) -> None:
        super().__init__()
        if layer not in CONV_LAYERS:
            raise ValueError(f"unknown conv layer {layer!r}; valid choices: {list(CONV_LAYERS)}")
        widths = [channels, *hidden, channels]
        if any(int(w) < 1 for w in widths):
            raise ValueError(f"channel widths must be positive integers, got {widths}")
        make = CONV_LAYERS[layer]
        self.layers = nn.ModuleList(make(a, b) for a, b in itertools.pairwise(widths))
        self.activations = nn.ModuleList(make_activation(activation) for _ in hidden)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        for layer, act in zip(self.layers[:-1], self.activations, strict=True):
            z = act(layer(t, z))
        return self.layers[-1](t, z)


class _TimeEmbedding(nn.Module):
    """Sinusoidal features of ``t`` (frequencies from 1 to 1000, as in transformers' positions),
    then a small MLP: one vector per sample."""

    def __init__(self, features: int, out: int) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(1000), features // 2)))
        self.mlp = nn.Sequential(
            nn.Linear(2 * (features // 2), out), nn.SiLU(), nn.Linear(out, out)
        )

    def forward(self, t: Tensor, n: int) -> Tensor:
        angles = t.reshape(-1, 1).to(self.freqs) * self.freqs
        features = torch.cat([angles.sin(), angles.cos()], 1).expand(n, -1)
        return self.mlp(features)


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm normalizes each image on its own: rows never interact, as a CNF needs
    return nn.GroupNorm(math.gcd(8, channels), channels)


class SeededDropout(nn.Module):
    """Dropout whose masks a training step can draw from its own generator, as one draw for
    the whole batch of which this call sees rows ``start:start + n`` (:func:`seeded_dropout`):
    so a run's masks follow from ``(seed, iteration)`` like the rest of its noise, a resumed run
    repeats them, and a process of a distributed run drops what one process would for those
    rows. Outside such a step it is ``nn.functional.dropout`` (the global generator); in eval
    mode it is the identity."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)
        self.draw: tuple[torch.Generator, int, int] | None = None  # generator, start, total

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if self.draw is None:
            return nn.functional.dropout(x, self.p, training=True)
        gen, start, total = self.draw
        u = torch.rand((total, *x.shape[1:]), generator=gen, device=x.device)
        keep = (u[start : start + len(x)] >= self.p).to(x.dtype)
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


@contextmanager
def seeded_dropout(
    module: nn.Module, generator: torch.Generator, rows: tuple[int, int] | None, total: int
) -> Iterator[None]:
    """Within the block, every :class:`SeededDropout` of ``module`` draws its masks from
    ``generator``, for a batch of ``total`` rows of which the calls see ``rows = (start,
    stop)`` (``None``: all of them)."""
    layers = [m for m in module.modules() if isinstance(m, SeededDropout)]
    for m in layers:
        m.draw = (generator, 0 if rows is None else rows[0], total)
    try:
        yield
    finally:
        for m in layers:
            m.draw = None


class _ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, plus the time embedding as a per-channel shift, then GroupNorm,
    SiLU, dropout (in training only, as in Ho et al.'s DDPM), 3x3 conv; with a 1x1 skip where
    the width changes. With ``scale_shift`` the embedding instead scales and shifts the second
    GroupNorm's output, ``norm(h) * (1 + s) + b`` (Dhariwal and Nichol's adaptive GroupNorm)."""

    def __init__(
        self,
        inputs: int,
        outputs: int,
        embedding: int,
        dropout: float = 0.0,
        scale_shift: bool = False,
    ) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(inputs), nn.Conv2d(inputs, outputs, 3, padding=1)
        self.scale_shift = scale_shift
        self.time = nn.Linear(embedding, 2 * outputs if scale_shift else outputs)
        self.norm2, self.conv2 = _norm(outputs), nn.Conv2d(outputs, outputs, 3, padding=1)
        self.skip = nn.Identity() if inputs == outputs else nn.Conv2d(inputs, outputs, 1)
        self.act = nn.SiLU()
        self.dropout = SeededDropout(dropout)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        time = self.time(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = time.chunk(2, 1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + time)
        return self.conv2(self.dropout(self.act(h))) + self.skip(x)


class UNet(nn.Module):
    """A small time-conditioned U-Net: the vector field over a whole image for flow matching
    (Lipman et al. 2023 use a larger one of the same kind).

    ``resolutions`` levels (the image, then halved ``resolutions - 1`` times by average pooling),
    ``depth`` residual blocks at each on the way down and up, with skip connections across, and
    ``width * 2**level`` channels; the time enters every block through a sinusoidal embedding.
    The last convolution starts at zero: the untrained flow is the identity.

    Arguments:
        channels: the image channels (input and output).
        width: channels at full resolution.
        resolutions: levels of the U (the image's height and width must halve that many times
            less one).
        depth: residual blocks per level and direction.
        dropout: the dropout rate inside every residual block while training (0: none); a
            regularizer for small datasets (flow matching's regression). Evaluation (``eval()``:
            every likelihood, sample and validity check) and every ODE solve, a
            maximum-likelihood step's included, never drop: the field is deterministic.
        scale_shift: condition every block on the time by a per-channel scale and shift of its
            normalized features (adaptive GroupNorm, as in Dhariwal and Nichol's ADM U-Net and
            TorchCFM's ``use_scale_shift_norm``) instead of the default shift before the norm.

    Example:
        >>> f = UNet(1, width=8, resolutions=2)
        >>> f(torch.tensor(0.5), torch.zeros(3, 1, 8, 8)).shape
        torch.Size([3, 1, 8, 8])
    """

    def __init__(
        self,
        channels: int,
        *,
        width: int = 32,
        resolutions: int = 2,
        depth: int = 1,
        dropout: float = 0.0,
        scale_shift: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("width", width), ("resolutions", resolutions), ("depth", depth)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"U-Net {name} must be a positive integer, got {value!r}")
        numeric = isinstance(dropout, int | float) and not isinstance(dropout, bool)
        if not numeric or not 0 <= dropout < 1:
            raise ValueError(f"U-Net dropout must be in [0, 1), got {dropout!r}")
        if not isinstance(scale_shift, bool):
            raise ValueError(f"U-Net scale_shift must be True or False, got {scale_shift!r}")
        self.resolutions = resolutions
        emb = 4 * width
        self.embed = _TimeEmbedding(width, emb)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        widths = [width * 2**level for level in range(resolutions)]
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        previous = width

        def block(inputs: int, outputs: int) -> _ResBlock:
            return _ResBlock(inputs, outputs, emb, dropout, scale_shift)

        for w in widths:
            self.down.append(nn.ModuleList(block(previous if i == 0 else w, w)
                                           for i in range(depth)))  # fmt: skip
            previous = w
        self.middle = block(previous, previous)
        for w in reversed(widths):
            self.up.append(nn.ModuleList(block(previous + w if i == 0 else w, w)
                                         for i in range(depth)))  # fmt: skip
            previous = w
        self.out = nn.Sequential(_norm(previous), nn.SiLU(), nn.Conv2d(previous, channels, 3,
                                                                        padding=1))  # fmt: skip
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def check_size(self, height: int, width: int) -> None:
        factor = 2 ** (self.resolutions - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"a U-Net of {self.resolutions} resolutions halves the image "
                f"{self.resolutions - 1} times: {height}x{width} must be a multiple of {factor}; "
                "use fewer resolutions"
            )

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        emb = self.embed(t, len(x))
        h, skips = self.inp(x), []
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if level < self.resolutions - 1:
                h = nn.functional.avg_pool2d(h, 2)
        h = self.middle(h, emb)
        for level, blocks in enumerate(self.up):
            if level > 0:
                h = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
            h = torch.cat([h, skips.pop()], 1)
            for block in blocks:
                h = block(h, emb)
        return self.out(h)


def check_field(field: object) -> nn.Module:
    """Validate a user vector field: an ``nn.Module``, so that its parameters can be found."""
    if not isinstance(field, nn.Module):
        raise TypeError(
            f"vector_field must be an nn.Module called as f(t, z), got {type(field).__name__}; "
            "wrap a function in a module whose forward(t, z) calls it"
        )
    return field
