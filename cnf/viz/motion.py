"""The flow in time (headless, Agg): :func:`animate`, :func:`plot_trajectories` and
:func:`plot_density_times`, each drawn from one solve (:func:`cnf.transport.transport`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import animation
from matplotlib.collections import LineCollection, QuadMesh
from matplotlib.figure import Figure
from torch import Tensor, nn

from cnf import options
from cnf.io import atomic_path, check_output, save_figure
from cnf.solvers import Solver
from cnf.transport import LATENT_LIM, Transport, check_2d, like, transport
from cnf.viz.panels import grid

_ARROWS = 17  # arrows per side of the vector-field panel


def animation_writer(path: str | Path, fps: float) -> animation.AbstractMovieWriter:
    """PillowWriter for ``.gif``; ffmpeg for ``.mp4`` when matplotlib finds it; else an error."""
    suffix = Path(path).suffix.lower()
    if suffix == ".gif":
        return animation.PillowWriter(fps=fps)
    if suffix == ".mp4":
        if not animation.writers.is_available("ffmpeg"):
            raise ValueError(
                f"cannot write {path}: .mp4 needs ffmpeg, which matplotlib does not find here; "
                "write a .gif instead (or install ffmpeg)"
            )
        return animation.FFMpegWriter(fps=fps)
    raise ValueError(
        f"unknown animation format {suffix or '(none)'!r} for {path}: write a .gif (or an .mp4 "
        "where ffmpeg is installed)"
    )


def default_lim(points: np.ndarray) -> float:
    """A half-width framing nearly all of ``points`` (any shape ending in 2), in steps of 0.5."""
    extent = float(np.quantile(np.abs(points.reshape(-1, 2)).max(1), 0.995)) * 1.1
    return max(0.5, math.ceil(extent * 2) / 2)


def _window(ax: Any, lim: float, title: str) -> None:
    ax.set(title=title, xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[], aspect="equal")


def _arrow(tr: Transport) -> str:
    return "noise → data" if tr.direction == "sample" else "data → noise"


def _time_label(tr: Transport, k: int) -> str:
    return f"t = {tr.times[k]:.2f}  ({_arrow(tr)})"


def _draw_density(ax: Any, tr: Transport, k: int) -> QuadMesh:
    """Replace the panel's mesh by frame ``k``'s: ``p_t`` on the transported cells
    (:meth:`Transport.shown_density`), colours scaled to the frame (its 99.5th percentile)."""
    for old in list(ax.collections):
        old.remove()
    dens = tr.shown_density(k)
    vmax = float(np.quantile(dens, 0.995)) or 1.0
    mesh = tr.mesh[k]
    return ax.pcolormesh(mesh[..., 0], mesh[..., 1], dens, shading="flat", cmap="magma",
                         vmin=0.0, vmax=vmax, rasterized=True)  # fmt: skip


def _trail_segments(tr: Transport, k: int, trails: int | None) -> np.ndarray:
    first = 0 if trails is None else max(0, k - trails)
    return tr.particles[first : k + 1].transpose(1, 0, 2)


@torch.no_grad()
def _velocities(flow: nn.Module, tr: Transport, lim: float) -> tuple[np.ndarray, np.ndarray]:
    """Arrow positions ``(A, 2)`` and arrows ``(F, A, 2)`` for the velocity of the motion shown:
    ``f(t, y)`` forward in time, ``-f`` when the picture runs from ``T`` to 0. Arrows are in data
    units: the 95th percentile of speed spans 1.4 grid spacings, faster ones are clipped to it
    (the field is fastest in a few spots, which would otherwise hide the rest)."""
    _, pts = grid(lim * 0.9, _ARROWS)
    p = like(flow)
    y = torch.as_tensor(pts, dtype=p.dtype, device=p.device)
    sign = -1.0 if tr.direction == "sample" else 1.0
    v = torch.stack([sign * flow.field(torch.tensor(t).to(p), y) for t in tr.times])
    v = v.cpu().double().numpy()
    speed = np.linalg.norm(v, axis=-1, keepdims=True)
    cap = float(np.quantile(speed, 0.95)) or 1.0
    length = 1.4 * 1.8 * lim / (_ARROWS - 1)
    return pts, v * (length / cap) * np.minimum(1.0, cap / np.maximum(speed, 1e-300))


def _panels(n: int, dpi: float) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.5), dpi=dpi, squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.84, wspace=0.06)
    return fig, axes[0]


def _frame_drawer(
    flow: nn.Module, tr: Transport, lim: float, trails: int | None, arrows: bool, dpi: float
) -> tuple[Figure, Callable[[int], None]]:
    """The figure and a function drawing frame ``k`` of it (particles, density, arrows)."""
    fig, axes = _panels(2 + arrows, dpi)
    _window(axes[0], lim, "samples")
    _window(axes[1], lim, "density $p_t$")
    axes[1].set_facecolor(plt.get_cmap("magma")(0.0))  # outside the mesh: zero density
    lines = LineCollection([], colors="C0", linewidths=0.6, alpha=0.5)
    axes[0].add_collection(lines)
    dots = axes[0].scatter(*tr.particles[0].T, s=2, color="C3", zorder=3)
    quiver = None
    if arrows:
        pts, vel = _velocities(flow, tr, lim)
        quiver = axes[2].quiver(*pts.T, *vel[0].T, angles="xy", scale_units="xy", scale=1.0,
                                width=0.005)  # fmt: skip
        _window(axes[2], lim, "velocity")
    label = fig.suptitle("")

    def draw(k: int) -> None:
        dots.set_offsets(tr.particles[k])
        lines.set_segments(_trail_segments(tr, k, trails) if trails != 0 else [])
        if tr.mesh is not None:
            _draw_density(axes[1], tr, k)
        if quiver is not None:
            quiver.set_UVC(*vel[k].T)
        label.set_text(_time_label(tr, k))

    return fig, draw


def _start_points(data: Any, n: int, direction: str, ref: Tensor) -> int | Tensor:
    """Particles for :func:`transport`: data samples when running from the data, else a count."""
    if direction != "density" or data is None:
        return n
    x = torch.as_tensor(np.asarray(data)[:n]).to(ref)
    if x.ndim != 2 or x.shape[1] != 2 or len(x) == 0:
        raise ValueError(f"data must be an (n, 2) array of samples, got shape {tuple(x.shape)}")
    return x


def _solve(
    flow: nn.Module, frames: int, *, direction: str, grid_cells: int | None, particles: int,
    lim: float | None, data: Any, seed: int, solver: Solver | None,
) -> tuple[Transport, float]:  # fmt: skip
    """One :func:`transport` solve, and the half-width of the window to draw."""
    check_2d(flow)
    ref = like(flow)
    if lim is None and data is not None:
        lim = default_lim(np.asarray(data))
    tr = transport(
        flow, frames, direction=direction, grid=grid_cells, lim=lim or LATENT_LIM, solver=solver,
        particles=_start_points(data, particles, direction, ref),
        generator=torch.Generator(device=ref.device).manual_seed(seed),
    )  # fmt: skip
    if lim is None:
        lim = default_lim(tr.particles) if tr.particles.size else LATENT_LIM
    return tr, lim


@torch.no_grad()
def animate(
    flow: nn.Module,
    path: str | Path | None = None,
    *,
    frames: int = 60,
    fps: float = 15,
    direction: str = "sample",
    grid: int | None = 200,
    particles: int = 1500,
    trails: int | None = 8,
    arrows: bool = False,
    lim: float | None = None,
    data: Any = None,
    seed: int = 0,
    solver: Solver | None = None,
    dpi: float = 72,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> animation.FuncAnimation:
    """Animate a 2-D flow: particles beside the density ``p_t``, optionally the vector field.

    The flow is solved once, through all frame times (:func:`cnf.transport.transport`).

    Arguments:
        flow: a 2-D :class:`~cnf.flow.CNF`.
        path: where to save: ``.gif`` (Pillow) or ``.mp4`` (needs ffmpeg); ``None``: don't save.
        frames: number of frames (ends included).
        fps: frames per second.
        direction: ``"sample"`` plays ``t: T -> 0``, base noise becoming data (the sampler);
            ``"density"`` plays ``t: 0 -> T``, data being normalized to the Gaussian (the
            density evaluation), starting from ``data`` when given.
        grid: cells per side of the density mesh (``None``: no density panel content).
        particles: number of particles.
        trails: frames of trail behind each particle (0: none, ``None``: the whole path).
        arrows: add a panel with the velocity of the motion shown, as arrows.
        lim: half-width of the square window (default: framing ``data``, else the particles).
        data: ``(n, 2)`` data samples (start points of ``"density"`` particles, and the window).
        seed: seed of the particles.
        solver: the ODE solver (default: the flow's evaluation solver).
        dpi: resolution of the saved frames.
        progress: called as ``progress(frame, total)`` while saving.
        overwrite: replace an existing file at ``path`` (else ``FileExistsError``, before any
            work).

    Returns:
        The ``matplotlib.animation.FuncAnimation`` (show it in a notebook with ``.to_jshtml()``).

    Example:
        >>> import os, tempfile
        >>> from cnf import CNF
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     anim = animate(CNF(2, hidden=(8,)), os.path.join(tmp, "flow.gif"), frames=3,
        ...                    grid=10, particles=20)
    """
    if path is not None:
        check_output(path, flag="path", force=overwrite, hint="overwrite=True")
    writer = None if path is None else animation_writer(path, fps)
    options.number("dpi", dpi)
    options.number("fps", fps, high=100)
    if trails is not None:
        options.integer("trails", trails, 0, "a number of frames >= 0 or None")
    tr, lim = _solve(flow, frames, direction=direction, grid_cells=grid, particles=particles,
                     lim=lim, data=data, seed=seed, solver=solver)  # fmt: skip
    fig, draw = _frame_drawer(flow, tr, lim, trails, arrows, dpi)
    anim = animation.FuncAnimation(fig, draw, frames=frames, interval=1000 / fps, repeat=True,
                                   cache_frame_data=False)  # fmt: skip
    if path is not None:
        with atomic_path(path, overwrite=overwrite) as tmp:
            anim.save(tmp, writer=writer, dpi=dpi, progress_callback=progress)
        plt.close(fig)
    return anim


@torch.no_grad()
def plot_trajectories(
    flow: nn.Module,
    path: str | Path,
    *,
    n: int = 400,
    steps: int = 60,
    direction: str = "sample",
    lim: float | None = None,
    data: Any = None,
    seed: int = 0,
    solver: Solver | None = None,
    overwrite: bool = False,
) -> None:
    """The whole paths of ``n`` particles as lines coloured by time, from one solve (PNG).

    ``direction`` is as in :func:`animate`: base noise to data, or data (when given) to noise.
    """
    check_output(path, flag="path", force=overwrite, hint="overwrite=True")
    tr, lim = _solve(flow, steps, direction=direction, grid_cells=None, particles=n, lim=lim,
                     data=data, seed=seed, solver=solver)  # fmt: skip
    fig, ax = plt.subplots(figsize=(4.6, 4.0), layout="constrained")
    seg = np.stack([tr.particles[:-1], tr.particles[1:]], 2).transpose(1, 0, 2, 3)
    t_mid = np.broadcast_to((tr.times[:-1] + tr.times[1:]) / 2, seg.shape[:2])
    lines = LineCollection(seg.reshape(-1, 2, 2), array=t_mid.ravel(), cmap="viridis",
                           linewidths=0.5, alpha=0.6)  # fmt: skip
    ax.add_collection(lines)
    ax.scatter(*tr.particles[0].T, s=2, color="0.3", zorder=3, label=f"t = {tr.times[0]:.2g}")
    ax.scatter(*tr.particles[-1].T, s=2, color="C3", zorder=3, label=f"t = {tr.times[-1]:.2g}")
    ax.legend(loc="lower right", fontsize=7, markerscale=3)
    fig.colorbar(lines, ax=ax, fraction=0.04, pad=0.02, label="t")
    _window(ax, lim, f"trajectories ({_arrow(tr)})")
    save_figure(fig, path, dpi=110, overwrite=overwrite)
    plt.close(fig)


@torch.no_grad()
def plot_density_times(
    flow: nn.Module,
    path: str | Path,
    *,
    times: int = 5,
    grid: int = 200,
    direction: str = "sample",
    lim: float | None = None,
    data: Any = None,
    solver: Solver | None = None,
    overwrite: bool = False,
) -> None:
    """The density ``p_t`` at ``times`` evenly spaced times, ends included, from one solve (PNG)."""
    check_output(path, flag="path", force=overwrite, hint="overwrite=True")
    if not isinstance(times, int) or isinstance(times, bool) or times < 2:
        raise ValueError(f"times must be an integer >= 2 (the ends are included), got {times!r}")
    tr, lim = _solve(flow, times, direction=direction, grid_cells=grid, particles=256, lim=lim,
                     data=data, seed=0, solver=solver)  # fmt: skip
    fig, axes = plt.subplots(1, times, figsize=(2.4 * times, 2.9), layout="constrained")
    for k, ax in enumerate(np.atleast_1d(axes)):
        _draw_density(ax, tr, k)
        ax.set_facecolor(plt.get_cmap("magma")(0.0))
        _window(ax, lim, f"t = {tr.times[k]:.2f}")
    fig.suptitle(f"density $p_t$ ({_arrow(tr)})")
    save_figure(fig, path, dpi=110, overwrite=overwrite)
    plt.close(fig)
