r"""Trace estimators for the instantaneous change of variables.

Each estimator evaluates the vector field and ``Tr(df/dz)`` at one state in a single call, so the
solver pays one forward pass per function evaluation:

* :class:`ExactTrace` forms the per-sample Jacobian: by forward mode when the field provides
  ``value_and_jacobian(t, z)`` (as :class:`~cnf.fields.ConcatSquashMLP` does), else with
  ``torch.func.vmap(jacrev)`` (``D`` vector-Jacobian products, vectorized, no Python loop);
* :class:`HutchinsonTrace` estimates :math:`\epsilon^\top (\partial f / \partial z)\,
  \epsilon` with a probe :math:`\epsilon` drawn once per solve: by one Jacobian-vector product
  in forward mode when the field provides ``value_and_jvp(t, z, v)`` (as the MLPs of
  :mod:`cnf.fields` do), else by one vector-Jacobian product.

For a conditional field both take the encoded ``context`` (held fixed: it is not part of the
state) and differentiate with respect to the state only.

Both also return the squared Frobenius norm of the Jacobian (exact, or its Hutchinson estimate
:math:`\lVert J \epsilon \rVert^2` or :math:`\lVert \epsilon^\top J \rVert^2`, both unbiased),
the regularizer of RNODE.

References:
    Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
    smoothing splines", 1989. Grathwohl et al., FFJORD, ICLR 2019 (arXiv:1810.01367).
    Finlay et al., "How to train your neural ODE", ICML 2020 (arXiv:2002.02798).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from cnf.fields import call_field

if TYPE_CHECKING:
    from cnf.ode import ODEBlock

TRACES = ("auto", "exact", "hutchinson")
NOISES = ("rademacher", "gaussian")

# Above this many dimensions "auto" switches from the exact trace to Hutchinson's estimator
# (bench/bench_core.py: at d=10 an exact-trace iteration costs 2.3x a Hutchinson one).
AUTO_EXACT_MAX_DIM = 8


@dataclass(frozen=True)
class FieldEval:
    """The vector field at one state, with its Jacobian's trace and squared Frobenius norm."""

    value: Tensor
    trace: Tensor
    frobenius: Tensor | None = None


def event_sum(x: Tensor) -> Tensor:
    """The sum over every axis but the first (the batch): one number per sample."""
    return x.flatten(1).sum(1)


