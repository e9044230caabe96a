r"""CNFs on tabular data: a fixed affine layer in front of the flow, densities in original units.

Columns of a table come in arbitrary units (millimetres next to thousands of dollars), while the
flow's base is a standard normal. :class:`Normalizer` maps the data to
:math:`u = W (x - m)`, with :math:`m` the training mean and :math:`W` either
:math:`\mathrm{diag}(1/\sigma)` (``"standardize"``: training standard deviations) or the inverse
Cholesky factor of the training covariance (``"whiten"``: the flow starts at the identity, so
the untrained model is the full-covariance Gaussian fit). :math:`W` is lower triangular, so
the change of variables is

.. math:: \log p_X(x) = \log p_U(u) + \log\lvert\det W\rvert
    = \log p_U(u) + \sum_i \log\lvert W_{ii}\rvert,

with :math:`\sum_i \log W_{ii} = -\sum_i \log \sigma_i` for standardization. :class:`TabularCNF`
adds this term to every log-density, so reported NLLs are in the original units of the data
(scaling a column by :math:`c > 0` changes every row's NLL by exactly :math:`\log c`) and
samples come back in those units. The statistics are buffers fitted on the training split only
(:meth:`TabularCNF.fit_preprocessing`) and saved in the state dict, so a checkpoint reloads them.

Traces: training uses the flow's ``trace`` (``"auto"``: exact up to
:data:`cnf.trace.AUTO_EXACT_MAX_DIM` dimensions, Hutchinson above); in eval mode, log-densities use
the exact trace up to :data:`EXACT_EVAL_MAX_DIM` dimensions, so reported NLLs carry no estimator
noise (one forward-mode Jacobian per function evaluation: affordable without a backward pass).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cnf.flow import CNF, FlowResult
from cnf.solvers import Solver

PREPROCESS = ("standardize", "whiten", "none")
# which columns a table's normalizer takes the log of first: none, or every column positive on
# the training rows (the model's support is then x > 0 in those columns)
LOG_COLUMNS = ("none", "positive")

# In eval mode, log-densities up to this dimension use the exact trace (covers every bundled and
# MAF set: digits 64, BSDS300 63); above it, the flow's own (Hutchinson) estimate.
EXACT_EVAL_MAX_DIM = 64


class Normalizer(nn.Module):
    """The fixed map ``u = (y - loc) @ weight.T`` with ``weight`` lower triangular, where ``y``
    is ``x`` with the log taken of the columns in ``log_mask`` (none unless ``log``).

    Arguments:
        dim: the number of columns.
        kind: ``"standardize"``, ``"whiten"`` or ``"none"`` (identity).
        log: ``"none"``, or ``"positive"``: :meth:`fit` takes the log of every column whose
            training values are all positive (skewed positive measurements, sizes or
            concentrations, are nearer a Gaussian on that scale). Rows with a value at or below
            zero in such a column lie outside the model's support (density zero).

    Example:
        >>> norm = Normalizer(2)
        >>> norm.fit(np.array([[0.0, 10.0], [2.0, 30.0]]))
        >>> norm(torch.tensor([[1.0, 20.0]]))
        tensor([[0., 0.]])
        >>> round(norm.logdet.item(), 4)  # -log(1) - log(10)
        -2.3026
    """

    def __init__(self, dim: int, kind: str = "standardize", log: str = "none") -> None:
        super().__init__()
        if kind not in PREPROCESS:
            raise ValueError(f"unknown preprocess {kind!r}; valid choices: {list(PREPROCESS)}")
        if log not in LOG_COLUMNS:
            raise ValueError(f"unknown log_columns {log!r}; valid choices: {list(LOG_COLUMNS)}")
        self.kind, self.log = kind, log
        self.register_buffer("loc", torch.zeros(dim))
        # the identity, written so that the meta device (model_shapes) needs no torch.eye,
        # which there imports torch._dynamo: a CPU second for cnf eval, sample, plot, animate
        self.register_buffer("weight", torch.zeros(dim, dim).fill_diagonal_(1.0))
        self.register_buffer("log_mask", torch.zeros(dim, dtype=torch.bool))
        self.has_log = False  # log_mask.any(), kept on the host: no device read per batch

    def fit(self, x: np.ndarray | Tensor) -> None:
        """Set the log columns and the statistics from training rows ``x`` (in float64)."""
        x = torch.as_tensor(np.asarray(x, dtype=np.float64))
        if x.ndim != 2 or x.shape[1] != len(self.loc) or len(x) < 2:
            raise ValueError(
                f"expected at least 2 rows of {len(self.loc)} columns, got {tuple(x.shape)}"
            )
        self.log_mask.copy_((x > 0).all(0) if self.log == "positive" else False)
        self.has_log = bool(self.log_mask.any())
        x = self._logs(x)
        weight = torch.eye(x.shape[1], dtype=torch.float64)
        loc = x.mean(0) if self.kind != "none" else torch.zeros(x.shape[1], dtype=torch.float64)
        if self.kind == "standardize":
            weight = torch.diag(1 / _nonzero_std(x.std(0, correction=0)))
        elif self.kind == "whiten":
            weight = _inverse_cholesky(torch.cov(x.T, correction=0).reshape(x.shape[1], -1))
        self.loc.copy_(loc)
        self.weight.copy_(weight)

    @property
    def logdet(self) -> Tensor:
        """The affine part's ``log|det du/dy| = sum_i log|W_ii|`` (``W`` is triangular)."""
        return self.weight.diagonal().abs().log().sum()

    def log_jacobian(self, x: Tensor) -> Tensor:
        """``log|det du/dx|`` per row: :attr:`logdet`, less ``log x_j`` for each log column."""
        if not self.has_log:
            return self.logdet.expand(x.shape[:-1])
        return self.logdet - x[..., self.log_mask].log().sum(-1)

    def inside(self, x: Tensor) -> Tensor | None:
        """Which rows lie in the support (positive in every log column); ``None``: all rows
        do, as without log columns."""
        if not self.has_log:
            return None
        return (x[..., self.log_mask] > 0).all(-1)

    def _logs(self, x: Tensor) -> Tensor:
        if not self.has_log:
            return x
        return torch.where(self.log_mask, torch.where(self.log_mask, x, 1).log(), x)

    def forward(self, x: Tensor) -> Tensor:
        return (self._logs(x) - self.loc) @ self.weight.T

    def inverse(self, u: Tensor) -> Tensor:
        """``y = W^{-1} u + loc`` by a triangular solve, then ``exp`` of the log columns."""
        y = torch.linalg.solve_triangular(self.weight, u.T, upper=False).T + self.loc
        return torch.where(self.log_mask, y.exp(), y) if self.has_log else y

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints from before log columns: none of their columns had one
        state_dict.setdefault(prefix + "log_mask", torch.zeros_like(self.log_mask))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.has_log = bool(self.log_mask.any())


