r"""Conditions of a conditional CNF :math:`p(x \mid c)`: checked where they enter, then encoded
as the vector that the field's gate-and-shift hyper-network reads (:mod:`cnf.fields`).

* :class:`LabelContext`: integer class labels ``0..C-1`` through a learned embedding
  ``nn.Embedding(C + 1, embed)``;
* :class:`FeatureContext`: ``K`` continuous features, as they are.

Each also holds a learned *null* condition :math:`\varnothing` (the embedding's extra row ``C``;
a learned vector of ``K`` features), which the rows of a boolean ``drop`` mask take instead of
their own: a trainer drops conditions with it (condition dropout) and a guided sampler evaluates
the null field with it,

.. math:: \tilde f(t, z, c) = (1 + w)\, f(t, z, c) - w\, f(t, z, \varnothing).

The condition is fixed along the ODE: it is not part of the state, and the dynamics close over
its encoding, computed once per solve (the adjoint differentiates that encoding as one more
parameter: :meth:`cnf.ode.ODEBlock.integrate`).

References:
    Ho and Salimans, "Classifier-Free Diffusion Guidance", 2022 (arXiv:2207.12598).
"""

from __future__ import annotations

import inspect
import numbers

import torch
from torch import Tensor, nn

INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class ContextEncoder(nn.Module):
    """What both encoders share. ``encoder(context, n, drop)`` checks ``context`` for a batch of
    ``n`` rows and returns its encoding, shape ``(1, width)`` for one context for every row or
    ``(n, width)`` for one per row; the rows where ``drop`` (a boolean tensor ``(n,)``) is True
    take the null condition (the result then has ``n`` rows)."""

    width: int

    def forward(self, context: object, n: int, drop: Tensor | None = None) -> Tensor:
        encoded = self.encode(self.check(context, n))
        if drop is None:
            return encoded
        null = self.null(1)
        return torch.where(check_drop(drop, n, null.device)[:, None], null, encoded)

    def check(self, context: object, n: int) -> Tensor:
        """``context`` validated for ``n`` rows, as a tensor of 1 or ``n`` rows."""
        raise NotImplementedError

    def encode(self, context: Tensor) -> Tensor:
        """The encoding of checked contexts, one row per row of ``context``."""
        raise NotImplementedError

    def null(self, rows: int = 1) -> Tensor:
        """The encoded null condition, repeated for ``rows`` rows: ``(rows, width)``."""
        raise NotImplementedError

    def describe(self) -> str:
        """What the condition is, for messages and ``repr``."""
        raise NotImplementedError

    def expected(self, n: int) -> str:
        """The contexts accepted for ``n`` rows, for messages."""
        raise NotImplementedError


class LabelContext(ContextEncoder):
    """Class labels ``0..C-1``, each a learned row of an embedding whose extra row ``C`` is the
    null label.

    Arguments:
        num_classes: the number of classes ``C``.
        embed: the embedding width (the field's context width).

    Example:
        >>> encoder = LabelContext(3, embed=4)
        >>> encoder(2, 5).shape  # one label for all 5 rows
        torch.Size([1, 4])
        >>> encoder(torch.tensor([0, 2]), 2, drop=torch.tensor([False, True])).shape
        torch.Size([2, 4])
    """

    def __init__(self, num_classes: int, embed: int = 16) -> None:
        super().__init__()
        positive("num_classes", num_classes)
        positive("embed", embed)
        self.num_classes, self.width = num_classes, embed
        self.embedding = nn.Embedding(num_classes + 1, embed)

    def check(self, context: object, n: int) -> Tensor:
        device = self.embedding.weight.device
        if isinstance(context, numbers.Integral) and not isinstance(context, bool):
            context = torch.tensor(int(context), device=device)
        if not isinstance(context, Tensor):
            raise TypeError(
                f"context must be an int class label or an integer tensor of them, "
                f"got {type(context).__name__}: pass {self.expected(n)}"
            )
        if context.dtype not in INTEGER_DTYPES:
            raise TypeError(
                f"context must hold integer class labels in [0, {self.num_classes}), got dtype "
                f"{context.dtype}: convert whole-numbered labels with context.long()"
            )
        if context.ndim > 1 or (context.ndim == 1 and len(context) != n):
            raise ValueError(
                f"context of shape {tuple(context.shape)} does not fit {n} rows: "
                f"pass {self.expected(n)}"
            )
        same_device(context, device)
        bad = (context < 0) | (context >= self.num_classes)
        if bool(bad.any()):
            raise ValueError(
                f"context holds labels outside [0, {self.num_classes}): "
                f"{context[bad][:5].tolist()}; this flow has {self.num_classes} classes"
            )
        return context.reshape(-1)

    def encode(self, context: Tensor) -> Tensor:
        return self.embedding(context)

    def null(self, rows: int = 1) -> Tensor:
        return self.embedding.weight[self.num_classes :].expand(rows, -1)

    def describe(self) -> str:
        return f"num_classes={self.num_classes}, embed={self.width}"

    def expected(self, n: int) -> str:
        return f"one label in 0..{self.num_classes - 1} (an int or 0-d tensor) or {n} of them"