@runtime_checkable
class JacobianField(Protocol):
    """A vector field that gives its per-sample Jacobian with its value (by forward mode, as
    :class:`~cnf.fields.ConcatSquashMLP` does): the exact trace's fast path."""

    def value_and_jacobian(
        self, t: Tensor, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class TangentField(Protocol):
    """A vector field that gives ``J v`` with its value by forward mode (as
    :class:`~cnf.fields.ConcatSquashMLP` does): Hutchinson's estimate without a backward pass
    inside the solve, so that training backpropagates through forward operations only."""

    def value_and_jvp(
        self, t: Tensor, z: Tensor, v: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]: ...


class ExactTrace:
    """Exact ``Tr(df/dz)`` per sample from the full Jacobian (cost grows with the dimension)."""

    name = "exact"

    def __init__(self) -> None:
        self._vmap_failed = False

    def probe(self, z: Tensor, generator: torch.Generator | None = None) -> None:
        return None

    def __call__(
        self,
        field: nn.Module,
        t: Tensor,
        z: Tensor,
        probe: Tensor | None,
        frobenius: bool = False,
        context: Tensor | None = None,
    ) -> FieldEval:
        if isinstance(field, JacobianField) and z.ndim == 2:
            extra = {} if context is None else {"context": context}
            value, jac = field.value_and_jacobian(t, z, **extra)
            frob = jac.square().sum((1, 2)) if frobenius else None
            return FieldEval(value, jac.diagonal(dim1=1, dim2=2).sum(1), frob)
        if not self._vmap_failed:
            try:
                return self._vmapped(field, t, z, frobenius, context)
            except RuntimeError as err:  # fields with data-dependent control flow cannot be vmapped
                self._vmap_failed = True
                warnings.warn(
                    f"exact trace: torch.func.vmap failed on this vector field ({err}); "
                    "falling back to one vector-Jacobian product per dimension",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self._looped(field, t, z, frobenius, context)

    @staticmethod
    def _vmapped(
        field: nn.Module, t: Tensor, z: Tensor, frobenius: bool, context: Tensor | None
    ) -> FieldEval:
        per_row = context is not None and context.shape[0] > 1

        def one(zi: Tensor, ci: Tensor | None) -> tuple[Tensor, Tensor]:
            row_context = context if ci is None else ci.unsqueeze(0)
            out = call_field(field, t, zi.unsqueeze(0), row_context).squeeze(0)
            return out, out

        # a per-row context is mapped with its row; a shared one (or none) is closed over
        in_dims = (0, 0) if per_row else (0, None)
        jacobian = torch.func.jacrev(one, has_aux=True)
        jac, value = torch.func.vmap(jacobian, in_dims=in_dims)(z, context if per_row else None)
        n, dim = z.shape[0], z[0].numel()
        jac = jac.reshape(n, dim, dim)
        frob = jac.square().sum((1, 2)) if frobenius else None
        return FieldEval(value, jac.diagonal(dim1=1, dim2=2).sum(1), frob)

    @staticmethod
    def _looped(
        field: nn.Module, t: Tensor, z: Tensor, frobenius: bool, context: Tensor | None
    ) -> FieldEval:
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            zg = z if z.requires_grad else z.detach().requires_grad_(True)
            value = call_field(field, t, zg, context)
            flat = value.reshape(z.shape[0], -1)
            trace = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
            frob = torch.zeros_like(trace) if frobenius else None
            for i in range(flat.shape[1]):
                row = torch.autograd.grad(
                    flat[:, i].sum(), zg, create_graph=create_graph, retain_graph=True
                )[0].reshape(z.shape[0], -1)
                trace = trace + row[:, i]
                if frob is not None:
                    frob = frob + row.square().sum(1)
        return FieldEval(value, trace, frob)


class HutchinsonTrace:
    r"""Unbiased estimate :math:`\mathbb{E}_\epsilon[\epsilon^\top J \epsilon] = \mathrm{Tr}\,J`.

    Arguments:
        noise: ``"rademacher"`` (entries +-1, lower variance) or ``"gaussian"`` (standard normal).
    """

    name = "hutchinson"

    def __init__(self, noise: str = "rademacher") -> None:
        if noise not in NOISES:
            raise ValueError(f"unknown noise {noise!r}; valid choices: {list(NOISES)}")
        self.noise = noise

    def probe(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw one probe shaped like ``z``; the flow holds it fixed for the whole solve."""
        if self.noise == "gaussian":  # drawn in float64 so float32 and float64 solves share it
            draw = torch.randn(z.shape, generator=generator, dtype=torch.float64, device=z.device)
            return draw.to(z.dtype)
        bits = torch.randint(0, 2, z.shape, generator=generator, device=z.device)
        return bits.to(z.dtype) * 2 - 1

    def __call__(
        self,
        field: nn.Module,
        t: Tensor,
        z: Tensor,
        probe: Tensor | None,
        frobenius: bool = False,
        context: Tensor | None = None,
    ) -> FieldEval:
        if probe is None:
            raise ValueError("the Hutchinson estimator needs a probe: draw one with .probe(z)")
        if isinstance(field, TangentField) and z.ndim == 2:
            extra = {} if context is None else {"context": context}
            value, j_e = field.value_and_jvp(t, z, probe, **extra)  # J e, by forward mode
            frob = j_e.square().sum(1) if frobenius else None
            return FieldEval(value, (j_e * probe).sum(1), frob)
        value, vjp = torch.func.vjp(lambda zz: call_field(field, t, zz, context), z)
        (e_j,) = vjp(probe)
        frob = event_sum(e_j.square()) if frobenius else None
        return FieldEval(value, event_sum(e_j * probe), frob)


TraceEstimator = ExactTrace | HutchinsonTrace
# where a solve's probe comes from: given the estimator and the state, the probe (or None)
ProbeSource = Callable[[TraceEstimator, Tensor], Tensor | None]


class RowsOfBatch:
    """A probe source for part of a batch: rows ``start, start + 1, ...`` of a batch of
    ``total`` rows take their probes from a draw for the whole batch, so that a part sees what
    the whole batch would. Distributed training and evaluation give each process one for its
    share; each call draws afresh from ``generator`` (a flow of several blocks calls once per
    block, in order, on every process alike)."""

    def __init__(self, generator: torch.Generator | None, start: int, total: int) -> None:
        self.generator, self.start, self.total = generator, start, total

    def __call__(self, estimator: TraceEstimator, y: Tensor) -> Tensor | None:
        whole = estimator.probe(y.new_empty((self.total, *y.shape[1:])), self.generator)
        return None if whole is None else whole[self.start : self.start + len(y)]


class JointDynamics:
    """A CNF's joint dynamics, ``d/ds [z, a, (kinetic, jacobian)] = T [f, Tr J, (||f||^2,
    ||J||_F^2)]`` at ``t = sT``, for ``block``'s field and ``T``, with one fixed probe and one
    fixed encoded context for the whole solve, adjoint pass included."""

    def __init__(
        self,
        block: ODEBlock,
        estimator: TraceEstimator,
        probe: Tensor | None,
        regularize: bool,
        context: Tensor | None = None,
    ) -> None:
        self.block, self.estimator, self.probe = block, estimator, probe
        self.regularize, self.context = regularize, context

    def __call__(self, s: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        T, field = self.block.T, self.block.field
        extra = {} if self.context is None else {"context": self.context}  # unconditional: as ever
        ev = self.estimator(field, s * T, state[0], self.probe, self.regularize, **extra)
        out = (T * ev.value, T * ev.trace)
        if self.regularize:
            kinetic = ev.value.reshape(ev.value.shape[0], -1).square().sum(1)
            out = (*out, T * kinetic, T * ev.frobenius)
        return out


def make_trace(name: str, dim: int, noise: str = "rademacher") -> TraceEstimator:
    """Turn a trace name into an estimator; ``"auto"`` is exact up to :data:`AUTO_EXACT_MAX_DIM`."""
    if name not in TRACES:
        raise ValueError(f"unknown trace {name!r}; valid choices: {list(TRACES)}")
    if noise not in NOISES:
        raise ValueError(f"unknown noise {noise!r}; valid choices: {list(NOISES)}")
    if name == "exact" or (name == "auto" and dim <= AUTO_EXACT_MAX_DIM):
        return ExactTrace()
    return HutchinsonTrace(noise)
