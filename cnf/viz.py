"""Figures: density heat maps and samples of 2-D flows, sample grids of image flows (headless,
Agg)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor, nn


def _check_2d(model: nn.Module) -> None:
    shape = getattr(model, "event_shape", None)
    if shape != (2,):
        raise ValueError(
            f"these figures are for 2-D flows, got a model of event shape {shape}: "
            "plot a 2-D projection of samples instead"
        )


def grid(lim: float, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An ``n x n`` grid on ``[-lim, lim]^2``: the axis, and the points as an ``(n*n, 2)`` array."""
    g = np.linspace(-lim, lim, n)
    xx, yy = np.meshgrid(g, g, indexing="xy")
    return g, g, np.stack([xx.ravel(), yy.ravel()], 1)


@torch.no_grad()
def model_density(model: nn.Module, lim: float, n: int = 200, batch: int = 10_000) -> np.ndarray:
    """``exp log_prob`` of the model on an ``n x n`` grid (rows are y, columns x)."""
    _check_2d(model)
    _, _, pts = grid(lim, n)
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
def plot_density(model: nn.Module, data: Any, path: str | Path, n: int = 200) -> None:
    """Heat map of the model's density, beside the true density when it is known."""
    lim = data.density.support
    panels = [("model density", model_density(model, lim, n))]
    if data.density.has_truth:
        _, _, pts = grid(lim, n)
        panels.insert(0, ("true density", np.exp(data.log_prob(pts)).reshape(n, n)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, dens) in zip(axes[0], panels, strict=True):
        _heat(ax, dens, lim, title)
    fig.suptitle(data.name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def plot_samples(model: nn.Module, data: Any, path: str | Path, n: int = 5000) -> None:
    """Model samples beside data samples."""
    _check_2d(model)
    lim = data.density.support
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    model.eval()
    samples = model.sample(n, generator=gen).cpu().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4))
    _scatter(axes[0], data.test(n), lim, "data", "C0")
    _scatter(axes[1], samples, lim, "model samples", "C3")
    fig.suptitle(data.name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_run(model: nn.Module, data: Any, out: str | Path) -> None:
    """The figures every 2-D training run writes: ``density.png`` and ``samples.png``."""
    out = Path(out)
    plot_density(model, data, out / "density.png")
    plot_samples(model, data, out / "samples.png")


def plot_solver(log_path: str | Path, path: str | Path) -> None:
    """The training solver over a run: step size (or tolerance) and NFE per iteration, with the
    adaptation checks marked (read from the run's ``log.jsonl``)."""
    import json

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
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
    fig.savefig(path, dpi=110)
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


def save_image_grid(images: Tensor, levels: int, path: str | Path, **kwargs: Any) -> None:
    """Write :func:`image_grid` as a PNG (pixels drawn at least 64 screen pixels per image)."""
    zoom = kwargs.pop("zoom", max(1, 64 // images.shape[-1]))
    grid_ = image_grid(images, levels, zoom=zoom, **kwargs)
    plt.imsave(path, grid_, cmap="gray", vmin=0.0, vmax=1.0, format="png")


@torch.no_grad()
def save_sample_grid(model: nn.Module, path: str | Path, n: int = 64, seed: int = 0) -> None:
    """Draw ``n`` images from an image flow (seeded) and write them as a PNG grid."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    model.eval()
    save_image_grid(model.sample(n, generator=gen), model.levels, path)
