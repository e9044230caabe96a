"""Figures (headless, Agg): run figures of 2-D flows (density heat maps, samples beside data),
pictures of the flow in time (:func:`animate`, :func:`plot_trajectories`,
:func:`plot_density_times`), each drawn from one solve (:func:`cnf.transport.transport`), the
training solver over a run (:func:`plot_solver`) and sample grids of image flows."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import animation
from matplotlib.collections import LineCollection, QuadMesh
from matplotlib.figure import Figure
from torch import Tensor, nn

from cnf import options
from cnf.io import atomic_path, check_output, save_figure, write_bytes
from cnf.runs import load_run, read_log
from cnf.solvers import Solver
from cnf.transport import LATENT_LIM, Transport, check_2d, like, transport


def grid(lim: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """An ``n x n`` grid on ``[-lim, lim]^2``: the axis, and the points as an ``(n*n, 2)`` array
    (x varying fastest)."""
    g = np.linspace(-lim, lim, n)
    xx, yy = np.meshgrid(g, g, indexing="xy")
    return g, np.stack([xx.ravel(), yy.ravel()], 1)


@torch.no_grad()
def model_density(model: nn.Module, lim: float, n: int = 200, batch: int = 10_000) -> np.ndarray:
    """``exp log_prob`` of the model on an ``n x n`` grid (rows are y, columns x)."""
    check_2d(model)
    _, pts = grid(lim, n)
    p = next(model.parameters())
    x = torch.as_tensor(pts, dtype=p.dtype, device=p.device)
    model.eval()
    logp = torch.cat([model.log_prob(b) for b in x.split(batch)])
    return logp.exp().cpu().numpy().reshape(n, n)


def _heat(ax: Any, density: np.ndarray, lim: float, title: str) -> None:
    ax.imshow(density, extent=(-lim, lim, -lim, lim), origin="lower", cmap="magma")
    ax.set(title=title, xticks=[], yticks=[])


def _scatter(ax: Any, pts: np.ndarray, lim: float, title: str, color: str) -> None:
    ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4, color=color, rasterized=True)
    ax.set(title=title, xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[], aspect="equal")


@torch.no_grad()
def plot_density(
    model: nn.Module, data: Any, path: str | Path, n: int = 200, *, overwrite: bool = False
) -> None:
    """Heat map of the model's density, beside the true density when it is known."""
    lim = data.density.support
    panels = [("model density", model_density(model, lim, n))]
    if data.density.has_truth:
        _, pts = grid(lim, n)
        panels.insert(0, ("true density", np.exp(data.log_prob(pts)).reshape(n, n)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, dens) in zip(axes[0], panels, strict=True):
        _heat(ax, dens, lim, title)
    fig.suptitle(data.name)
    fig.tight_layout()
    save_figure(fig, path, dpi=110, overwrite=overwrite)
    plt.close(fig)


@torch.no_grad()
def plot_samples(
    model: nn.Module, data: Any, path: str | Path, n: int = 5000, *, overwrite: bool = False
) -> None:
    """Model samples beside data samples."""
    check_2d(model)
    lim = data.density.support
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    model.eval()
    samples = model.sample(n, generator=gen).cpu().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4))
    _scatter(axes[0], data.test(n), lim, "data", "C0")
    _scatter(axes[1], samples, lim, "model samples", "C3")
    fig.suptitle(data.name)
    fig.tight_layout()
    save_figure(fig, path, dpi=110, overwrite=overwrite)
    plt.close(fig)


def plot_run(
    out: str | Path,
    *,
    data: Any = None,
    trust_pickle: bool = False,
    say: Callable[[str], None] | None = None,
) -> list[Path]:
    """The figures of a run directory, from its best checkpoint and log: ``training.png`` (the
    curves), ``solver.png`` (the training solver), and by kind of data ``density.png`` and
    ``samples.png`` (2-D), ``marginals.png`` (tables) or ``samples.png`` (an image grid).
    ``data``: the run's dataset if it is at hand (else it is reopened). A figure that cannot
    be drawn (no log, or no row in it yet) is left out and ``say`` is told why. Returns the
    paths written."""
    out, say = Path(out), say or (lambda text: None)
    run = load_run(out)
    data = data if data is not None else run.dataset(trust_pickle=trust_pickle)
    log = out / "log.jsonl"
    rows = read_log(log) if log.is_file() else None
    written = []
    if rows is None or not rows.rows:
        why = "is missing" if rows is None else "has no rows yet"
        say(f"{log} {why}: training.png and solver.png not drawn")
    else:
        written += [out / "training.png", out / "solver.png"]
        plot_training(log, written[0], overwrite=True, bits_per_dim=data.kind == "image")
        plot_solver(log, written[1], overwrite=True)
    if data.kind == "toy":
        written += [out / "density.png", out / "samples.png"]
        plot_density(run.model, data, written[-2], overwrite=True)
        plot_samples(run.model, data, written[-1], overwrite=True)
    elif data.kind == "tabular":
        written.append(out / "marginals.png")
        plot_marginals(run.model, data, written[-1], overwrite=True)
    elif data.kind == "image":
        written.append(out / "samples.png")
        save_sample_grid(run.model, written[-1], overwrite=True)
    return written


