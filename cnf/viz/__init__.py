"""Figures, drawn headless (matplotlib's Agg backend): the figures of a run
(:mod:`cnf.viz.figures`: training curves, the training solver, densities, samples, marginals,
image grids) and the flow in time (:mod:`cnf.viz.motion`: animations, trajectories, the density
at several times), each drawn from one solve."""

import matplotlib

matplotlib.use("Agg")

from cnf.viz.figures import (
    grid,
    image_grid,
    model_density,
    plot_density,
    plot_marginals,
    plot_run,
    plot_samples,
    plot_solver,
    plot_training,
    save_image_grid,
    save_sample_grid,
)
from cnf.viz.motion import (
    animate,
    animation_writer,
    default_lim,
    plot_density_times,
    plot_trajectories,
)

__all__ = [
    "animate",
    "animation_writer",
    "default_lim",
    "grid",
    "image_grid",
    "model_density",
    "plot_density",
    "plot_density_times",
    "plot_marginals",
    "plot_run",
    "plot_samples",
    "plot_solver",
    "plot_training",
    "plot_trajectories",
    "save_image_grid",
    "save_sample_grid",
]
