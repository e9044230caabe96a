"""Pictures of the flow in time: one solve, densities that are right, files that are complete."""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, LinearField, config
from PIL import Image
from scipy.linalg import expm
from scipy.stats import multivariate_normal

from cnf import CNF, viz
from cnf.checkpoint import save_checkpoint
from cnf.cli import main
from cnf.solvers import Solver
from cnf.training import setup
from cnf.transport import LATENT_LIM, Transport, transport
from cnf.viz import motion

LATENT_MASS = math.erf(LATENT_LIM / math.sqrt(2)) ** 2
TINY = dict(frames=5, grid=16, particles=40, dpi=40)


def _warping_flow() -> CNF:
    """A random field strong enough to change cell areas by tens of percent."""
    flow = CNF(2, hidden=(16, 16), solver=Solver(atol=1e-6, rtol=1e-6))
    with torch.no_grad():
        for p in flow.field.parameters():
            p.mul_(3.0)
    return flow


@pytest.fixture
def flow() -> CNF:
    return CNF(2, hidden=(8,), solver=Solver("rk4", step_size=0.25))


@pytest.fixture
def solves(monkeypatch) -> list:
    """Records every ODE solve."""
    calls, solve = [], Solver.solve

    def spy(self, *args, **kwargs):
        calls.append(self)
        return solve(self, *args, **kwargs)

    monkeypatch.setattr(Solver, "solve", spy)
    return calls


@pytest.mark.parametrize("direction", ["sample", "density"])
def test_linear_flow_density_is_the_closed_form_gaussian(float64, direction: str) -> None:
    # dz/dt = A z moves the base N(0, I) at T back to y_t = expm(-A (T - t)) z ~ N(0, M M^T)
    A = torch.tensor([[-0.4, 0.9], [-0.3, 0.6]])
    T = 1.3
    flow = CNF(2, LinearField(A), T=T, solver=Solver(atol=1e-10, rtol=1e-10))
    tr = transport(flow, 4, direction=direction, grid=6, particles=3, lim=3.0)
    for k, t in enumerate(tr.times):
        M = expm(-A.numpy() * (T - t))
        truth = multivariate_normal(np.zeros(2), M @ M.T).logpdf(tr.mesh[k].reshape(-1, 2))
        np.testing.assert_allclose(tr.log_density[k].ravel(), truth, atol=1e-7)
    ends = (T, 0.0) if direction == "sample" else (0.0, T)
    assert tr.times[[0, -1]] == pytest.approx(ends)


def test_sample_density_integrates_to_the_latent_mass_at_every_time(float64) -> None:
    tr = transport(_warping_flow(), 4, grid=40, particles=10)
    area = tr.cell_area().sum((1, 2))
    assert area[-1] / area[0] > 1.15  # the flow really warps: a wrong log-det sign shows
    # at t = T the cells are the latent grid's: only the quadrature's O(h^2) error, 1% at h = 0.2
    assert tr.mass()[0] == pytest.approx(LATENT_MASS, rel=1.5e-2)
    np.testing.assert_allclose(tr.mass(), tr.mass()[0], rtol=2e-3)


def test_density_direction_conserves_the_window_mass(float64) -> None:
    tr = transport(_warping_flow(), 4, direction="density", grid=40, particles=10, lim=6.0)
    assert 0.95 < tr.mass()[0] <= 1.0  # the model's mass in the window at t = 0
    np.testing.assert_allclose(tr.mass(), tr.mass()[0], rtol=2e-3)
    # particles drawn from the density mesh follow their nodes: they start on the mesh
    nodes = tr.mesh[0].reshape(-1, 2)
    assert np.abs(tr.particles[0][:, None] - nodes[None]).sum(-1).min(1).max() == 0


def test_density_panel_draws_the_transported_density(float64) -> None:
    tr = transport(_warping_flow(), 3, grid=40, particles=20)
    fig, draw = motion._frame_drawer(_warping_flow(), tr, 5.0, trails=2, arrows=False, dpi=40)
    for k in range(3):
        draw(k)
        (mesh,) = fig.axes[1].collections
        np.testing.assert_allclose(mesh.get_coordinates(), tr.mesh[k])
        dens = np.asarray(mesh.get_array()).reshape(40, 40)
        np.testing.assert_allclose(dens, tr.shown_density(k))
        # where the mesh resolves the flow, what is shown is the log-det density itself
        assert np.mean(dens < 0.99 * tr.cell_density(k)) < 0.01
        area = _quad_areas(mesh.get_coordinates())
        assert (dens * area).sum() == pytest.approx(LATENT_MASS, rel=1.5e-2)
    motion.plt.close(fig)


def test_a_torn_cell_spreads_its_mass() -> None:
    # one cell, unchanged corner densities, stretched to 10 times its area: a tear, not a
    # density drop, so the panel spreads the cell's mass; shrunk, it keeps the corner density
    square = np.array([[[0, 0], [1, 0]], [[0, 1], [1, 1]]], dtype=float)
    mesh = np.stack([square, square * [10, 1], square * [0.5, 1]])
    log_density = np.log(np.full((3, 2, 2), 0.2))
    tr = Transport(np.arange(3.0), np.zeros((3, 0, 2)), mesh, log_density, 0, "sample")
    assert tr.shown_density(1) == pytest.approx(0.02)
    assert tr.shown_density(2) == pytest.approx(0.2)
    assert tr.mass() == pytest.approx([0.2, 2.0, 0.1])  # the raw log-det mass flags both