def _outside(x: Tensor, mask: Tensor) -> tuple[int, int]:
    """The first row, and its column, at or below zero in a log column."""
    bad = (x <= 0) & mask
    row = int(bad.any(-1).nonzero()[0])
    return row, int(bad[row].nonzero()[0])


def _nonzero_std(std: Tensor) -> Tensor:
    """Training standard deviations; a zero one (a column constant on the training rows, which
    :class:`~cnf.data.columns.ColumnPlan` drops first) would make the map singular."""
    if bool((std <= 0).any()):
        cols = (std <= 0).nonzero().flatten().tolist()
        raise ValueError(
            f"columns {cols} are constant on the training rows: drop them (cnf.data.tabular."
            "ColumnPlan does) before fitting the standardization"
        )
    return std


def _inverse_cholesky(cov: Tensor) -> Tensor:
    """``L^{-1}`` with ``cov = L L^T``. A singular covariance gets a growing ridge (from 1e-9 of
    the mean variance): the map is then only nearly whitening, but its log-det stays exact."""
    eye = torch.eye(len(cov), dtype=cov.dtype)
    ridge = 0.0
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(cov + ridge * eye)
        if int(info) == 0:
            return torch.linalg.solve_triangular(chol, eye, upper=False)
        ridge = 100 * ridge or 1e-9 * float(cov.diagonal().mean().clamp_min(1e-300))
    raise ValueError(
        "the training covariance is not positive definite: use preprocess='standardize'"
    )