class FeatureContext(ContextEncoder):
    """``K`` continuous features, which the field reads as they are; the null condition is a
    learned vector of ``K`` features (zero at first).

    Arguments:
        features: the number of features ``K``.

    Example:
        >>> encoder = FeatureContext(2)
        >>> encoder(torch.ones(3, 2), 3, drop=torch.tensor([True, False, False]))
        tensor([[0., 0.],
                [1., 1.],
                [1., 1.]], grad_fn=<WhereBackward0>)
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        positive("context", features)
        self.features = self.width = features
        self.null_features = nn.Parameter(torch.zeros(features))

    def check(self, context: object, n: int) -> Tensor:
        dtype, K = self.null_features.dtype, self.features
        if not isinstance(context, Tensor):
            raise TypeError(
                f"context must be a torch.Tensor of {K} features, got "
                f"{type(context).__name__}: convert with torch.as_tensor(context, "
                f"dtype={dtype})"
            )
        if context.dtype != dtype:
            hint = " (for class labels build the flow with num_classes=)"
            raise TypeError(
                f"context has dtype {context.dtype} but the flow's parameters are "
                f"{dtype}: call context.to({dtype}){hint}"
            )
        if tuple(context.shape) not in ((K,), (n, K)):
            raise ValueError(
                f"context of shape {tuple(context.shape)} does not fit {n} rows: "
                f"pass {self.expected(n)}"
            )
        same_device(context, self.null_features.device)
        if not bool(torch.isfinite(context).all()):
            raise ValueError("context has NaN or inf values: drop or impute them first")
        return context.reshape(-1, K)

    def encode(self, context: Tensor) -> Tensor:
        return context

    def null(self, rows: int = 1) -> Tensor:
        return self.null_features.expand(rows, -1)

    def describe(self) -> str:
        return f"context={self.features}"

    def expected(self, n: int) -> str:
        return f"a tensor of shape ({self.features},) for every row or ({n}, {self.features})"


def make_context_encoder(
    context: int | None = None, num_classes: int | None = None, embed: int = 16
) -> ContextEncoder | None:
    """The encoder of ``context`` continuous features or of ``num_classes`` labels (not both);
    ``None`` for an unconditional flow."""
    if context is not None and num_classes is not None:
        raise ValueError(
            f"give context= (continuous features) or num_classes= (class labels), not both: "
            f"got context={context!r}, num_classes={num_classes!r}"
        )
    if num_classes is not None:
        return LabelContext(num_classes, embed)
    return None if context is None else FeatureContext(context)


def encode_context(
    encoder: ContextEncoder | None, context: object, n: int, drop: Tensor | None = None
) -> Tensor | None:
    """The encoded condition of a batch of ``n`` rows (``None`` for an unconditional flow), with
    the messages for a condition missing where the flow needs one and given where it has none."""
    if encoder is None:
        if context is None and drop is None:
            return None
        given = f"shape {tuple(context.shape)}" if isinstance(context, Tensor) else repr(context)
        raise ValueError(
            f"context: this flow is unconditional but got context {given[:80]}"
            f"{' and drop' if drop is not None else ''}; leave them out, or build "
            "CNF(dim, context=K) or CNF(dim, num_classes=C) to model p(x | c)"
        )
    if context is None:
        raise ValueError(
            f"context is missing: this flow models p(x | c) ({encoder.describe()}); "
            f"pass context= {encoder.expected(n)}"
        )
    return encoder(context, n, drop)


def check_field_context(field: nn.Module, width: int) -> None:
    """Refuse a vector field that cannot take a flow's encoded context of ``width`` (0: an
    unconditional flow, whose field must not expect one)."""
    built = getattr(field, "context_features", None)
    if isinstance(built, int) and built != width:
        raise ValueError(
            f"vector_field was built with context={built} but the flow's context encodes to "
            f"width {width}: build the field with context={width}"
        )
    if not width:
        return
    parameters = inspect.signature(field.forward).parameters.values()
    if not any(p.name == "context" or p.kind is p.VAR_KEYWORD for p in parameters):
        raise TypeError(
            f"vector_field {type(field).__name__} takes no context, but a conditional flow calls "
            "it as f(t, z, context=c): give its forward a context argument"
        )


def check_drop(drop: object, n: int, device: torch.device) -> Tensor:
    """``drop``: a boolean tensor ``(n,)``, True where a row takes the null condition."""
    if not isinstance(drop, Tensor) or drop.dtype != torch.bool:
        kind = drop.dtype if isinstance(drop, Tensor) else type(drop).__name__
        raise TypeError(
            f"drop must be a boolean tensor of shape ({n},), got {kind}: True "
            "where a row takes the null condition"
        )
    if tuple(drop.shape) != (n,):
        raise ValueError(f"drop must have shape ({n},), one flag per row, got {tuple(drop.shape)}")
    same_device(drop, device, "drop")
    return drop


def same_device(x: Tensor, device: torch.device, name: str = "context") -> None:
    if x.device != device:
        raise ValueError(
            f"{name} is on {x.device} but the flow is on {device}: call {name}.to('{device}')"
        )


def positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
