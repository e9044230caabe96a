"""The image fields' own settings: :class:`ConvConfig` (FFJORD's stack of convolutions) and
:class:`UNetConfig` (a time-conditioned U-Net), one of which a
:class:`~cnf.multiscale.MultiscaleCNF` takes as its ``field``; each builds its field."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from cnf import options
from cnf.conv_fields import CONV_LAYERS, ConvField
from cnf.fields import UNet
from cnf.options import listed, option


@dataclass(frozen=True)
class ConvConfig:
    """FFJORD's convolutional field (:class:`~cnf.conv_fields.ConvField`); its widths and activation
    are the model's ``hidden`` and ``activation``."""

    kind: ClassVar[str] = "conv"
    layer: str = option("concatsquash", f"convolution of the field: {listed(CONV_LAYERS)}")

    def __post_init__(self) -> None:
        options.choice("layer", self.layer, tuple(CONV_LAYERS))

    def build(
        self, shape: Sequence[int], hidden: Sequence[int], activation: str, context: int = 0
    ) -> nn.Module:
        """The field for images of ``shape`` ``(C, H, W)``; ``context``: the width of a
        conditional model's encoded condition, which every layer takes (0: none)."""
        return ConvField(
            shape[0], hidden=hidden, layer=self.layer, activation=activation, context=context
        )


@dataclass(frozen=True)
class UNetConfig:
    """A time-conditioned U-Net (:class:`~cnf.fields.UNet`), the field of the single-scale
    model that flow matching trains; it ignores the model's ``hidden`` and ``activation``."""

    kind: ClassVar[str] = "unet"
    width: int = option(32, "channels at full resolution (doubled per level)")
    resolutions: int = option(2, "levels of the U (the image halves one less time)")
    depth: int = option(1, "residual blocks per level and direction")
    dropout: float = option(
        0.0,
        "dropout rate in the residual blocks while training (a regularizer for small datasets; "
        "never in evaluation)",
    )
    scale_shift: bool = option(
        False,
        "the time scales and shifts each block's normalized features (ADM's conditioning) "
        "instead of only shifting them before the norm",
    )

    def __post_init__(self) -> None:
        options.finite_floats(self)
        options.booleans(self)
        for name in ("width", "resolutions", "depth"):
            options.integer(name, getattr(self, name), 1, "a positive integer")
        if not options.is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise options.ConfigError("dropout", f"must be in [0, 1), got {self.dropout!r}")

    def build(
        self, shape: Sequence[int], hidden: Sequence[int], activation: str, context: int = 0
    ) -> nn.Module:
        """The field for images of ``shape`` ``(C, H, W)`` (their height and width checked);
        ``context``: the width of a conditional model's encoded condition (0: none)."""
        unet = UNet(shape[0], width=self.width, resolutions=self.resolutions, depth=self.depth,
                    dropout=self.dropout, scale_shift=self.scale_shift,
                    context=context)  # fmt: skip
        unet.check_size(shape[1], shape[2])
        return unet


FieldConfig = ConvConfig | UNetConfig
FIELD_CONFIGS: dict[str, type[ConvConfig] | type[UNetConfig]] = {
    "conv": ConvConfig,
    "unet": UNetConfig,
}


def as_field_config(value: FieldConfig | str) -> FieldConfig:
    """A field config, or its kind's name for its defaults (``"unet"``)."""
    if isinstance(value, str):
        options.choice("field", value, tuple(FIELD_CONFIGS))
        return FIELD_CONFIGS[value]()
    if not isinstance(value, ConvConfig | UNetConfig):
        raise TypeError(
            f"field must be a ConvConfig, a UNetConfig or one of {list(FIELD_CONFIGS)}, got "
            f"{type(value).__name__}"
        )
    return value