class TabularCNF(CNF):
    """A :class:`~cnf.flow.CNF` behind a fixed :class:`Normalizer`: log-densities, latents and
    samples are all in the data's original units.

    Arguments:
        dim: the number of columns.
        preprocess: ``"standardize"`` (default), ``"whiten"`` or ``"none"``.
        log_columns: ``"none"`` (default) or ``"positive"``: the log of every column positive on
            the training rows is taken before ``preprocess`` (:class:`Normalizer`); rows at or
            below zero in such a column then have density zero (``log_prob`` is ``-inf``).
        **kwargs: those of :class:`~cnf.flow.CNF` (``hidden``, ``trace``, solvers, ...).

    The default field's last layer starts at zero, so the untrained flow is the identity and the
    untrained model is a Gaussian: ``N(m, diag(sigma^2))`` after standardization, the
    maximum-likelihood full-covariance Gaussian after whitening. Training starts from that fit
    (and early stopping can only improve on it on the validation data).
    :meth:`trajectory` (inherited) runs in the normalized coordinates ``u``.

    Example:
        >>> flow = TabularCNF(3, hidden=(8,), solver=Solver("rk4", step_size=0.5))
        >>> flow.fit_preprocessing(np.random.default_rng(0).normal(5.0, 100.0, (50, 3)))
        >>> flow.sample(4).shape
        torch.Size([4, 3])
    """

    def __init__(self, dim: int, *, preprocess: str = "standardize", log_columns: str = "none",
                 **kwargs: Any) -> None:  # fmt: skip
        default_field = kwargs.get("vector_field") is None
        super().__init__(dim, **kwargs)
        self.normalizer = Normalizer(self.dim, preprocess, log_columns)
        if self.context_features:  # features of p(x | c) are standardized the same way
            self.context_normalizer = Normalizer(self.context_features, "standardize")
        if default_field:  # start at the identity flow: the Gaussian of the normalizer's fit
            for p in self.field.layers[-1].parameters():
                nn.init.zeros_(p)

    preprocessed = True

    def fit_preprocessing(self, x: np.ndarray | Tensor, context: Any = None) -> None:
        """Fit the normalizer on the training rows (never on validation or test data), and a
        conditional flow's feature standardization on their conditions."""
        self.normalizer.fit(x)
        if self.context_features and context is not None:
            self.context_normalizer.fit(context)

    def encode_context(self, context: object, n: int, drop: Tensor | None = None):
        """Features standardized as the training conditions were, then encoded (a condition of
        the wrong shape is left to the encoder's check, which says what it expects)."""
        width = (self.context_features,)
        if self.context_features and isinstance(context, Tensor) and context.shape[-1:] == width:
            context = self.context_normalizer(context)
        return super().encode_context(context, n, drop)

    def field_coordinates(self, x: Tensor) -> Tensor:
        """The normalized coordinates ``u`` in which the field moves the data."""
        return self.normalizer(self.check_input(x, "x"))

    def to_latent(self, x: Tensor, **kwargs: Any) -> FlowResult:
        """Data (original units) to latents; ``logdet`` includes the normalizer's. In eval mode,
        a row outside the support of a model with log columns is refused (``log_prob`` gives it
        ``-inf``); training rows are inside by the rule that chose the columns."""
        x = self.check_input(x, "x")
        inside = None if self.training else self.normalizer.inside(x)
        if inside is not None and not bool(inside.all()):
            row, col = _outside(x, self.normalizer.log_mask)
            raise ValueError(
                f"row {row} has {x[row, col].item():g} in column {col}, which this model takes "
                "the log of (log_columns='positive': positive on every training row): it lies "
                "outside the support; log_prob gives such rows -inf, or fit with "
                "log_columns='none'"
            )
        out = super().to_latent(self.normalizer(x), **kwargs)
        return dataclasses.replace(out, logdet=out.logdet + self.normalizer.log_jacobian(x))

    def to_data(self, z: Tensor, **kwargs: Any) -> FlowResult:
        """Latents to data in original units; ``logdet = log|det dx/dz|``."""
        out = super().to_data(z, **kwargs)
        x = self.normalizer.inverse(out.value)
        return dataclasses.replace(
            out, value=x, logdet=out.logdet - self.normalizer.log_jacobian(x)
        )

    def log_prob(self, x: Tensor, **kwargs: Any) -> Tensor:
        """``log p(x)`` in original units (``-inf`` for rows outside the support of a model
        with log columns); exact trace in eval mode up to :data:`EXACT_EVAL_MAX_DIM`
        dimensions unless ``trace`` is given."""
        if not self.training and kwargs.get("trace") is None and self.dim <= EXACT_EVAL_MAX_DIM:
            kwargs["trace"] = "exact"
        inside = None if self.training else self.normalizer.inside(self.check_input(x, "x"))
        if inside is None or bool(inside.all()):
            return super().log_prob(x, **kwargs)
        out = x.new_full(x.shape[:1], -math.inf)
        if bool(inside.any()):  # the rest, with their conditions
            context = kwargs.get("context")
            if isinstance(context, Tensor) and context.shape[:1] == x.shape[:1]:
                kwargs["context"] = context[inside]
            out[inside] = super().log_prob(x[inside], **kwargs)
        return out

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        solver: Solver | None = None,
        context: object = None,
        drop: Tensor | None = None,
    ) -> Tensor:
        """``n`` samples in the data's original units (given ``context`` for p(x | c))."""
        z = super().sample(n, generator=generator, solver=solver, context=context, drop=drop)
        return self.normalizer.inverse(z)

    def extra_repr(self) -> str:
        log = f", log_columns={self.normalizer.log!r}" if self.normalizer.log != "none" else ""
        return f"{super().extra_repr()}, preprocess={self.normalizer.kind!r}{log}"
