r"""Neural ODE layers: :class:`ODEBlock`, the continuous-depth replacement of a residual block.

A residual block :math:`h + f(h)` is one Euler step of :math:`dh/dt = f(t, h)`; an ODE block
integrates that equation from :math:`t = 0` to :math:`T` with an ODE solver instead.

Time is rescaled to :math:`s = t / T \in [0, 1]` and the solver integrates
:math:`dh/ds = T\, f(sT, h)`, so :math:`T` is an ordinary parameter of the dynamics. A learnable
:math:`T` therefore receives its exact gradient under direct backpropagation and under the adjoint
alike (FFJORD's learnable end time was cut from the graph).

References:
    Chen et al., "Neural Ordinary Differential Equations", NeurIPS 2018 (arXiv:1806.07366).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from cnf.fields import call_field, check_field
from cnf.solvers import NFE, Solver, as_solver, check_finite

DEFAULT_SOLVER = Solver("dopri5", atol=1e-5, rtol=1e-5)


class ODEBlock(nn.Module):
    """Integrates ``dh/dt = field(t, h)`` from 0 to ``T`` and returns ``h(T)``.

    Arguments:
        field: an ``nn.Module`` called as ``field(t, h)`` returning a tensor shaped like ``h``.
        T: the integration time (positive).
        learn_T: make ``T`` a parameter (kept positive as ``exp(log_T)``).
        solver: the training :class:`~cnf.solvers.Solver` (or a dict of its fields); default
            dopri5 at atol = rtol = 1e-5.
        eval_solver: the solver used in ``eval()`` mode; by default the training solver without
            the adjoint.

    The block owns its solvers; :meth:`set_solver` changes them (the trainer's step adaptation
    does so through it).

    Example:
        >>> from cnf.fields import ConcatSquashMLP
        >>> block = ODEBlock(ConcatSquashMLP(3, (8,)), solver=Solver("rk4", step_size=0.25))
        >>> block(torch.zeros(4, 3)).shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        field: nn.Module,
        *,
        T: float = 1.0,
        learn_T: bool = False,
        solver: Solver | Mapping[str, Any] | None = None,
        eval_solver: Solver | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.field = check_field(field)
        if not isinstance(T, int | float) or not math.isfinite(T) or T <= 0:
            raise ValueError(f"T must be a positive finite number, got {T!r}")
        log_T = torch.tensor(math.log(T), dtype=torch.get_default_dtype())
        if learn_T:
            self.log_T = nn.Parameter(log_T)
        else:
            self.register_buffer("log_T", log_T)
        self.solver = as_solver(solver, DEFAULT_SOLVER)
        self.eval_solver = as_solver(
            eval_solver, self.solver.replace(adjoint=False, seminorm=False)
        )
        self._nfe = NFE()

    def set_solver(self, solver: Solver | None = None, *, eval_solver: Solver | None = None):
        """Replace the training solver, the evaluation solver, or both."""
        if solver is not None:
            self.solver = as_solver(solver, self.solver)
        if eval_solver is not None:
            self.eval_solver = as_solver(eval_solver, self.eval_solver)

    @property
    def T(self) -> Tensor:
        """The integration time as a 0-d tensor (differentiable when learnable)."""
        return self.log_T.exp()

    @property
    def nfe(self) -> NFE:
        """Function evaluations of the latest solve; ``backward`` updates after ``.backward()``."""
        return self._nfe

    def active_solver(self, solver: Solver | None = None) -> Solver:
        """``solver`` if given, else the training solver in train mode and the eval one in eval."""
        if solver is not None:
            return solver
        return self.solver if self.training else self.eval_solver

    def integrate(
        self,
        dynamics: Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, ...]],
        y0: tuple[Tensor, ...],
        t: Tensor,
        solver: Solver | None = None,
        *,
        context: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        """Solve ``dynamics`` (written in rescaled time ``s``) through the times ``t`` in
        ``[0, T]``; return the states at every time, each with a leading time axis.

        ``context`` is a tensor the dynamics close over (a conditional CNF's encoded condition,
        fixed along the solve, not part of the state). Under the adjoint it joins the parameters
        whose gradients the adjoint pass integrates (:meth:`dynamics_parameters`), so that its
        gradient, and through it the encoder's parameters' and a continuous context's own, is
        the direct one.
        """
        solver = self.active_solver(solver)
        T = self.T.detach()
        s = (t.to(y0[0]) / T).to(y0[0].dtype)
        params = self.dynamics_parameters()
        if context is not None and context.requires_grad:
            params = (*params, context)
        states, self._nfe = solver.solve(dynamics, y0, s, params, time_scale=float(T))
        check_finite([x[-1] for x in states], solver)
        return states

    def dynamics_parameters(self) -> tuple[Tensor, ...]:
        """The parameters the dynamics read, whose gradients the adjoint pass integrates: here
        all of the block's. A parameter that reaches them only through ``integrate``'s
        ``context`` must be left out: the adjoint would count its gradient twice, once directly
        and once through the context's."""
        return tuple(self.parameters())

    def dynamics(
        self, s: Tensor, state: tuple[Tensor, ...], context: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        """``dh/ds = T f(sT, h)``, or ``T f(sT, h, context)`` for a conditional field (bind the
        context with ``functools.partial``)."""
        T = self.T
        return (T * call_field(self.field, s * T, state[0], context),)

    def solve_states(
        self, h: Tensor, t: Tensor, solver: Solver | None = None, context: Tensor | None = None
    ) -> Tensor:
        """The states alone (no log-density) from ``h`` at ``t[0]`` through every time of ``t``,
        with a leading time axis; for a conditional field, under the encoded ``context``."""
        dynamics = self.dynamics if context is None else partial(self.dynamics, context=context)
        return self.integrate(dynamics, (h,), t, solver, context=context)[0]

    def times(self, like: Tensor, reverse: bool = False, steps: Sequence[float] = (0.0, 1.0)):
        """Integration times ``T * steps`` (reversed for ``reverse``) in ``like``'s dtype/device."""
        s = torch.tensor(steps, dtype=like.dtype, device=like.device)
        t = s * self.T.detach().to(like)
        return t.flip(0) if reverse else t

    def forward(self, h: Tensor, *, solver: Solver | None = None) -> Tensor:
        return self.integrate(self.dynamics, (h,), self.times(h), solver)[0][-1]

    def trajectory(self, h: Tensor, t: Tensor, *, solver: Solver | None = None) -> Tensor:
        """States at each time of ``t`` (1-D, monotone, within ``[0, T]``), starting from ``h``
        at ``t[0]``; shape ``(len(t), *h.shape)``."""
        return self.integrate(self.dynamics, (h,), t, solver)[0]