@torch.no_grad()
def plot_marginals(
    model: nn.Module, data: Any, path: str | Path, n: int = 2000, *, overwrite: bool = False
) -> None:
    """Histograms of every modelled column: test rows against model samples, in the data's
    original units, for tabular runs (columns dropped as constant or duplicate have none)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    model.eval()
    samples = model.sample(n, generator=gen).double().cpu().numpy()
    test, names = data.test(), data.columns
    k = len(names)
    cols = min(k, 8 if k > 16 else 4)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.8 * rows), squeeze=False)
    for j, ax in enumerate(axes.flat):  # np.histogram + stairs: many columns draw fast
        if j >= k:
            ax.axis("off")
            continue
        lo, hi = np.percentile(np.concatenate([test[:, j], samples[:, j]]), [0.5, 99.5])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 30)
        ax.stairs(np.histogram(test[:, j], bins, density=True)[0], bins, fill=True, alpha=0.5,
                  color="C0", label="test data")  # fmt: skip
        ax.stairs(np.histogram(samples[:, j], bins, density=True)[0], bins, color="C3",
                  label="model")  # fmt: skip
        ax.set_title(names[j][:24], fontsize=8)
        ax.tick_params(labelsize=6)
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"{Path(data.name).name}: marginals, test data vs model samples", fontsize=9)
    fig.subplots_adjust(
        left=0.05, right=0.98, bottom=0.04, top=1 - 0.35 / rows, hspace=0.6, wspace=0.3
    )  # fmt: skip  (tight_layout takes seconds for 60 panels)
    save_figure(fig, path, dpi=110, overwrite=overwrite)
    plt.close(fig)


def plot_solver(log_path: str | Path, path: str | Path, *, overwrite: bool = False) -> None:
    """The training solver over a run: step size (or tolerance) and NFE per iteration, with the
    adaptation checks marked (read from the run's ``log.jsonl``)."""
    rows = _rows(log_path)
    it = np.array([r["iter"] for r in rows])
    fixed = rows[0].get("step_size") is not None
    key, label = ("step_size", "step size") if fixed else ("atol", "tolerance (atol)")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6.4, 4.8), sharex=True)
    ax1.plot(it, [r[key] for r in rows], color="C0")
    for event, color in (("shrink", "C3"), ("grow", "C2"), ("revert", "C1")):
        hits = [r for r in rows if r.get("adapt", {}).get("event") == event]
        if hits:
            ax1.scatter([r["iter"] for r in hits], [r[key] for r in hits], s=8, color=color,
                        label=event, zorder=3)  # fmt: skip
    ax1.set(ylabel=label, yscale="log", title="training solver (Ott et al. step adaptation)")
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend(fontsize=8)
    ax2.plot(it, [r["nfe"] for r in rows], color="C4", lw=0.8)
    ax2.set(xlabel="iteration", ylabel="NFE per solve")
    fig.tight_layout()
    save_figure(fig, path, dpi=110, overwrite=overwrite)
    plt.close(fig)


def _rows(log_path: str | Path) -> list[dict[str, Any]]:
    rows = read_log(log_path).rows
    if not rows:
        raise ValueError(f"{log_path} has no rows yet: train for at least one iteration")
    return rows


def plot_training(
    log_path: str | Path, path: str | Path, *, overwrite: bool = False, bits_per_dim: bool = False
) -> None:
    """The training curves of a run (from its ``log.jsonl``): the loss and the training NLL per
    iteration with the validation NLL at each evaluation (bits/dim for images), and the NFE
    forward and backward, against iterations (left) and against training time (right)."""
    rows = _rows(log_path)
    it = np.array([r["iter"] for r in rows])
    seconds = np.cumsum([r["time"] for r in rows])
    val = [(i, r) for i, r in enumerate(rows) if "val_nll" in r]
    key = "val_bits_per_dim" if bits_per_dim and val and "val_bits_per_dim" in val[0][1] else None
    fig, axes = plt.subplots(2, 2, figsize=(9.6, 5.6), sharex="col")
    for col, x, label in ((0, it, "iteration"), (1, seconds, "training time (s)")):
        top, bottom = axes[0, col], axes[1, col]
        top.plot(x, [r["loss"] for r in rows], color="C0", lw=0.6, alpha=0.7, label="loss")
        if "nll" in rows[0]:
            top.plot(x, [r["nll"] for r in rows], color="C1", lw=0.6, alpha=0.7, label="NLL")
        if val:
            vy = [r[key] if key else r["val_nll"] for _, r in val]
            (top.twinx() if key else top).plot(
                [x[i] for i, _ in val], vy, "o-", color="C3", ms=3,
                label="validation " + ("bits/dim" if key else "NLL"),
            )  # fmt: skip
        top.set(ylabel="nats per sample")
        top.legend(fontsize=7, loc="upper right")
        bottom.plot(x, [r["nfe"] for r in rows], color="C4", lw=0.6, label="forward")
        if any(r.get("nfe_backward") for r in rows):
            bottom.plot(x, [r["nfe_backward"] for r in rows], color="C5", lw=0.6, label="backward")
        bottom.set(xlabel=label, ylabel="NFE per iteration")
        bottom.legend(fontsize=7)
    fig.suptitle("training")
    fig.tight_layout()
    save_figure(fig, path, dpi=110, overwrite=overwrite)
    plt.close(fig)


