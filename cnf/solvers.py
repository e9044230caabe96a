"""ODE solver configurations on top of torchdiffeq, with NFE counting and divergence guards.

A :class:`Solver` is an immutable description (method, tolerances, step, adjoint) validated where it
is built; :meth:`Solver.solve` runs it. Strings such as ``"dopri5"`` are turned into torchdiffeq
solvers here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchdiffeq import odeint, odeint_adjoint

from cnf.options import booleans, choice, integer, listed, number, option

# Every torchdiffeq method, with its order of accuracy (used by Hairer's starting-step heuristic).
FIXED_STEP: dict[str, int] = {
    "euler": 1,
    "midpoint": 2,
    "heun2": 2,
    "heun3": 3,
    "rk4": 4,
    "explicit_adams": 4,
    "implicit_adams": 4,
    "fixed_adams": 4,
}
ADAPTIVE: dict[str, int] = {
    "dopri5": 5,
    "dopri8": 8,
    "bosh3": 3,
    "fehlberg2": 2,
    "adaptive_heun": 2,
    "scipy_solver": 5,
}
METHODS: tuple[str, ...] = (*ADAPTIVE, *FIXED_STEP)

_ADAPTIVE_OPTIONS = frozenset(
    {"first_step", "min_step", "max_step", "safety", "ifactor", "dfactor", "max_num_steps",
     "step_t", "jump_t", "norm"}
)  # fmt: skip
_FIXED_OPTIONS = frozenset({"grid_constructor", "interp", "perturb", "max_iters", "max_order"})
_SCIPY_OPTIONS = frozenset({"solver", "min_step", "max_step"})


class SolverError(RuntimeError):
    """The ODE solve failed (diverged, stalled or produced non-finite values); the message says
    what to change. ``problem`` is what happened, ``advice`` what to do (a caller that knows
    more, such as the trainer, replaces the advice with its own)."""

    def __init__(self, problem: str, advice: str = "") -> None:
        super().__init__(f"{problem}. {advice}" if advice else problem)
        self.problem, self.advice = problem, advice


@dataclass
class NFE:
    """Function evaluations of one solve: ``forward`` during the solve, ``backward`` during the
    adjoint pass (0 under direct backpropagation, which replays the recorded graph instead)."""

    forward: int = 0
    backward: int = 0

    @property
    def total(self) -> int:
        return self.forward + self.backward


class _Counted:
    """Wraps a dynamics function: counts evaluations and stops a runaway solve."""

    def __init__(self, func: Callable, limit: int | None, describe: str) -> None:
        self.func, self.limit, self.describe = func, limit, describe
        self.nfe = NFE()
        self.phase = "forward"

    def __call__(self, t: Tensor, y: Any) -> Any:
        count = getattr(self.nfe, self.phase) + 1
        setattr(self.nfe, self.phase, count)
        if self.limit is not None and count > self.limit:
            raise SolverError(
                f"{self.describe}: more than max_nfe={self.limit} function evaluations in the "
                f"{self.phase} pass; the dynamics are too stiff for these tolerances or diverging",
                "Lower the learning rate, add kinetic/Jacobian regularization, loosen atol/rtol, "
                "or raise max_nfe",
            )
        return self.func(t, y)


@dataclass(frozen=True)
class Solver:
    """How to integrate an ODE: method, tolerances or step, and how to backpropagate.

    Arguments:
        method: any torchdiffeq method (:data:`METHODS`).
        atol: the absolute error tolerance of adaptive methods.
        rtol: the relative error tolerance of adaptive methods.
        step_size: step of fixed-step methods, in units of integration time; needed by a solve
            unless the method has a ``grid_constructor`` (a trainer given none starts at
            Hairer's step, :func:`cnf.adaptation.start_step`).
        adjoint: backpropagate with the adjoint method (memory independent of the number of steps)
            instead of through the solver's operations.
        seminorm: with ``adjoint``, measure the adjoint pass's error on the state only, not on the
            parameter gradients (Kidger et al. 2021, arXiv:2009.09457); fewer backward steps.
        max_nfe: stop a solve with :class:`SolverError` after this many function evaluations in one
            pass (``None``: no limit). Guards against diverging dynamics.
        options: further torchdiffeq options (``min_step``, ``max_num_steps``, ``first_step``,
            ``safety``, ``grid_constructor``, ...).
        adjoint_method: the adjoint pass's own method (default: the forward one).
        adjoint_atol: the adjoint pass's absolute tolerance (default: the forward one).
        adjoint_rtol: the adjoint pass's relative tolerance (default: the forward one).

    Example:
        >>> Solver("rk4", step_size=0.25).finer().step_size
        0.125
    """

    method: str = option("dopri5", f"ODE solver: {listed(METHODS)}")
    atol: float = option(1e-5, "absolute tolerance of an adaptive method")
    rtol: float = option(1e-5, "relative tolerance of an adaptive method")
    step_size: float | None = option(None, "step of a fixed-step method, in units of time")
    adjoint: bool = option(False, "backpropagate with the adjoint method")
    seminorm: bool = False
    max_nfe: int | None = option(20_000, "stop a solve after this many function evaluations")
    options: Mapping[str, Any] = field(default_factory=dict)
    adjoint_method: str | None = None
    adjoint_atol: float | None = None
    adjoint_rtol: float | None = None

    def __post_init__(self) -> None:
        choice("method", self.method, METHODS)
        booleans(self)
        if self.adjoint_method is not None and self.adjoint_method not in METHODS:
            raise ValueError(
                f"unknown adjoint_method {self.adjoint_method!r}; valid choices: {list(METHODS)}"
            )
        for name in ("atol", "rtol", "adjoint_atol", "adjoint_rtol", "step_size"):
            if name in ("atol", "rtol") or getattr(self, name) is not None:
                number(name, getattr(self, name))
        if self.max_nfe is not None:
            integer("max_nfe", self.max_nfe, 1, "a positive integer or None")
        if not self.fixed_step and self.step_size is not None:
            raise ValueError(
                f"step_size={self.step_size} is for fixed-step methods {list(FIXED_STEP)}; "
                f"{self.method!r} chooses its own steps from atol/rtol (use "
                "options={'first_step': ...} to set its first step)"
            )
        if (
            self.adjoint_method is not None
            and (self.adjoint_method in FIXED_STEP) != self.fixed_step
        ):
            kind = "takes fixed steps" if self.adjoint_method in FIXED_STEP else "is adaptive"
            raise ValueError(
                f"adjoint_method {self.adjoint_method!r} {kind} but method {self.method!r} "
                "does not: "
                "choose an adjoint method of the same kind (both share step_size or atol/rtol)"
            )
        if self.seminorm and not self.adjoint:
            raise ValueError(
                "seminorm=True only applies to the adjoint pass: also set adjoint=True"
            )
        valid = self._valid_options()
        unknown = sorted(set(self.options) - valid)
        if unknown:
            raise ValueError(
                f"unknown options {unknown} for method {self.method!r}; valid: {sorted(valid)}"
            )
        options = dict(self.options)
        if self.method in ("explicit_adams", "implicit_adams", "fixed_adams"):
            # torchdiffeq's default max_order=12 makes explicit Adams-Bashforth unstable (its
            # stability region shrinks with the order): exp(-t) blows up at h = 0.01.
            options.setdefault("max_order", 4)
            if options["max_order"] not in range(4, 13):
                raise ValueError(
                    f"Adams methods take max_order in 4..12, got {options['max_order']!r}"
                )
        object.__setattr__(self, "options", options)

    def _valid_options(self) -> frozenset[str]:
        if self.method == "scipy_solver":
            return _SCIPY_OPTIONS
        return _FIXED_OPTIONS if self.fixed_step else _ADAPTIVE_OPTIONS

    @property
    def fixed_step(self) -> bool:
        return self.method in FIXED_STEP

    @property
    def order(self) -> int:
        return {**FIXED_STEP, **ADAPTIVE}[self.method]

    def replace(self, **changes: Any) -> Solver:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def finer(self) -> Solver:
        """The same method at half the step, or at a tenth of the tolerances."""
        if self.fixed_step:
            return self.replace(step_size=self.step_size / 2 if self.step_size else None)
        return self.replace(atol=self.atol / 10, rtol=self.rtol / 10)

    def describe(self) -> str:
        """A short human-readable label, e.g. ``'rk4(h=0.1)'`` or ``'dopri5(1e-05/1e-05)'``."""
        if self.fixed_step:
            step = "unset" if self.step_size is None else f"{self.step_size:g}"
            return f"{self.method}(h={step})"
        return f"{self.method}(atol={self.atol:g}, rtol={self.rtol:g})"

    def _check_steps(self, s: Tensor, time_scale: float) -> None:
        """A fixed step too small for ``max_nfe`` fails before its time grid is built (at one
        evaluation a step at least, 1e9 steps would be a 4 GB grid for an error later)."""
        if not self.fixed_step or self.step_size is None or self.max_nfe is None or len(s) < 2:
            return
        steps = abs(float(s[-1] - s[0])) * time_scale / self.step_size
        if steps > self.max_nfe:
            raise SolverError(
                f"{self.describe()}: {math.ceil(steps):,} steps need more than "
                f"max_nfe={self.max_nfe:,} function evaluations",
                "Use a larger step, or raise max_nfe",
            )

    def solve(
        self,
        func: Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, ...]],
        y0: tuple[Tensor, ...],
        s: Tensor,
        params: Sequence[Tensor] = (),
        *,
        time_scale: float = 1.0,
    ) -> tuple[tuple[Tensor, ...], NFE]:
        """Integrate ``dy/ds = func(s, y)`` from ``y(s[0]) = y0`` to every time in ``s``.

        Arguments:
            func: the dynamics on a tuple state.
            y0: the initial state.
            s: 1-D grid of solver times, increasing or decreasing.
            params: the tensors the adjoint pass must differentiate (every parameter ``func``
                uses); ignored without ``adjoint``.
            time_scale: integration time per unit of ``s`` (the flow's ``T``), so that
                ``step_size`` keeps its meaning in units of integration time.

        Returns:
            The states at every time of ``s`` (each with a leading time axis) and the NFE record,
            whose ``backward`` count fills in when the adjoint pass runs.
        """
        if self.fixed_step and self.step_size is None and "grid_constructor" not in self.options:
            raise ValueError(
                f"method {self.method!r} takes fixed steps and this solver has none: give it a "
                "step_size (for instance Solver('rk4', step_size=0.05)), or use an adaptive "
                "method such as 'dopri5'"
            )
        self._check_steps(s, time_scale)
        counted = _Counted(func, self.max_nfe, self.describe())
        options = dict(self.options)
        if self.step_size is not None:
            options["step_size"] = self.step_size / time_scale
        kwargs: dict[str, Any] = dict(
            rtol=self.rtol, atol=self.atol, method=self.method, options=options
        )
        try:
            if self.adjoint and torch.is_grad_enabled():
                adjoint_options = {k: v for k, v in options.items() if k != "norm"}
                if self.seminorm:
                    adjoint_options["norm"] = "seminorm"
                ys = odeint_adjoint(
                    _BackwardPhase(counted), y0, s, **kwargs,
                    adjoint_params=tuple(p for p in params if p.requires_grad),
                    adjoint_method=self.adjoint_method or self.method,
                    adjoint_atol=self.adjoint_atol or self.atol,
                    adjoint_rtol=self.adjoint_rtol or self.rtol,
                    adjoint_options=adjoint_options,
                )  # fmt: skip
            else:
                ys = odeint(counted, y0, s, **kwargs)
        except AssertionError as err:  # torchdiffeq reports step underflow and max_num_steps so
            raise SolverError(
                f"{self.describe()} failed: {err}; the dynamics are stiff or diverging",
                "Lower the learning rate, loosen atol/rtol, add regularization, or use a smaller "
                "step",
            ) from err
        counted.phase = "backward"
        return ys, counted.nfe


def as_solver(value: Solver | Mapping[str, Any] | None, default: Solver) -> Solver:
    """Accept a :class:`Solver`, a mapping of its fields, or ``None`` (the default)."""
    if value is None:
        return default
    if isinstance(value, Solver):
        return value
    if isinstance(value, Mapping):
        return Solver(**value)
    raise TypeError(f"expected a cnf.Solver or a dict of its fields, got {type(value).__name__}")


def solver_fields(solver: Solver) -> dict[str, Any]:
    """A solver as plain data (for configs and checkpoints); ``Solver(**fields)`` rebuilds it."""
    fields = dataclasses.asdict(solver)
    fields["options"] = dict(solver.options)
    return fields


class _BackwardPhase:
    """Passes calls to the counter; under the adjoint, calls made with gradients enabled come from
    the backward pass (the forward solve runs under ``no_grad``)."""

    def __init__(self, counted: _Counted) -> None:
        self.counted = counted

    def __call__(self, t: Tensor, y: Any) -> Any:
        if torch.is_grad_enabled():
            self.counted.phase = "backward"
        return self.counted(t, y)


def check_finite(states: Sequence[Tensor], solver: Solver) -> None:
    """Raise :class:`SolverError` if a solve produced NaN or inf (one device sync per solve)."""
    if not all(bool(torch.isfinite(x).all()) for x in states):
        raise SolverError(
            f"{solver.describe()} produced NaN/inf: the flow diverged",
            "Lower the learning rate, clip gradients, use a smaller step or tighter tolerances, "
            "or add regularization",
        )
