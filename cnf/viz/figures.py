"""The figures of a run (headless, Agg): the training curves, the training solver, and by kind
of data the density and samples (2-D), the marginals (tables) or a grid of samples (images)."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor, nn

from cnf.io import save_figure, write_bytes
from cnf.report import reported_solver
from cnf.runs import adaptation_checks, load_run, read_log
from cnf.runtime import configure_threads
from cnf.transport import check_2d
from cnf.viz.conditional import plot_conditional
from cnf.viz.panels import grid, heat, scatter

# points a side of a run's density figure: 120 drawn bilinearly looks as 200 do, for a third of
# the solves (a 200 x 200 grid was 5 of a quick-start run's 89 CPU s)
GRID = 120


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


@torch.no_grad()
def plot_density(
    model: nn.Module, data: Any, path: str | Path, n: int = GRID, *, overwrite: bool = False
) -> None:
    """Heat map of the model's density on an ``n x n`` grid (drawn smooth), beside the true
    density when it is known."""
    lim = data.density.support
    panels = [("model density", model_density(model, lim, n))]
    if data.density.has_truth:
        _, pts = grid(lim, n)
        panels.insert(0, ("true density", np.exp(data.log_prob(pts)).reshape(n, n)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, dens) in zip(axes[0], panels, strict=True):
        heat(ax, dens, lim, title)
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
    scatter(axes[0], data.test(n), lim, "data", "C0")
    scatter(axes[1], samples, lim, "model samples", "C3")
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
    threads: int | None = None,
) -> list[Path]:
    """The figures of a run directory, from its best checkpoint and log: ``training.png`` (the
    curves), ``solver.png`` (the training solver), and by kind of data ``density.png`` and
    ``samples.png`` (2-D), ``marginals.png`` (tables) or ``samples.png`` (an image grid).
    ``data``: the run's dataset if it is at hand (else it is reopened). A figure that cannot
    be drawn (no log, or no row in it yet) is left out and ``say`` is told why. Returns the
    paths written. ``threads``: set the process's CPU threads for the model (0: cnf's rule,
    :func:`cnf.runtime.configure_threads`); ``None`` leaves them as they are."""
    out, say = Path(out), say or (lambda text: None)
    run = load_run(out)
    chosen = reported_solver(out, run.iteration)
    if chosen is not None:  # the looser solver the report validated: the same density, sooner
        run.model.set_solver(eval_solver=chosen)
    if threads is not None:
        configure_threads(threads, next(run.model.parameters()).device,
                          math.prod(run.model.event_shape))  # fmt: skip
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
    if run.meta.get("context") is not None and data.kind != "image":  # p(x | c): per condition
        written.append(out / "conditional.png")
        plot_conditional(run.model, data, run.meta, written[-1], overwrite=True)
    elif data.kind == "toy":
        written += [out / "density.png", out / "samples.png"]
        plot_density(run.model, data, written[-2], overwrite=True)
        plot_samples(run.model, data, written[-1], overwrite=True)
    elif data.kind == "tabular":
        written.append(out / "marginals.png")
        plot_marginals(run.model, data, written[-1], overwrite=True)
    elif data.kind == "image":
        written.append(out / "samples.png")
        if run.meta.get("context") is not None:  # p(image | label): one row per class
            save_class_grid(run.model, run.meta["context"]["classes"], written[-1], overwrite=True)
        else:
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
    """The training solver over a run: step size (or tolerance) and NFE per iteration (each log
    row's last step and mean NFE), with every adaptation check marked at its own iteration (read
    from the run's ``log.jsonl``)."""
    rows = _rows(log_path)
    checks = [check for row in rows for check in adaptation_checks(row)]
    it = np.array([r["iter"] for r in rows])
    fixed = rows[0].get("step_size") is not None
    key, label = ("step_size", "step size") if fixed else ("atol", "tolerance (atol)")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6.4, 4.8), sharex=True)
    # the step changes only at checks: with theirs, the rows' last steps draw it exactly
    steps = dict(sorted((r["iter"], r[key]) for r in [*checks, *rows]))
    ax1.plot(list(steps), list(steps.values()), color="C0", drawstyle="steps-post")
    for event, color in (("shrink", "C3"), ("grow", "C2"), ("revert", "C1")):
        hits = [c for c in checks if c.get("event") == event]
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
    """The training curves of a run (from its ``log.jsonl``): the loss and the training NLL (each
    log row's mean over its iterations) with the validation NLL at each evaluation (bits/dim for
    images), and the NFE forward and backward, against iterations (left) and against training
    time (right: the rows' seconds summed)."""
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
def save_class_grid(
    model: nn.Module,
    classes: int,
    path: str | Path,
    per_class: int = 8,
    seed: int = 0,
    *,
    overwrite: bool = False,
) -> None:
    """Draw ``per_class`` images given each label ``0..classes-1`` from a label-conditional
    image flow (seeded) and write them as a PNG grid, one row per class."""
    p = next(model.parameters())
    gen = torch.Generator(device=p.device).manual_seed(seed)
    labels = torch.arange(classes, device=p.device).repeat_interleave(per_class)
    model.eval()
    images = model.sample(len(labels), generator=gen, context=labels)
    save_image_grid(images, model.levels, path, overwrite=overwrite, columns=per_class)