def _quad_areas(m: np.ndarray) -> np.ndarray:
    d1, d2 = m[1:, 1:] - m[:-1, :-1], m[:-1, 1:] - m[1:, :-1]
    return 0.5 * np.abs(d1[..., 0] * d2[..., 1] - d1[..., 1] * d2[..., 0])


def _frames(path: Path) -> list[np.ndarray]:
    with Image.open(path) as im:
        out = []
        for k in range(im.n_frames):
            im.seek(k)
            out.append(np.asarray(im.convert("RGB"), dtype=float))
    return out


@pytest.mark.parametrize("direction", ["sample", "density"])
def test_gif_has_every_frame_and_they_move(flow, solves, tmp_path: Path, direction) -> None:
    path = tmp_path / "flow.gif"
    data = np.random.default_rng(0).normal(size=(30, 2)) if direction == "density" else None
    anim = viz.animate(flow, path, direction=direction, arrows=True, data=data, **TINY)
    assert len(solves) == 1  # one solve for all frames, the arrows are field evaluations
    frames = _frames(path)
    assert len(frames) == TINY["frames"]
    for img in frames:
        assert img.std() > 20  # not blank
    diffs = [np.abs(a - b).mean() for a, b in itertools.pairwise(frames)]
    assert min(diffs) > 0.5  # every frame differs from the one before
    assert anim is not None


def test_one_solve_without_a_path(flow, solves) -> None:
    anim = viz.animate(flow, frames=4, grid=8, particles=10)
    anim._init_draw()  # matplotlib's first draw, so that the unsaved animation is rendered
    assert len(solves) == 1


def test_static_companions(flow, solves, tmp_path: Path) -> None:
    viz.plot_trajectories(flow, tmp_path / "traj.png", n=50, steps=10)
    viz.plot_density_times(flow, tmp_path / "times.png", times=5, grid=16)
    assert len(solves) == 2  # one each
    for name in ("traj.png", "times.png"):
        img = np.asarray(Image.open(tmp_path / name).convert("L"), dtype=float)
        assert img.std() > 20
    wide = Image.open(tmp_path / "times.png").size
    assert wide[0] > 3 * wide[1]  # five panels side by side


def test_not_2d_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"2-D flows, got a model of event shape \(3,\)"):
        viz.animate(CNF(3, hidden=(8,)), tmp_path / "x.gif", frames=3)
    with pytest.raises(ValueError, match="event shape"):
        viz.plot_trajectories(CNF(3, hidden=(8,)), tmp_path / "x.png")


def test_formats(flow, solves, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"unknown animation format '\.avi'.*write a \.gif"):
        viz.animate(flow, tmp_path / "x.avi", **TINY)
    monkeypatch.setattr(motion.animation.writers, "is_available", lambda name: False)
    with pytest.raises(ValueError, match=r"\.mp4 needs ffmpeg.*write a \.gif instead"):
        viz.animate(flow, tmp_path / "x.mp4", **TINY)
    assert not solves  # refused before solving anything
    monkeypatch.setattr(motion.animation.writers, "is_available", lambda name: name == "ffmpeg")
    assert isinstance(viz.animation_writer("x.MP4", 10), motion.animation.FFMpegWriter)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(frames=1), "frames must be an integer >= 2, got 1"),
        (dict(direction="up"), "direction 'up' is unknown; valid choices"),
        (dict(grid=1), "grid must be an integer >= 2"),
        (dict(fps=0), "fps must be a number in"),
        (dict(trails=-2), "trails must be"),
        (dict(lim=float("nan")), "lim must be a positive finite"),
        (dict(data=np.zeros((4, 3)), direction="density"), r"data must be an \(n, 2\) array"),
    ],
)
def test_bad_options(flow, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        viz.animate(flow, **{**TINY, **kwargs})


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run directory holding an untrained 8gaussians model (the CLI's plumbing is tested)."""
    out = tmp_path_factory.mktemp("animate")
    save_checkpoint(out / "best.pt", setup(config(data="8gaussians", **SMALL)).checkpoint())
    return out


def test_cli_animate(run: Path, tmp_path: Path, capsys) -> None:
    gif, traj, times = tmp_path / "f.gif", tmp_path / "t.png", tmp_path / "d.png"
    argv = ["animate", str(run), "-o", str(gif), "--frames", "4", "--grid", "12", "--dpi", "40",
            "--particles", "30", "--no-progress", "--trajectories", str(traj),
            "--times", str(times)]  # fmt: skip
    assert main(argv) == 0
    assert Image.open(gif).n_frames == 4 and traj.is_file() and times.is_file()
    assert "one solve" in capsys.readouterr().out
    assert main(argv) == 1  # refuses to overwrite
    assert "exists: pass --force" in capsys.readouterr().err
    assert main([*argv, "--force", "--atol", "1e-4"]) == 1  # its evaluation solver is rk4
    assert "--atol has no effect" in capsys.readouterr().err
    assert main([*argv, "--force", "--direction", "density", "--arrows"]) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-o", "{tmp}/f.avi"], "unknown animation format '.avi'"),
        (["-o", "{tmp}/f.gif", "--times", "{tmp}/d.jpg"], "written as .png files"),
        (["-o", "{tmp}/f.gif", "--frames", "1"], "--frames must be an integer >= 2"),
        (["-o", "{tmp}/f.gif", "--rtol", "-1"], "--rtol must be a positive finite number"),
    ],
)
def test_cli_errors_are_one_line(run: Path, tmp_path: Path, capsys, extra, message) -> None:
    argv = ["animate", str(run), *(a.format(tmp=tmp_path) for a in extra), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("cnf animate: error")
