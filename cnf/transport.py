r"""A 2-D flow solved once through many times: where particles go and how the density moves.

Write :math:`y_t` for the state at time :math:`t`, with the base :math:`y_T = z \sim
\mathcal{N}(0, I)` and data at :math:`t = 0`, and :math:`p_t` for the density of :math:`y_t`.
One joint solve of state and log-determinant through all frame times gives :math:`p_t` on a
transported mesh:

* ``direction="sample"``: a regular mesh on the latent square :math:`[-L, L]^2` at :math:`t = T`
  runs back to :math:`t = 0`, carrying :math:`a_t = \log\lvert\det \partial y_t/\partial z\rvert`,
  so :math:`\log p_t(y_t) = \log \mathcal{N}(z) - a_t`. The mesh resolves the base finely and the
  data where the flow puts its mass.
* ``direction="density"``: a regular mesh on the data window :math:`[-\ell, \ell]^2` at
  :math:`t = 0` runs forward to :math:`T`, carrying :math:`a_t = \log\lvert\det \partial y_t /
  \partial y_0\rvert`; then :math:`\log p_0 = \log \mathcal{N}(y_T) + a_T` and
  :math:`\log p_t(y_t) = \log p_0(y_0) - a_t`. The mesh resolves the data end finely.

Either way the mesh's cells carry a fixed amount of probability mass: the change of variables
makes :math:`\sum_\text{cells} p_t \cdot \text{area}_t` the same at every time (the latent square's
Gaussian mass, :math:`\operatorname{erf}(L/\sqrt 2)^2`, for ``"sample"``), which
:meth:`Transport.mass` measures.

References:
    Chen et al., "Neural Ordinary Differential Equations", NeurIPS 2018 (arXiv:1806.07366).
    Grathwohl et al., "FFJORD", ICLR 2019 (arXiv:1810.01367).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from cnf import options
from cnf.flow import evaluating
from cnf.solvers import Solver

DIRECTIONS = ("sample", "density")
# half-width of the latent square meshed by direction="sample": it holds erf(4/sqrt 2)^2 = 99.987%
# of the base's mass, so the mesh misses nothing visible
LATENT_LIM = 4.0
_ALL = slice(None)


@dataclass(frozen=True)
class Transport:
    """A flow solved through a sequence of times (numpy arrays, leading axis = time).

    Attributes:
        times: the ``F`` times, from ``T`` down to 0 (``"sample"``) or from 0 up to ``T``.
        particles: ``(F, n, 2)`` positions of the particles.
        mesh: ``(F, G + 1, G + 1, 2)`` positions of the transported mesh nodes, or ``None``.
        log_density: ``(F, G + 1, G + 1)`` ``log p_t`` at the mesh nodes, or ``None``.
        nfe: function evaluations of the one solve.
        direction: ``"sample"`` or ``"density"``.
    """

    times: np.ndarray
    particles: np.ndarray
    mesh: np.ndarray | None
    log_density: np.ndarray | None
    nfe: int
    direction: str

    def cell_area(self, k: int | slice = _ALL) -> np.ndarray:
        """``(F, G, G)`` areas of the transported cells (quadrilaterals, by their diagonals), or
        frame ``k``'s."""
        m = self._require_mesh()[k]
        d1 = m[..., 1:, 1:, :] - m[..., :-1, :-1, :]
        d2 = m[..., :-1, 1:, :] - m[..., 1:, :-1, :]
        return 0.5 * np.abs(d1[..., 0] * d2[..., 1] - d1[..., 1] * d2[..., 0])

    def cell_density(self, k: int | slice = _ALL) -> np.ndarray:
        """``(F, G, G)`` density of each cell, or frame ``k``'s: ``p_t`` at its centre with
        ``log p_t`` interpolated bilinearly, the geometric mean of its four corners.
        (Interpolating ``log p`` rather than ``p`` keeps cells that the flow tears apart, between
        modes, from borrowing a neighbouring mode's density: on the 8gaussians flow it halves the
        mass error of the arithmetic mean.)"""
        lp = self._require_log_density()[k]
        corners = lp[..., :-1, :-1] + lp[..., 1:, :-1] + lp[..., :-1, 1:] + lp[..., 1:, 1:]
        return np.exp(0.25 * corners)

    def shown_density(self, k: int) -> np.ndarray:
        """``(G, G)`` what the density panel draws at frame ``k``: :meth:`cell_density`, except
        in cells whose straight-edged quadrilateral is larger than their mass allows, which get
        their mass spread over the quadrilateral, ``min(p_c, m_c / area_c)``.

        A cell's mass ``m_c`` is fixed along the flow; it is measured at the first frame, where
        the cells are the regular squares. A cell the flow tears across a gap between modes has
        its corners in the modes but its true image is a thin filament: the quadrilateral spans
        the gap, and the corners' density painted over it would draw bands of mass that is not
        there. Everywhere the mesh resolves the flow, ``m_c / area_c`` is about ``p_c`` and the
        minimum changes nothing.
        """
        cell_mass = self.cell_density(0) * self.cell_area(0)
        return np.minimum(self.cell_density(k), cell_mass / self.cell_area(k))

    def mass(self) -> np.ndarray:
        """``(F,)`` probability mass on the mesh at each time, ``sum p_t * area`` from the
        log-determinants (:meth:`cell_density`): constant in time, and ``erf(L / sqrt 2)^2`` for
        ``"sample"``, up to the error of the mesh (largest where the flow tears it)."""
        return (self.cell_density() * self.cell_area()).sum((1, 2))

    def _require_mesh(self) -> np.ndarray:
        if self.mesh is None:
            raise ValueError("this Transport was solved without a mesh: pass grid= to transport()")
        return self.mesh

    def _require_log_density(self) -> np.ndarray:
        self._require_mesh()
        return self.log_density


