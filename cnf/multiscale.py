r"""Multiscale CNFs for images, in the manner of FFJORD's (after RealNVP's multiscale design).

The data are dequantized pixel values :math:`x \in [0, L)^{C \times H \times W}` (integers plus
uniform noise, see :class:`~cnf.transforms.Dequantization`). The map to the latent is

1. :math:`y = x / L` (log-det :math:`-D \log L`), then the logit transform
   :math:`\mathrm{logit}(\alpha + (1 - 2\alpha) y)` (or :math:`y - 1/2` with ``alpha=0``);
2. per scale: ``blocks`` CNFs with convolutional fields at the current size; unless it is the
   last scale, a squeeze ``(c, h, w) -> (4c, h/2, w/2)``, ``blocks`` more CNFs, and half of the
   channels factored out (they go straight to the base distribution);
3. the factored-out halves and the last scale's output reassembled (by the inverse squeezes) into
   a latent :math:`z` of the data's own shape, with base :math:`\mathcal{N}(0, I)`.

Every step is a bijection with an exact log-determinant (the CNFs' up to the trace estimator), so

.. math:: \log p(x) = \log \mathcal{N}(z; 0, I) - D \log L + \log\lvert\det J_{\rm logit}\rvert
    + \sum_{\rm blocks} \int_0^T \mathrm{Tr}\,\frac{\partial f}{\partial z}\,dt,

the density of :math:`x` in integer pixel units. Its NLL in bits per dimension is
:math:`-\log p(x) / (D \log 2)` (:func:`cnf.evaluate.bits_per_dim`).

References:
    Grathwohl et al., "FFJORD", ICLR 2019 (arXiv:1810.01367), ``lib/layers/odenvp.py``.
    Dinh et al., "Density estimation using Real NVP", ICLR 2017 (arXiv:1605.08803).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cnf.field_configs import FieldConfig, as_field_config
from cnf.flow import CNF, Flow, FlowResult
from cnf.solvers import NFE, Solver
from cnf.trace import ProbeSource
from cnf.transforms import Center, Dequantization, Logit, squeeze, unsqueeze


def max_scales(height: int, width: int) -> int:
    """FFJORD's number of scales: one per halving while the image is at least 4x4 (3 for 28x28
    and 32x32, 2 for 8x8)."""
    n = 0
    while height >= 4 and width >= 4:
        n, height, width = n + 1, height // 2, width // 2
    return n


class _Scale(nn.Module):
    """The CNFs of one scale: ``pre`` at the incoming size, ``post`` after the squeeze (empty
    on the last scale, which neither squeezes nor factors out)."""

    def __init__(self, pre: list[CNF], post: list[CNF]) -> None:
        super().__init__()
        self.pre, self.post = nn.ModuleList(pre), nn.ModuleList(post)

    @property
    def squeezes(self) -> bool:
        return len(self.post) > 0


class _Sum:
    """Adds up the log-determinant and regularizers of the steps of one pass."""

    def __init__(self, logdet: Tensor) -> None:
        self.logdet, self.kinetic, self.jacobian = logdet, None, None

    def add(self, out: FlowResult) -> Tensor:
        self.logdet = self.logdet + out.logdet
        if out.kinetic is not None:
            self.kinetic = out.kinetic if self.kinetic is None else self.kinetic + out.kinetic
            self.jacobian = out.jacobian if self.jacobian is None else self.jacobian + out.jacobian
        return out.value


class MultiscaleCNF(Flow, nn.Module):
    r"""A multiscale continuous normalizing flow on images of dequantized pixels; ``log_prob`` is
    the density in integer pixel units (its log-det includes the rescaling to ``[0, 1]``).

    Arguments:
        event_shape: the image shape ``(C, H, W)``; ``H`` and ``W`` must halve ``scales - 1``
            times.
        levels: the number of pixel values ``L`` (256 for 8-bit images).
        scales: the number of scales; ``None`` for FFJORD's rule (:func:`max_scales`).
        blocks: CNFs per stage (FFJORD's ``--num_blocks``): each scale but the last runs
            ``blocks`` CNFs, squeezes, and runs ``blocks`` more.
        alpha: the logit transform's ``alpha`` (FFJORD: ``1e-6``); 0 replaces the logit by
            ``y - 1/2``, as FFJORD does.
        hidden: the widths of every block's convolutional field
            (:class:`~cnf.conv_fields.ConvField`).
        activation: that field's activation.
        field: every block's field: a :class:`~cnf.field_configs.ConvConfig` (FFJORD's stack of
            convolutions, of widths ``hidden``), a :class:`~cnf.field_configs.UNetConfig` (a
            U-Net over the whole image: the field of a single-scale model, ``scales=1,
            blocks=1``, trained by flow matching), or the name of either for its defaults.
        trace: the trace estimator (Hutchinson by default).
        noise: the Hutchinson probe (Rademacher by default).
        T: every block's integration time, as in :class:`~cnf.flow.CNF`.
        learn_T: make ``T`` trained, as in :class:`~cnf.flow.CNF`.
        solver: every block's training solver, as in :class:`~cnf.flow.CNF`.
        eval_solver: every block's evaluation solver, as in :class:`~cnf.flow.CNF`.
        num_classes: model :math:`p(x \mid c)` for class labels ``c`` in ``0..C-1``, as in
            :class:`~cnf.flow.CNF`: every block is conditional on the same label (each through
            its own embedding of width ``embed``), which its field takes (either kind).
        context: model :math:`p(x \mid c)` for ``K`` continuous features, likewise.
        embed: the labels' embedding width.

    Every map, density and sample of a conditional model takes ``context=`` and ``drop=`` as in
    :class:`~cnf.flow.CNF`, and passes them to every block.

    Example:
        >>> flow = MultiscaleCNF((1, 8, 8), levels=17, blocks=1, hidden=(8,),
        ...                      solver=Solver("rk4", step_size=0.5))
        >>> x = flow.sample(3)
        >>> x.shape, flow.log_prob(x).shape
        (torch.Size([3, 1, 8, 8]), torch.Size([3]))
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        *,
        levels: int = 256,
        scales: int | None = None,
        blocks: int = 2,
        alpha: float = 1e-6,
        hidden: Sequence[int] = (64, 64, 64),
        activation: str = "softplus",
        trace: str = "hutchinson",
        noise: str = "rademacher",
        T: float = 1.0,
        learn_T: bool = False,
        solver: Solver | Mapping[str, Any] | None = None,
        eval_solver: Solver | Mapping[str, Any] | None = None,
        field: FieldConfig | str = "conv",
        num_classes: int | None = None,
        context: int | None = None,
        embed: int = 16,
    ) -> None:
        super().__init__()
        field = as_field_config(field)
        self.num_classes, self.context_features = num_classes, context
        encoded = embed if num_classes is not None else context or 0
        self.event_shape = _image_shape(event_shape)
        channels, height, width = self.event_shape
        self.dim = math.prod(self.event_shape)
        scales = _check_scales(scales, height, width)
        if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
            raise ValueError(f"blocks must be a positive integer (CNFs per stage), got {blocks!r}")
        self.levels = levels
        self.dequantization = Dequantization(levels)
        self.squash = Logit(alpha) if alpha else Center()

        def cnfs(c: int, h: int, w: int) -> list[CNF]:
            block = dict(trace=trace, noise=noise, T=T, learn_T=learn_T, solver=solver,
                         eval_solver=eval_solver, num_classes=num_classes, context=context,
                         embed=embed)  # fmt: skip
            return [CNF((c, h, w), field.build((c, h, w), hidden, activation, encoded), **block)
                    for _ in range(blocks)]  # fmt: skip

        stages = []
        c, h, w = channels, height, width
        for i in range(scales):
            last = i == scales - 1
            stages.append(_Scale(cnfs(c, h, w), [] if last else cnfs(4 * c, h // 2, w // 2)))
            c, h, w = 2 * c, h // 2, w // 2
        self.scales = nn.ModuleList(stages)

    def extra_repr(self) -> str:
        first = self.ode_blocks()[0]
        return (
            f"event_shape={self.event_shape}, levels={self.levels}, scales={len(self.scales)}, "
            f"blocks={len(self.ode_blocks())}, trace={first.estimator.name!r}, "
            f"solver={first.solver.describe()}, eval_solver={first.eval_solver.describe()}"
        )

    def ode_blocks(self) -> list[CNF]:
        """Every CNF block, in the order data meet them."""
        return [b for s in self.scales for b in (*s.pre, *s.post)]

    @property
    def solver(self) -> Solver:
        """The training solver, shared by every block (change it with :meth:`set_solver`)."""
        return self.ode_blocks()[0].solver

    @property
    def eval_solver(self) -> Solver:
        return self.ode_blocks()[0].eval_solver

    @property
    def nfe(self) -> NFE:
        """Function evaluations of the latest pass, summed over the blocks (``backward`` fills in
        after ``.backward()`` under the adjoint)."""
        counts = [b.nfe for b in self.ode_blocks()]
        return NFE(sum(c.forward for c in counts), sum(c.backward for c in counts))

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
        """``n`` images of continuous pixel values (no traces integrated), of ``p(x | context)``
        for a conditional model; ``quantize`` them with ``self.dequantization.quantize``."""
        z = self._base_noise(n, generator)
        return self._decode(z, solver=solver, logdet=False, context=context, drop=drop).value

    # --- maps -----------------------------------------------------------------------------

    def to_latent(
        self,
        x: Tensor,
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
        """Map images to latents of the same shape; ``logdet = log|det dz/dx|`` summed over every
        step (without the blocks' traces with ``logdet=False``), ``kinetic`` and ``jacobian``
        over every block (with ``regularize``).

        Keywords as in :meth:`cnf.CNF.to_latent`; ``generator`` draws every block's probe, and
        every block sees the same ``context`` and ``drop``.
        """
        x = self.check_input(x, "x")
        y, ld_dequant = self.dequantization(x)
        self._check_domain(y)
        y, ld = self.squash(y)
        acc = _Sum(ld_dequant + ld)
        kw = dict(solver=solver, trace=trace, generator=generator, regularize=regularize,
                  probes=probes, logdet=logdet, context=context, drop=drop)  # fmt: skip
        factored = []
        for scale in self.scales:
            for block in scale.pre:
                y = acc.add(block.to_latent(y, **kw))
            if scale.squeezes:
                y = squeeze(y)
                for block in scale.post:
                    y = acc.add(block.to_latent(y, **kw))
                y, out = y.chunk(2, 1)
                factored.append(out)
        for out in reversed(factored):
            y = unsqueeze(torch.cat([y, out], 1))
        return FlowResult(y, acc.logdet, acc.kinetic, acc.jacobian)

    def field_coordinates(self, x: Tensor) -> Tensor:
        """Images in the coordinates the field sees (``x / L``, then the logit): where flow
        matching regresses, for a single-scale model (one block)."""
        if len(self.ode_blocks()) != 1:
            raise ValueError("a multiscale model's blocks see different coordinates: flow "
                             "matching needs one block (scales=1, blocks=1)")  # fmt: skip
        y, _ = self.dequantization(self.check_input(x, "x"))
        self._check_domain(y)
        return self.squash(y)[0]

    def to_data(
        self,
        z: Tensor,
        *,
        solver: Solver | None = None,
        trace: str | None = None,
        generator: torch.Generator | None = None,
        logdet: bool = True,
        context: object = None,
        drop: Tensor | None = None,
    ) -> FlowResult:
        """Map latents to images; ``logdet = log|det dx/dz|``. Keywords as in :meth:`to_latent`."""
        z = self.check_input(z, "z")
        return self._decode(z, solver=solver, trace=trace, generator=generator, logdet=logdet,
                            context=context, drop=drop)  # fmt: skip

    def _decode(
        self,
        z: Tensor,
        *,
        solver: Solver | None = None,
        trace: str | None = None,
        generator: torch.Generator | None = None,
        logdet: bool = True,
        context: object = None,
        drop: Tensor | None = None,
    ) -> FlowResult:
        factored, y = [], z
        for _ in self.scales[:-1]:  # undo the reassembly: the halves each scale factored out
            y, out = squeeze(y).chunk(2, 1)
            factored.append(out)
        acc = _Sum(z.new_zeros(z.shape[0]))

        def invert(blocks: nn.ModuleList, y: Tensor) -> Tensor:
            for block in reversed(blocks):
                if logdet:
                    y = acc.add(block.to_data(y, solver=solver, trace=trace, generator=generator,
                                              context=context, drop=drop))  # fmt: skip
                else:
                    c = block.encode_context(context, len(y), drop)
                    y = block.solve_states(y, block.times(y, reverse=True), solver, c)[-1]
            return y

        for i in reversed(range(len(self.scales))):
            scale = self.scales[i]
            if scale.squeezes:
                y = unsqueeze(invert(scale.post, torch.cat([y, factored[i]], 1)))
            y = invert(scale.pre, y)
        y, ld = self.squash.inverse(y)
        x, ld2 = self.dequantization.inverse(y)
        return FlowResult(x, acc.logdet + ld + ld2)

    # --- checks ---------------------------------------------------------------------------

    def _like(self) -> Tensor:
        return self.ode_blocks()[0].log_T

    def check_input(self, x: Tensor, name: str) -> Tensor:
        """Validate a batch of images: shape ``(n, C, H, W)``, the model's dtype and device,
        finite (see :meth:`cnf.CNF.check_input`)."""
        return self.ode_blocks()[0].check_input(x, name)

    def _check_domain(self, y: Tensor) -> None:
        low, high = self.squash.domain()
        if math.isinf(low) or y.numel() == 0:
            return
        lo, hi = torch.stack(torch.aminmax(y.detach())).tolist()  # one device sync per pass
        if not (low < lo and hi < high):
            L = self.levels
            raise ValueError(
                f"x has values in [{lo * L:.4g}, {hi * L:.4g}], outside the model's support "
                f"({low * L:.4g}, {high * L:.4g}): the model takes dequantized pixel values, the "
                f"integers 0..{L - 1} plus uniform noise in [0, 1) (Dequantization.noise); "
                f"images scaled to [0, 1] must be multiplied by {L} first"
            )


def _image_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(shape)
    if len(shape) != 3 or any(not isinstance(d, int) or isinstance(d, bool) or d < 1
                              for d in shape):  # fmt: skip
        raise ValueError(f"event_shape must be an image shape (C, H, W), got {shape!r}")
    return shape  # type: ignore[return-value]


def _check_scales(scales: int | None, height: int, width: int) -> int:
    if scales is None or scales == 0:
        return max(1, min(max_scales(height, width), _fitting_scales(height, width)))
    if not isinstance(scales, int) or isinstance(scales, bool) or scales < 1:
        raise ValueError(f"scales must be a positive integer or None (automatic), got {scales!r}")
    factor = 2 ** (scales - 1)
    if height % factor or width % factor:
        raise ValueError(
            f"{scales} scales squeeze {scales - 1} times, so the image's height and width must be "
            f"multiples of {factor}, got {height}x{width}: use scales <= "
            f"{_fitting_scales(height, width)}"
        )
    return scales


def _fitting_scales(height: int, width: int) -> int:
    n = 1
    while height % 2 == 0 and width % 2 == 0:
        n, height, width = n + 1, height // 2, width // 2
    return n
