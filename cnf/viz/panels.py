"""The panels the figures share: a square grid on the plane, a heat map of a density on it,
a scatter of points."""

from __future__ import annotations

from typing import Any

import numpy as np


def grid(lim: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """An ``n x n`` grid on ``[-lim, lim]^2``: the axis, and the points as an ``(n*n, 2)`` array
    (x varying fastest)."""
    g = np.linspace(-lim, lim, n)
    xx, yy = np.meshgrid(g, g, indexing="xy")
    return g, np.stack([xx.ravel(), yy.ravel()], 1)


def heat(ax: Any, density: np.ndarray, lim: float, title: str) -> None:
    ax.imshow(density, extent=(-lim, lim, -lim, lim), origin="lower", cmap="magma",
              interpolation="bilinear")  # fmt: skip
    ax.set(title=title, xticks=[], yticks=[])


def scatter(ax: Any, pts: np.ndarray, lim: float, title: str, color: str) -> None:
    ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4, color=color, rasterized=True)
    ax.set(title=title, xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[], aspect="equal")