def check_2d(flow: nn.Module) -> None:
    """Raise a clear error unless ``flow`` models 2-D vector data."""
    shape = getattr(flow, "event_shape", None)
    if shape != (2,):
        raise ValueError(
            f"flow pictures are for 2-D flows, got a model of event shape {shape}: train on a "
            "2-D dataset (see `cnf datasets`), or plot a 2-D projection of samples instead"
        )
    if not callable(getattr(flow, "trajectory", None)):
        raise TypeError(f"expected a cnf.CNF (with .trajectory), got {type(flow).__name__}")


def like(flow: nn.Module) -> Tensor:
    """A tensor of the flow's dtype and device (its first parameter or buffer)."""
    return next(itertools.chain(flow.parameters(), flow.buffers()))


def square_mesh(lim: float, cells: int) -> Tensor:
    """``(cells + 1, cells + 1, 2)`` nodes of a regular mesh on ``[-lim, lim]^2``
    (first axis y, second x, as ``pcolormesh`` expects)."""
    g = torch.linspace(-lim, lim, cells + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    return torch.stack([xx, yy], -1)


@torch.no_grad()
def transport(
    flow: nn.Module,
    frames: int,
    *,
    direction: str = "sample",
    grid: int | None = 200,
    particles: int | Tensor = 1000,
    lim: float = LATENT_LIM,
    generator: torch.Generator | None = None,
    solver: Solver | None = None,
) -> Transport:
    """Solve ``flow`` once through ``frames`` evenly spaced times, with the joint log-density.

    Arguments:
        flow: a 2-D :class:`~cnf.flow.CNF` (solved in eval mode, with the exact trace).
        frames: number of times, ends included (at least 2).
        direction: ``"sample"`` (noise to data: ``T -> 0``) or ``"density"`` (data to noise).
        grid: cells per side of the density mesh (``None``: particles only).
        particles: how many particles (base noise for ``"sample"``; for ``"density"``, mesh
            nodes drawn in proportion to ``p_0``, so they cost nothing extra), or their starting
            points as an ``(n, 2)`` tensor (latents for ``"sample"``, data for ``"density"``).
        lim: half-width of the data window meshed by ``"density"`` (``"sample"`` meshes the latent
            square ``[-4, 4]^2``).
        generator: random source for the particles.
        solver: the ODE solver (default: the flow's evaluation solver).

    Returns:
        A :class:`Transport`. The flow is solved exactly once, for mesh and particles together.

    Example:
        >>> from cnf import CNF
        >>> tr = transport(CNF(2, hidden=(8,)), 3, grid=50, particles=5)
        >>> tr.mesh.shape, tr.particles.shape
        ((3, 51, 51, 2), (3, 5, 2))
        >>> bool(abs(tr.mass() - 0.99987).max() < 0.01)  # erf(4 / sqrt 2)^2 at every time
        True
    """
    check_2d(flow)
    _check_options(frames, direction, grid, particles, lim)
    p = like(flow)
    start = _starts(particles, direction, p, generator)
    mesh = None if grid is None else square_mesh(_mesh_lim(direction, lim), grid).to(p)
    nodes = p.new_zeros(0, 2) if mesh is None else mesh.reshape(-1, 2)
    steps = np.linspace(1.0, 0.0, frames) if direction == "sample" else np.linspace(0, 1, frames)
    times = flow.times(p, steps=steps.tolist())
    with evaluating(flow):
        out = flow.trajectory(torch.cat([nodes, start]), times, trace="exact", solver=solver)
    k = len(nodes)
    mesh_path, path = out.value[:, :k], out.value[:, k:]
    logp = None if mesh is None else _log_density(flow, direction, mesh_path, out.logdet[:, :k])
    if isinstance(particles, int) and direction == "density" and particles > 0:
        path = _resampled_nodes(mesh_path, logp, particles, generator)
    shape = (frames, *([] if mesh is None else mesh.shape[:2]))
    return Transport(
        times=_np(times), particles=_np(path),
        mesh=None if mesh is None else _np(mesh_path).reshape(*shape, 2),
        log_density=None if logp is None else _np(logp).reshape(shape),
        nfe=flow.nfe.forward, direction=direction,
    )  # fmt: skip


def _log_density(flow: nn.Module, direction: str, path: Tensor, logdet: Tensor) -> Tensor:
    """``log p_t`` along each mesh node's path from its log-determinants (module docstring)."""
    if direction == "sample":
        return flow.base_log_prob(path[0]) - logdet
    log_p0 = flow.base_log_prob(path[-1]) + logdet[-1]
    return log_p0 - logdet


def _starts(
    particles: int | Tensor, direction: str, ref: Tensor, generator: torch.Generator | None
) -> Tensor:
    if isinstance(particles, Tensor):
        return particles.to(ref)
    if direction == "density":
        return ref.new_zeros(0, 2)  # drawn from the mesh after the solve
    return torch.randn(particles, 2, generator=generator, dtype=ref.dtype, device=ref.device)


def _resampled_nodes(
    path: Tensor, logp: Tensor, n: int, generator: torch.Generator | None
) -> Tensor:
    """Paths of ``n`` mesh nodes drawn with probability ``p_0(node)``: samples of the model's
    density discretized on the (uniform) data-space mesh."""
    weights = (logp[0] - logp[0].max()).exp().to(torch.float64)
    idx = torch.multinomial(weights.cpu(), n, replacement=True, generator=_cpu(generator))
    return path[:, idx.to(path.device)]


def _cpu(generator: torch.Generator | None) -> torch.Generator | None:
    if generator is None or generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(generator.initial_seed())


def _mesh_lim(direction: str, lim: float) -> float:
    return LATENT_LIM if direction == "sample" else lim


def _check_options(
    frames: int, direction: str, grid: int | None, particles: int | Tensor, lim: float
) -> None:
    options.choice("direction", direction, DIRECTIONS)
    options.integer("frames", frames, 2)
    if grid is not None:
        options.integer("grid", grid, 2, "an integer >= 2 (cells per side) or None")
    options.number("lim", lim)
    if isinstance(particles, Tensor):
        if particles.ndim != 2 or particles.shape[1] != 2 or len(particles) == 0:
            raise ValueError(
                f"particles must be a count or an (n, 2) tensor, got shape {tuple(particles.shape)}"
            )
        if not bool(torch.isfinite(particles).all()):
            raise ValueError("particles has NaN or inf values: drop them first")
    elif not options.is_int(particles) or particles < 0:
        raise ValueError(f"particles must be a count >= 0 or an (n, 2) tensor, got {particles!r}")
    elif grid is None and (particles == 0 or direction == "density"):
        raise ValueError(
            "without a mesh (grid=None) pass particles: a positive count for direction='sample', "
            "or their starting points (e.g. data samples) for direction='density'"
        )


def _np(x: Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()