# --- the flow in time ------------------------------------------------------------------------

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
    flow: nn.Module, tr: Transport, lim: float, trails: int | None, field: bool, dpi: float
) -> tuple[Figure, Callable[[int], None]]:
    """The figure and a function drawing frame ``k`` of it (particles, density, arrows)."""
    fig, axes = _panels(2 + field, dpi)
    _window(axes[0], lim, "samples")
    _window(axes[1], lim, "density $p_t$")
    axes[1].set_facecolor(plt.get_cmap("magma")(0.0))  # outside the mesh: zero density
    lines = LineCollection([], colors="C0", linewidths=0.6, alpha=0.5)
    axes[0].add_collection(lines)
    dots = axes[0].scatter(*tr.particles[0].T, s=2, color="C3", zorder=3)
    arrows = None
    if field:
        pts, vel = _velocities(flow, tr, lim)
        arrows = axes[2].quiver(*pts.T, *vel[0].T, angles="xy", scale_units="xy", scale=1.0,
                                width=0.005)  # fmt: skip
        _window(axes[2], lim, "velocity")
    label = fig.suptitle("")

    def draw(k: int) -> None:
        dots.set_offsets(tr.particles[k])
        lines.set_segments(_trail_segments(tr, k, trails) if trails != 0 else [])
        if tr.mesh is not None:
            _draw_density(axes[1], tr, k)
        if arrows is not None:
            arrows.set_UVC(*vel[k].T)
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
    field: bool = False,
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
        field: add a panel with the velocity of the motion shown, as arrows.
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
    fig, draw = _frame_drawer(flow, tr, lim, trails, field, dpi)
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


def image_grid(
    images: Tensor, levels: int, *, columns: int | None = None, zoom: int = 1
) -> np.ndarray:
    """Tile images ``(n, C, H, W)`` of continuous pixel values in ``[0, levels)`` into one
    ``(rows, cols)`` (grey) or ``(rows, cols, 3)`` (colour) array of intensities in ``[0, 1]``:
    each image quantized (``floor``, clamped to ``0..levels-1``), a 1-pixel white border, each
    pixel drawn ``zoom`` times wider and taller."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"expected images of shape (n, 1 or 3, H, W), got {tuple(images.shape)}: a grid "
            "shows grey or RGB images"
        )
    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    pixels = images.detach().float().floor().clamp(0, levels - 1).cpu().numpy() / (levels - 1)
    canvas = np.ones((c, rows * (h + 1) + 1, columns * (w + 1) + 1))
    for i, image in enumerate(pixels):
        r, k = divmod(i, columns)
        canvas[:, 1 + r * (h + 1) : (r + 1) * (h + 1), 1 + k * (w + 1) : (k + 1) * (w + 1)] = image
    canvas = canvas.repeat(zoom, 1).repeat(zoom, 2)
    return canvas[0] if c == 1 else canvas.transpose(1, 2, 0)


def save_image_grid(
    images: Tensor, levels: int, path: str | Path, *, overwrite: bool = False, **kwargs: Any
) -> None:
    """Write :func:`image_grid` as a PNG (pixels drawn at least 64 screen pixels per image)."""
    zoom = kwargs.pop("zoom", max(1, 64 // images.shape[-1]))
    grid_ = image_grid(images, levels, zoom=zoom, **kwargs)
    buffer = io.BytesIO()
    plt.imsave(buffer, grid_, cmap="gray", vmin=0.0, vmax=1.0, format="png")
    write_bytes(path, buffer.getvalue(), overwrite=overwrite)


@torch.no_grad()
def save_sample_grid(
    model: nn.Module, path: str | Path, n: int = 64, seed: int = 0, *, overwrite: bool = False
) -> None:
    """Draw ``n`` images from an image flow (seeded) and write them as a PNG grid."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    model.eval()
    save_image_grid(model.sample(n, generator=gen), model.levels, path, overwrite=overwrite)


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
