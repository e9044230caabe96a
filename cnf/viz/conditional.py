"""The figure of a conditional model :math:`p(x \\mid c)`: for a few conditions, the true
conditional density beside the model's (2-D data), or the first two coordinates of the true
and the model's conditional samples (higher dimensions, such as a posterior
:math:`p(\\theta \\mid x)`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from cnf.io import save_figure
from cnf.viz.panels import grid, heat, scatter

SHOWN = 4  # conditions drawn


def conditions(meta: dict[str, Any], data: Any) -> np.ndarray:
    """The conditions drawn: labels spread over the classes, a feature's range in steps, or
    the first test pairs' conditions (several features)."""
    context = meta["context"]
    if context["kind"] == "categorical":
        classes = context["classes"]
        return np.unique(np.linspace(0, classes - 1, min(SHOWN, classes)).round().astype(np.int64))
    if context["features"] == 1:
        return np.linspace(-1.0, 1.0, SHOWN)[:, None]
    return np.asarray(data.test(SHOWN).c)


@torch.no_grad()
def plot_conditional(
    model: nn.Module, data: Any, meta: dict[str, Any], path: str | Path, *, n: int = 120,
    overwrite: bool = False,
) -> None:  # fmt: skip
    """For each of a few conditions (:func:`conditions`), the true :math:`p(x \\mid c)` above
    the model's (2-D data; on an ``n x n`` grid), or true and model samples (other data); for
    a table, each test row's target against a model sample given that row's condition."""
    if data.kind == "tabular":
        return _plot_table(model, data, path, overwrite=overwrite)
    cs = conditions(meta, data)
    fig, axes = plt.subplots(2, len(cs), figsize=(2.8 * len(cs), 5.6), squeeze=False)
    p = next(model.parameters())
    model.eval()
    for j, c in enumerate(cs):
        label = _describe(c, j)
        context = torch.as_tensor(c, device=p.device)
        context = context.to(p.dtype) if context.is_floating_point() else context
        if data.event_shape == (2,) and getattr(data, "has_truth", True):
            lim = data.support
            _, pts = grid(lim, n)
            rows = np.repeat(np.asarray(c)[None], len(pts), 0)
            heat(axes[0, j], np.exp(data.log_prob(pts, rows)).reshape(n, n), lim, f"true, {label}")
            x = torch.as_tensor(pts, dtype=p.dtype, device=p.device)
            logp = torch.cat([model.log_prob(b, context=context) for b in x.split(5000)])
            heat(axes[1, j], logp.exp().cpu().numpy().reshape(n, n), lim, f"model, {label}")
        else:
            rows = np.repeat(np.asarray(c)[None], 1000, 0)
            true = data.task.sample_x(rows, np.random.default_rng(0))
            gen = torch.Generator(device=p.device).manual_seed(0)
            samples = model.sample(1000, generator=gen, context=context).cpu().numpy()
            lim = float(np.abs(true[:, :2]).max()) * 1.2
            scatter(axes[0, j], true[:, :2], lim, f"true, {label}", "C0")
            scatter(axes[1, j], samples[:, :2], lim, f"model, {label}", "C3")
    fig.suptitle(f"{data.name}: p(x | c)")
    fig.tight_layout()
    save_figure(fig, path, dpi=100, overwrite=overwrite)
    plt.close(fig)


@torch.no_grad()
def _plot_table(model: nn.Module, data: Any, path: str | Path, *, overwrite: bool) -> None:
    """Per target column: the test rows' values against one model sample each, drawn given the
    row's condition (on the diagonal when the model knows the row as well as its noise lets
    it), and the test marginal against the samples' marginal."""
    x, c = data.test(500)
    p = next(model.parameters())
    context = torch.as_tensor(c, dtype=p.dtype, device=p.device)
    gen = torch.Generator(device=p.device).manual_seed(0)
    model.eval()
    samples = model.sample(len(x), generator=gen, context=context).cpu().numpy()
    columns = min(len(data.columns), SHOWN)
    fig, axes = plt.subplots(2, columns, figsize=(3.2 * columns, 6.2), squeeze=False)
    for j in range(columns):
        low, high = np.percentile(np.concatenate([x[:, j], samples[:, j]]), [0.5, 99.5])
        ax = axes[0, j]
        ax.scatter(x[:, j], samples[:, j], s=4, alpha=0.5, color="C3")
        ax.plot([low, high], [low, high], color="0.5", lw=1)
        ax.set(title=data.columns[j], xlabel="test value", ylabel="sample given its row")
        bins = np.linspace(low, high, 40)
        axes[1, j].hist(x[:, j], bins, density=True, alpha=0.5, label="test")
        axes[1, j].hist(samples[:, j], bins, density=True, alpha=0.5, color="C3", label="model")
        axes[1, j].legend(fontsize=7)
    fig.suptitle(f"{data.name}: p(target | rest)")
    fig.tight_layout()
    save_figure(fig, path, dpi=100, overwrite=overwrite)
    plt.close(fig)


def _describe(c: np.ndarray, j: int) -> str:
    c = np.asarray(c)
    if c.ndim == 0:
        return f"c = {int(c)}"
    if c.size == 1:
        return f"c = {float(c[0]):.2f}"
    return f"test condition {j + 1}"
