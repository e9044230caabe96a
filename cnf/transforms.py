r"""Fixed bijections with exact log-determinants: the non-learned steps of an image flow.

Each transform maps a batch ``(n, *event_shape)`` and returns the image together with
``log|det J|`` per sample; ``forward`` goes towards the latent, ``inverse`` towards the data and
returns the log-determinant of *its* Jacobian, so that ``forward`` then ``inverse`` adds up to 0.

* :class:`Dequantization`: dequantized pixel values :math:`x \in [0, L)^D` (integers plus uniform
  noise) to :math:`y = x / L \in [0, 1)^D`, :math:`\log\lvert\det\rvert = -D \log L`.
* :class:`Logit`: :math:`y \mapsto \mathrm{logit}(\alpha + (1 - 2\alpha) y)`, FFJORD's squashing
  of :math:`[0, 1]` onto the real line.
* :class:`Center`: :math:`y \mapsto y - 1/2`, FFJORD's choice when no logit is used.
* :class:`Squeeze`: space-to-depth, ``(C, H, W) -> (4C, H/2, W/2)``, a permutation (log-det 0).

References:
    Dinh et al., "Density estimation using Real NVP", ICLR 2017 (arXiv:1605.08803).
    Theis et al., "A note on the evaluation of generative models", ICLR 2016 (arXiv:1511.01844).
    Grathwohl et al., "FFJORD", ICLR 2019 (arXiv:1810.01367).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cnf.trace import event_sum


def _event_dim(x: Tensor) -> int:
    return math.prod(x.shape[1:])


class Dequantization(nn.Module):
    r"""Uniform dequantization of ``levels``-valued pixels, and the rescaling to the unit cube.

    Pixels :math:`k \in \{0, \dots, L-1\}^D` become continuous by adding
    :math:`u \sim U[0, 1)^D` (:meth:`noise`). A density :math:`p` of :math:`x = k + u` then bounds
    the discrete likelihood from below, :math:`\log P(k) \ge \mathbb{E}_u \log p(k + u)`, so its
    NLL in these integer units, divided by :math:`D \log 2`, is an upper bound on the bits per
    dimension of the data (Theis et al. 2016).

    The bijection itself is the rescaling :math:`y = x / L`, with
    :math:`\log\lvert\det \partial y / \partial x\rvert = -D \log L`.

    Arguments:
        levels: the number of pixel values ``L`` (256 for 8-bit images, 17 for sklearn's digits).

    Example:
        >>> deq = Dequantization(17)
        >>> y, logdet = deq(torch.full((2, 1, 8, 8), 16.5))
        >>> round(float(y.max()), 4), round(float(logdet[0]), 3), round(-64 * math.log(17), 3)
        (0.9706, -181.326, -181.326)
    """

    def __init__(self, levels: int) -> None:
        super().__init__()
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 2:
            raise ValueError(f"levels must be an integer >= 2 (pixel values), got {levels!r}")
        self.levels = levels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = -_event_dim(x) * math.log(self.levels)
        return x / self.levels, x.new_full((x.shape[0],), logdet)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        logdet = _event_dim(y) * math.log(self.levels)
        return y * self.levels, y.new_full((y.shape[0],), logdet)

    @staticmethod
    def noise(pixels: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``pixels + u`` with ``u ~ U[0, 1)``: integer pixel values made continuous (float)."""
        x = pixels if pixels.is_floating_point() else pixels.float()
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return x + u

    def quantize(self, x: Tensor) -> Tensor:
        """The pixel values ``floor(x)`` clamped to ``0..levels-1`` (undoes :meth:`noise`)."""
        return x.floor().clamp(0, self.levels - 1)


class Logit(nn.Module):
    r"""FFJORD's logit transform :math:`y = \mathrm{logit}(s)`, :math:`s = \alpha + (1 - 2\alpha)
    x`, which maps :math:`[0, 1]` into :math:`[\mathrm{logit}\,\alpha, \mathrm{logit}(1-\alpha)]`.

    .. math:: \log\left\lvert\frac{\partial y}{\partial x}\right\rvert
        = \sum_i \log(1 - 2\alpha) - \log s_i - \log(1 - s_i).

    Arguments:
        alpha: in ``(0, 1/2)``; keeps the logit finite at 0 and 1 (FFJORD: ``1e-6``).
    """

    def __init__(self, alpha: float = 1e-6) -> None:
        super().__init__()
        if not isinstance(alpha, int | float) or not 0 < alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {alpha!r}")
        self.alpha = float(alpha)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.alpha + (1 - 2 * self.alpha) * x
        log_s, log_1ms = torch.log(s), torch.log1p(-s)
        logdet = _event_dim(x) * math.log1p(-2 * self.alpha) - event_sum(log_s + log_1ms)
        return log_s - log_1ms, logdet

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)
        log_ds = nn.functional.logsigmoid(y) + nn.functional.logsigmoid(-y)  # log s(1 - s)
        return x, event_sum(log_ds) - _event_dim(y) * math.log1p(-2 * self.alpha)

    def domain(self) -> tuple[float, float]:
        """The open interval of ``x`` on which the transform is finite."""
        return -self.alpha / (1 - 2 * self.alpha), (1 - self.alpha) / (1 - 2 * self.alpha)


class Center(nn.Module):
    """``y = x - 1/2`` (log-det 0): FFJORD's input transform for images when no logit is used."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x - 0.5, x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return y + 0.5, y.new_zeros(y.shape[0])

    def domain(self) -> tuple[float, float]:
        return -math.inf, math.inf


def squeeze(x: Tensor) -> Tensor:
    """Space-to-depth: ``(n, C, H, W) -> (n, 4C, H/2, W/2)``, each 2x2 patch into channels."""
    if x.ndim != 4 or x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(
            f"squeeze needs a batch of images (n, C, H, W) with even H and W, got {tuple(x.shape)}"
        )
    return nn.functional.pixel_unshuffle(x, 2)


def unsqueeze(x: Tensor) -> Tensor:
    """Depth-to-space, the inverse of :func:`squeeze`: ``(n, 4C, H, W) -> (n, C, 2H, 2W)``."""
    if x.ndim != 4 or x.shape[1] % 4:
        raise ValueError(
            f"unsqueeze needs images (n, C, H, W) with C a multiple of 4, got {tuple(x.shape)}"
        )
    return nn.functional.pixel_shuffle(x, 2)


class Squeeze(nn.Module):
    """:func:`squeeze` as a transform: a permutation of the coordinates, so log-det 0.

    Example:
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> y, logdet = Squeeze()(x)
        >>> y.shape, y[0, :, 0, 0].tolist(), float(logdet[0])
        (torch.Size([1, 4, 2, 2]), [0.0, 1.0, 4.0, 5.0], 0.0)
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return squeeze(x), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return unsqueeze(y), y.new_zeros(y.shape[0])
