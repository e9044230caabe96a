"""The U-Net vector field over whole images (flow matching's field), with the dropout whose
masks a training step draws from its own generator.

Every block normalizes each image on its own (GroupNorm) so that rows never interact, as a CNF
needs; the time enters every block through a sinusoidal embedding.

References:
    Ronneberger et al., "U-Net", MICCAI 2015 (arXiv:1505.04597). Ho et al., "Denoising Diffusion
    Probabilistic Models", NeurIPS 2020 (arXiv:2006.11239). Dhariwal and Nichol, "Diffusion
    Models Beat GANs on Image Synthesis", NeurIPS 2021 (arXiv:2105.05233).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class _TimeEmbedding(nn.Module):
    """Sinusoidal features of ``t`` (frequencies from 1 to 1000, as in transformers' positions),
    then a small MLP: one vector per sample."""

    def __init__(self, features: int, out: int) -> None:
        super().__init__()
        # computed on the CPU, then moved: on the meta device (model_shapes) linspace imports
        # torch._dynamo, a CPU second for a command that trains nothing (cnf eval, sample)
        steps = torch.linspace(0, math.log(1000), features // 2, device="cpu")
        self.register_buffer("freqs", torch.exp(steps).to(torch.get_default_device()))
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
    layers = _seeded_layers(module)
    for m in layers:
        m.draw = (generator, 0 if rows is None else rows[0], total)
    try:
        yield
    finally:
        for m in layers:
            m.draw = None


_SEEDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _seeded_layers(module: nn.Module) -> list[SeededDropout]:
    """``module``'s :class:`SeededDropout` layers, found once (a field's layers do not change;
    the search costs as much as a small field's step)."""
    found = _SEEDED.get(module)
    if found is None:
        found = _SEEDED[module] = [m for m in module.modules() if isinstance(m, SeededDropout)]
    return found


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
        context: the width of the encoded condition of a conditional field (0: none), which is
            then called as ``f(t, x, context=e)`` with ``e`` of shape ``(1 or n, context)``: a
            linear map of ``e`` is added to the time embedding of every block (the class
            embedding of Dhariwal and Nichol's class-conditional ADM U-Net and of TorchCFM's).

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
        context: int = 0,
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
        if not isinstance(context, int) or isinstance(context, bool) or context < 0:
            raise ValueError(f"U-Net context must be a width >= 0 (0: none), got {context!r}")
        self.resolutions, self.context_features = resolutions, context
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
        if context:  # registered last: an unconditional U-Net keeps its keys and their order
            self.condition = nn.Linear(context, emb)

    def check_size(self, height: int, width: int) -> None:
        factor = 2 ** (self.resolutions - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"a U-Net of {self.resolutions} resolutions halves the image "
                f"{self.resolutions - 1} times: {height}x{width} must be a multiple of {factor}; "
                "use fewer resolutions"
            )

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The field at time ``t`` (0-d, or one per row) on images ``x``; ``context``: the
        encoded condition ``(1 or n, context)`` of a conditional U-Net, else ``None``."""
        emb = self._embedding(t, len(x), context)
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

    def _embedding(self, t: Tensor, n: int, context: Tensor | None) -> Tensor:
        emb = self.embed(t, n)
        if (context is None) != (not self.context_features):
            raise ValueError(
                f"this U-Net was built with context={self.context_features} but was called "
                f"{'without' if context is None else 'with'} a context: build it with "
                "context=<the encoded width> to take one, or leave context out"
            )
        return emb if context is None else emb + self.condition(context.to(emb))
