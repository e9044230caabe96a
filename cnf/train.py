"""Training: one config, one loop you can read top to bottom, checkpoints that resume exactly.

``train(TrainConfig(data="8gaussians"), "runs/8g")`` fits a flow by maximum likelihood with Adam,
a learning-rate schedule and gradient clipping; evaluates on held-out data with the evaluation
solver every ``eval_every`` iterations; keeps ``best.pt`` and ``last.pt``; logs every iteration to
``log.jsonl``; and ends with a report (test NLL, entropy and KL where the truth is known) and
figures. Batches and Hutchinson probes are functions of ``(seed, iteration)``, so a resumed run ends
exactly where an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cnf import rundir
from cnf.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cnf.data import Dataset, dataset_kind, get_dataset, held_warnings
from cnf.data.tabular import TABLE_OPTIONS
from cnf.evaluate import evaluate
from cnf.fields import ACTIVATIONS
from cnf.flow import CNF
from cnf.io import write_text
from cnf.solvers import FIXED_STEP, Solver, SolverError
from cnf.trace import NOISES, TRACES
from cnf.validity import (
    StepAdapter,
    batch_nll_metric,
    initial_step,
    set_training_solver,
    solver_validity,
    training_solver,
)

SCHEDULES = ("cosine", "constant")
# dataset options only the caller may give, never a config or a checkpoint
UNTRUSTED_OPTIONS = frozenset({"trust_pickle"})
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as ``config.json`` and inside every checkpoint.

    The field defaults are the recipe for the 2-D toys (bench/bench_toy.py): rk4 with the
    adapted step, lr 5e-3 on a cosine schedule, and RNODE's kinetic and Jacobian penalties at
    0.01, which keep the field smooth, so the adapted step stays large (few NFE) and the sharp
    densities (checkerboard) train to a lower KL in less time than without them. Other kinds of
    data start from :data:`PRESETS`.
    """

    data: str = "8gaussians"
    iters: int = 3000
    batch_size: int = 512
    lr: float = 5e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    grad_clip: float = 5.0
    eval_every: int = 250
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    dtype: str = "float32"
    # model
    hidden: tuple[int, ...] = (64, 64, 64)
    activation: str = "tanh"
    trace: str = "auto"
    noise: str = "rademacher"
    T: float = 1.0
    learn_T: bool = False
    # training solver; a fixed-step method without step_size starts from Hairer's heuristic
    method: str = "rk4"
    atol: float = 1e-5
    rtol: float = 1e-5
    step_size: float | None = None
    adjoint: bool = False
    max_nfe: int = 10_000
    # keep the trained model an ODE flow (Ott et al. 2021): adapt the step/tolerance every
    # adapt_every iterations so the training and a finer solver agree within adapt_threshold
    # nats per dimension, with at most max_steps steps. Half the validity report's 0.01: the
    # grow-and-revert rule keeps the step near its threshold, and the report should pass with
    # margin (euler adapted at 0.01 ended 0.0106 nats/dim off on test data).
    adapt: bool = True
    adapt_every: int = 50
    adapt_threshold: float = 0.005
    max_steps: int = 500
    kinetic: float = 0.01
    jacobian: float = 0.01
    # evaluation solver
    eval_method: str = "dopri5"
    eval_atol: float = 1e-7
    eval_rtol: float = 1e-7
    eval_step_size: float | None = None
    test_size: int = 20_000
    validity_size: int = 2000
    # tabular data (cnf.data.tabular, cnf.tabular)
    preprocess: str = "standardize"
    columns: str = ""
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    dequantize: bool = False
    drop_nan: bool = False
    patience: int = 0  # early stopping: evaluations without a better validation NLL (0: off)
    # image data and models (cnf.multiscale)
    data_dir: str | None = None
    scales: int = 0
    blocks: int = 2
    alpha: float = 1e-6
    conv_layer: str = "concatsquash"
    tf32: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # dataset/model-specific options

    def __post_init__(self) -> None:
        if not isinstance(self.hidden, tuple | list) or not self.hidden:
            raise ConfigError("hidden", f"must be a list of layer widths, got {self.hidden!r}")
        if any(not _is_int(h) or h < 1 for h in self.hidden):
            raise ConfigError("hidden", f"must hold positive widths, got {list(self.hidden)}")
        self.hidden = tuple(int(h) for h in self.hidden)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f.name, f"must be a finite number, got {value}")
        for name in ("iters", "batch_size", "eval_every", "test_size", "max_nfe", "adapt_every",
                     "max_steps", "validity_size", "blocks"):  # fmt: skip
            _check(name, getattr(self, name), _is_int, 1, "a positive integer")
        for name in ("threads", "patience", "scales"):
            _check(name, getattr(self, name), _is_int, 0, "an integer >= 0 (0: automatic/off)")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ConfigError("seed", f"must be an integer in 0..2**63-1, got {self.seed!r}")
        for name in ("lr", "T", "atol", "rtol", "eval_atol", "eval_rtol"):
            _check(name, getattr(self, name), _is_number, 0, "a positive number", strict=True)
        for name in ("step_size", "eval_step_size"):
            if getattr(self, name) is not None:
                _check(name, getattr(self, name), _is_number, 0, "a positive number", strict=True)
        for name in ("weight_decay", "grad_clip", "kinetic", "jacobian", "adapt_threshold"):
            _check(name, getattr(self, name), _is_number, 0, "a number >= 0")
        if not _is_number(self.alpha) or not 0 <= self.alpha < 0.5:
            raise ConfigError("alpha", f"must be in [0, 0.5) (0: no logit), got {self.alpha!r}")
        for name in ("val_fraction", "test_fraction"):
            if not _is_number(getattr(self, name)) or not 0 < getattr(self, name) < 1:
                raise ConfigError(name, f"must be in (0, 1), got {getattr(self, name)!r}")
        _choice("conv_layer", self.conv_layer, ("concatsquash", "concat"))
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("dtype", self.dtype, tuple(DTYPES))
        _choice("preprocess", self.preprocess, ("standardize", "whiten", "none"))
        _choice("activation", self.activation, tuple(sorted(ACTIVATIONS)))
        _choice("trace", self.trace, TRACES)
        _choice("noise", self.noise, NOISES)
        if UNTRUSTED_OPTIONS & set(self.extra):
            raise ConfigError("extra", "cannot hold trust_pickle: trust is given by the caller "
                              "(--trust-pickle), never by a config or checkpoint")  # fmt: skip
        self.train_solver, self.eval_solver  # noqa: B018  validates method, step and tolerances

    @classmethod
    def for_data(cls, data: str, **given: Any) -> TrainConfig:
        """The config for ``data``: the dataset kind's :data:`PRESETS` over the field defaults
        (which suit the 2-D toys), and ``given`` over both. ``cnf train`` builds its config so."""
        return cls(data=data, **{**PRESETS.get(dataset_kind(data), {}), **given})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @property
    def train_solver(self) -> Solver:
        """The configured training solver; a fixed-step method without a step gets a placeholder
        of T/8 until :func:`cnf.validity.initial_step` replaces it on the first batch."""
        step = self.step_size
        if step is None and self.method in FIXED_STEP:
            step = self.T / 8
        return Solver(self.method, self.atol, self.rtol, step, adjoint=self.adjoint,
                      max_nfe=self.max_nfe)  # fmt: skip

    @property
    def eval_solver(self) -> Solver:
        return Solver(self.eval_method, self.eval_atol, self.eval_rtol, self.eval_step_size,
                      max_nfe=self.max_nfe)  # fmt: skip


# the config fields that are dataset options (passed to get_dataset when not at their defaults)
DATA_OPTIONS = TABLE_OPTIONS


def dataset_options(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg.extra`` plus the tabular data options the user changed (other kinds refuse them)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    changed = {k: getattr(cfg, k) for k in DATA_OPTIONS if getattr(cfg, k) != defaults[k]}
    return {**cfg.extra, **changed}


# Defaults per kind of data, over TrainConfig's field defaults (tuned on the 2-D toys).
PRESETS: dict[str, dict[str, Any]] = {
    # small conv fields that train on a CPU (digits); pass FFJORD's flags for 28x28 on a GPU
    "image": dict(
        batch_size=64,
        lr=3e-3,
        hidden=(32, 32),
        blocks=1,
        activation="tanh",
        method="rk4",
        step_size=0.5,
        eval_atol=1e-5,
        eval_rtol=1e-5,
        eval_every=500,
        validity_size=64,
        kinetic=0.0,
        jacobian=0.0,
    ),
    # small tables (a few hundred rows): whitening makes the untrained flow the Gaussian fit; a
    # small field with weight decay and early stopping keeps it from memorizing the rows
    "tabular": dict(
        iters=2000,
        batch_size=256,
        lr=2e-3,
        weight_decay=1e-2,
        hidden=(64, 64),
        preprocess="whiten",
        kinetic=0.0,
        jacobian=0.0,
        eval_every=25,
        patience=8,
        eval_atol=1e-6,
        eval_rtol=1e-6,
        test_size=1_000_000,
    ),
}


class ConfigError(ValueError):
    """A config value is out of range; ``field`` names it (the CLI shows it as a flag)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check(name: str, value: object, kind, low: float, what: str, strict: bool = False) -> None:
    if not kind(value) or value < low or (strict and value == low):
        raise ConfigError(name, f"must be {what}, got {value!r}")


def _choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(name, f"{value!r} is unknown; valid choices: {list(valid)}")


# --- models ----------------------------------------------------------------------------------


def build_vector_cnf(cfg: TrainConfig, meta: dict[str, Any]) -> nn.Module:
    """A single CNF block on vector data with the config's field and solvers."""
    (dim,) = meta["event_shape"]
    return CNF(
        dim, hidden=cfg.hidden, activation=cfg.activation, trace=cfg.trace, noise=cfg.noise,
        T=cfg.T, learn_T=cfg.learn_T, method=cfg.method, atol=cfg.atol, rtol=cfg.rtol,
        step_size=cfg.train_solver.step_size, adjoint=cfg.adjoint, max_nfe=cfg.max_nfe,
        eval_solver=cfg.eval_solver,
    )  # fmt: skip


def build_image_cnf(cfg: TrainConfig, meta: dict[str, Any]) -> nn.Module:
    """A multiscale CNF (FFJORD's architecture) on dequantized images of ``meta["levels"]``."""
    from cnf.multiscale import MultiscaleCNF

    return MultiscaleCNF(
        tuple(meta["event_shape"]), levels=meta["levels"], scales=cfg.scales or None,
        blocks=cfg.blocks, alpha=cfg.alpha, hidden=cfg.hidden, layer=cfg.conv_layer,
        activation=cfg.activation, trace=cfg.trace, noise=cfg.noise, T=cfg.T,
        learn_T=cfg.learn_T, method=cfg.method, atol=cfg.atol, rtol=cfg.rtol,
        step_size=cfg.train_solver.step_size, adjoint=cfg.adjoint, max_nfe=cfg.max_nfe,
        eval_solver=cfg.eval_solver,
    )  # fmt: skip


def build_tabular_cnf(cfg: TrainConfig, meta: dict[str, Any]) -> nn.Module:
    """A CNF behind a fixed standardization layer (:mod:`cnf.tabular`)."""
    from cnf.tabular import build_tabular_cnf as build

    return build(cfg, meta)


# dataset kind -> model builder; the tabular and image modules register theirs
BUILDERS: dict[str, Callable[[TrainConfig, dict[str, Any]], nn.Module]] = {
    "toy": build_vector_cnf,
    "tabular": build_tabular_cnf,
    "image": build_image_cnf,
}


def build_model(cfg: TrainConfig, meta: dict[str, Any]) -> nn.Module:
    if meta["kind"] not in BUILDERS:
        raise ValueError(f"no model builder for datasets of kind {meta['kind']!r}")
    return BUILDERS[meta["kind"]](cfg, meta)


# --- devices and data ------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from err


def open_dataset(
    cfg: TrainConfig, data_dir: str | None = None, *, trust_pickle: bool = False
) -> Dataset:
    """The config's dataset, with its ``data_dir`` (or the one given) for datasets read from
    files. A config (and so a checkpoint) names data but never grants trust: reading a file that
    unpickles (the MAF GAS set) needs ``trust_pickle`` from the caller."""
    options = dataset_options(cfg)
    if UNTRUSTED_OPTIONS & set(options):
        raise ConfigError("extra", "cannot hold trust_pickle: pass --trust-pickle instead")
    if data_dir or cfg.data_dir:
        options["data_dir"] = data_dir or cfg.data_dir
    return get_dataset(cfg.data, seed=cfg.seed, trust_pickle=trust_pickle, **options)


def configure_cuda(device: torch.device, tf32: bool) -> None:
    """On CUDA, allow TF32 matrix products and convolutions (Ampere and later: several times the
    float32 throughput; 10-bit mantissa products, float32 accumulation) and let cuDNN pick the
    fastest convolution for each shape. Process-wide settings; no effect on the CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True


def configure_threads(threads: int, device: torch.device, dim: int) -> int:
    """Small CNFs on a CPU run fastest on one thread: the per-op work is too small to split, and
    on a shared 2-core machine a second thread mostly contends (bench/bench_threads.py)."""
    if threads == 0:
        threads = 1 if device.type == "cpu" and dim <= 16 else torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


# --- the loop --------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a run produced."""

    out: Path
    iteration: int
    interrupted: int | None  # the signal that stopped the run, if one did
    best_val_nll: float
    report: dict[str, Any] | None


class _StopRequest:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current iteration."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum
        signal.signal(signum, signal.default_int_handler)  # a second Ctrl-C stops at once


@contextmanager
def _stop_on_signals() -> Iterator[_StopRequest]:
    stop = _StopRequest()
    try:
        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: no handlers, no clean stop
        previous = {}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _seed(seed: int, stream: int, iteration: int) -> int:
    return int(np.random.SeedSequence([seed, stream, iteration]).generate_state(1)[0])


def _generator(device: torch.device, seed: int, stream: int, iteration: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_seed(seed, stream, iteration))


def to_tensor(batch: Any, device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.as_tensor(batch).to(device=device, dtype=dtype)


def training_loss(model: nn.Module, x: Tensor, cfg: TrainConfig, generator: torch.Generator):
    """Mean negative log-likelihood (nats), plus RNODE's kinetic and Jacobian penalties."""
    regularize = cfg.kinetic > 0 or cfg.jacobian > 0
    out = model.to_latent(x, generator=generator, regularize=regularize)
    nll = -(model.base_log_prob(out.value) + out.logdet).mean()
    loss = nll
    if regularize:
        loss = loss + cfg.kinetic * out.kinetic.mean() + cfg.jacobian * out.jacobian.mean()
    return loss, nll


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The schedule in closed form (cosine down to 1% of ``lr``), so extending a resumed run
    with more iterations keeps one smooth curve."""
    if cfg.schedule == "constant":
        return 1.0
    progress = min(step, cfg.iters) / cfg.iters
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig):
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(cfg, step))
    return opt, sched


def solver_state(solver: Solver) -> dict[str, Any]:
    """The adapted part of a training solver, for checkpoints."""
    return {"method": solver.method, "step_size": solver.step_size, "atol": solver.atol,
            "rtol": solver.rtol}  # fmt: skip


# options that a resumed run may change: they steer neither the model nor the data
RESUMABLE = frozenset({"iters", "device", "threads", "lr", "max_nfe", "grad_clip", "patience",
                       "eval_every", "test_size", "validity_size", "eval_method", "eval_atol",
                       "eval_rtol", "eval_step_size"})  # fmt: skip


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    changes: dict[str, Any] | None = None,
    trust_pickle: bool = False,
) -> TrainResult:
    """Train a flow on ``cfg.data`` into the run directory ``out``.

    Everything (config, data, model, a resumed checkpoint) is validated before the run directory
    is touched, so a mistake never costs the user an existing run.

    Arguments:
        cfg: the run's configuration (ignored with ``resume``, which reads the saved one).
        out: the run directory; an existing non-empty one needs ``resume`` or ``force``.
        resume: continue from ``out/last.pt``.
        force: replace an existing run in ``out`` (only a cnf run, and only if it holds nothing
            else: see :mod:`cnf.rundir`).
        progress: show a progress bar (loss, NFE, it/s, ETA).
        changes: with ``resume``, new values for options in :data:`RESUMABLE` (e.g. more
            ``iters``, a lower ``lr``).
        trust_pickle: allow reading data files that unpickle (the MAF GAS set); never taken from
            a config or a checkpoint.
    """
    out = Path(out)
    if resume and force:
        raise ValueError(
            "--resume and --force contradict each other: --resume continues the run, --force "
            "replaces it; choose one"
        )
    ckpt = None
    if resume:
        ckpt = _resume_checkpoint(out)
        cfg = _resumed_config(ckpt, changes or {})
    else:
        rundir.check_new(out, force=force)
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    torch.manual_seed(cfg.seed)
    with held_warnings():  # a refused run prints its error alone
        data = open_dataset(cfg, trust_pickle=trust_pickle)
        if ckpt is not None:
            _check_same_data(ckpt, data, out)
        if hasattr(data, "check_range"):  # a table's values must fit the model's dtype
            data.check_range(cfg.dtype)
    if hasattr(data, "to"):  # image datasets keep their training images on the device
        data = data.to(device)
    dim = math.prod(data.event_shape)
    configure_threads(cfg.threads, device, dim)
    configure_cuda(device, cfg.tf32)
    model = build_model(cfg, data.meta()).to(device=device, dtype=dtype)
    if hasattr(model, "fit_preprocessing"):  # statistics of the training split only
        model.fit_preprocessing(data.train_data())
    opt, sched = make_optimizer(model, cfg)
    adapter = StepAdapter(cfg.adapt_threshold * dim, T=cfg.T, max_steps=cfg.max_steps)
    start, best, stale = 0, math.inf, 0
    if ckpt is not None:
        _load_training_state(ckpt, model, opt, sched, cfg, out)
        start, best = ckpt["iteration"], ckpt["best_val_nll"]
        stale = ckpt.get("stale_evals", 0)
        if start >= cfg.iters or (cfg.patience and stale >= cfg.patience):
            return _finished(out, start, data, device, dtype, trust_pickle)
        # only now, with everything checked, does the run directory change
        _truncate_log(out / "log.jsonl", start)
        if cfg.to_dict() != ckpt["config"]:
            write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    else:
        if cfg.step_size is None and training_solver(model).fixed_step:
            x = to_tensor(data.train_batch(cfg.batch_size, 1), device, dtype)
            solver = training_solver(model)
            h = initial_step(model, x, solver.order, rtol=cfg.rtol, atol=cfg.atol)
            set_training_solver(model, adapter.scaled(solver.replace(step_size=h), 1.0))
        rundir.create(out)
        write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    x_val = to_tensor(data.validation(), device, dtype)
    saved = {"iteration": start if ckpt is not None else None}

    def checkpoint(name: str, iteration: int) -> None:
        save_checkpoint(out / name, {
            "config": cfg.to_dict(), "data": data.meta(), "model": model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "solver": solver_state(training_solver(model)), "iteration": iteration,
            "best_val_nll": best, "stale_evals": stale, "data_fingerprint": data.fingerprint(),
        })  # fmt: skip
        if name == "last.pt":
            saved["iteration"] = iteration

    def diverged() -> Any:
        return _diverged(it, out, saved["iteration"], cfg)

    it = start
    with (
        _stop_on_signals() as stop,
        open(out / "log.jsonl", "a") as log,
        tqdm(total=cfg.iters, initial=start, disable=not progress, dynamic_ncols=True,
             desc=f"train {cfg.data}", mininterval=0.5) as bar,
    ):  # fmt: skip
        for it in range(start + 1, cfg.iters + 1):
            t0 = time.perf_counter()
            x = to_tensor(data.train_batch(cfg.batch_size, it), device, dtype)
            row: dict[str, Any] = {"iter": it}
            if cfg.adapt and it % cfg.adapt_every == 0:
                # Ott et al.: does a finer solver agree on this batch? If not, refine the step.
                metric = batch_nll_metric(model, x, _seed(cfg.seed, 2, it))
                with diverged():
                    solver, row["adapt"] = adapter.adapt(training_solver(model), metric)
                set_training_solver(model, solver)
            with diverged():
                loss, nll = training_loss(model, x, cfg, _generator(device, cfg.seed, 1, it))
                opt.zero_grad(set_to_none=True)
                loss.backward()
            clip = cfg.grad_clip or math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                with diverged():
                    raise SolverError(
                        f"loss {loss.item():.4g}, gradient norm {grad_norm.item():.4g}"
                    )
            opt.step()
            sched.step()
            solver = training_solver(model)
            row.update(loss=loss.item(), nll=nll.item(), nfe=model.nfe.forward,
                       nfe_backward=model.nfe.backward, grad_norm=grad_norm.item(),
                       lr=sched.get_last_lr()[0], step_size=solver.step_size, atol=solver.atol,
                       rtol=solver.rtol, time=time.perf_counter() - t0)  # fmt: skip
            evaluated = it % cfg.eval_every == 0 or it == cfg.iters
            if evaluated:
                ev = evaluate(model, x_val)
                row.update(val_nll=ev.nll, val_nll_se=ev.nll_se, val_nfe=ev.nfe)
                bpd = "" if ev.bits_per_dim is None else f", {ev.bits_per_dim:.4f} bits/dim"
                if bpd:
                    row["val_bits_per_dim"] = ev.bits_per_dim
                bar.write(f"iter {it}: val NLL {ev.nll:.4f} ± {ev.nll_se:.4f}{bpd} (NFE {ev.nfe}), "
                          f"training solver {solver.describe()}", sys.stderr)  # fmt: skip
                improved = ev.nll < best
                stale = 0 if improved else stale + 1
                best = min(best, ev.nll)
            # the log row goes first: a kill between the two leaves an extra row, which the
            # resume drops, never a missing one
            log.write(json.dumps(row) + "\n")
            log.flush()
            if evaluated:
                if improved:
                    checkpoint("best.pt", it)
                checkpoint("last.pt", it)
            if cfg.patience and stale >= cfg.patience:
                message = f"no better validation NLL in {stale} evaluations (--patience)"
                bar.write(f"early stop at iteration {it}: {message}", sys.stderr)
                break
            bar.set_postfix(loss=f"{row['loss']:.3f}", nfe=f"{row['nfe']}/{row['nfe_backward']}",
                            best=f"{best:.3f}", refresh=False)  # fmt: skip
            bar.update()
            if stop.signal is not None:
                if not evaluated:
                    checkpoint("last.pt", it)
                name = signal.Signals(stop.signal).name
                bar.write(f"{name}: saved iteration {it}; continue with cnf train --resume {out}",
                          sys.stderr)  # fmt: skip
                return TrainResult(out, it, stop.signal, best, None)
    report = final_report(out, data, device, dtype)
    return TrainResult(out, it, None, best, report)


def _resume_checkpoint(out: Path) -> dict[str, Any]:
    if not (out / "last.pt").is_file():
        hint = (" (the run stopped before its first checkpoint: start it again with --force)"
                if (out / "config.json").is_file() else "")  # fmt: skip
        raise CheckpointError(f"cannot resume: {out / 'last.pt'} does not exist{hint}")
    return load_checkpoint(out / "last.pt")


def _resumed_config(ckpt: dict[str, Any], changes: dict[str, Any]) -> TrainConfig:
    clash = sorted(set(changes) - RESUMABLE)
    if clash:
        flags = ", ".join("--" + c.replace("_", "-") for c in clash)
        raise ValueError(
            f"{flags} cannot change when resuming (the saved config is used; these options may: "
            f"{', '.join('--' + c.replace('_', '-') for c in sorted(RESUMABLE))}): start a new "
            "run to change them"
        )
    cfg = TrainConfig.from_dict({**ckpt["config"], **changes})
    if cfg.iters < ckpt["iteration"]:
        raise ConfigError(
            "iters", f"{cfg.iters} is below the {ckpt['iteration']} iterations this run has "
            "already trained: give a larger number to train further"
        )  # fmt: skip
    return cfg


def _load_training_state(ckpt, model, opt, sched, cfg: TrainConfig, out: Path) -> None:
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        set_training_solver(model, training_solver(model).replace(**ckpt["solver"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else repr(err)
        raise CheckpointError(f"{out / 'last.pt'} does not fit its own config ({detail})") from err
    # a changed --lr keeps the schedule's shape and scales it
    sched.base_lrs = [cfg.lr for _ in sched.base_lrs]
    for group in opt.param_groups:
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * lr_factor(cfg, sched.last_epoch)


def _finished(out: Path, iteration: int, data, device, dtype, trust_pickle: bool) -> TrainResult:
    """A resume of a run that has nothing left to train: its report, made if it is missing."""
    path = out / "report.json"
    if path.is_file():
        print(f"the run in {out} has finished (iteration {iteration}); its report is {path}",
              file=sys.stderr)  # fmt: skip
        return TrainResult(out, iteration, None, math.nan, json.loads(path.read_text()))
    return TrainResult(out, iteration, None, math.nan, final_report(out, data, device, dtype))


@contextmanager
def _diverged(iteration: int, out: Path, saved: int | None, cfg: TrainConfig) -> Iterator[None]:
    """Re-raise a failed solve or a non-finite loss with advice that fits: resume from the last
    checkpoint with a lower learning rate, or, with no checkpoint yet, start again."""
    try:
        yield
    except SolverError as err:
        lower = f"{cfg.lr / 10:.3g}"
        if iteration == 1:  # no optimizer step yet: the learning rate cannot be the cause
            advice = (
                "it failed before the first training step, so the initial model and the setup "
                "are the cause, not the learning rate: check --T, the solver (--method, "
                "--step-size, --max-nfe) and the scale of the data, then start again with --force"
            )
        elif saved is None:
            advice = (
                f"no checkpoint was saved yet (the first comes at iteration "
                f"{min(cfg.eval_every, cfg.iters)}): start again with --force and a lower --lr "
                f"(e.g. {lower}), a finer solver or --kinetic/--jacobian regularization"
            )
        else:
            advice = (
                f"the last good checkpoint is {out / 'last.pt'} (iteration {saved}): continue "
                f"from it with a lower learning rate (cnf train --resume {out} --lr {lower}; "
                "--max-nfe can change too), or start a new run with a finer solver or "
                "--kinetic/--jacobian regularization"
            )
        problem = getattr(err, "problem", str(err))
        raise SolverError(f"training diverged at iteration {iteration}: {problem}", advice) from err


def _truncate_log(path: Path, iteration: int) -> None:
    """Drop log rows past the checkpoint (a hard kill can leave some) before a resume."""
    if path.is_file():
        rows = path.read_text().splitlines()
        kept = [r for r in rows if r.strip() and json.loads(r)["iter"] <= iteration]
        write_text(path, "".join(r + "\n" for r in kept))


def _check_same_data(ckpt: dict[str, Any], data: Dataset, out: Path) -> None:
    if ckpt["data"] != data.meta():
        raise CheckpointError(
            f"{out / 'last.pt'} was trained on {ckpt['data']} but the dataset now gives "
            f"{data.meta()}: resume with the same data, or start a new run"
        )
    saved = ckpt.get("data_fingerprint")
    if saved is not None and saved != data.fingerprint():
        raise CheckpointError(
            f"the training data changed since {out / 'last.pt'} was written (content "
            f"fingerprint {saved[:12]}, now {data.fingerprint()[:12]}): resume with the data the "
            "run was trained on, or start a new run"
        )


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """Rebuild the model in a checkpoint (or a run directory's ``best.pt``), in eval mode.

    Returns:
        The model, its training config and the checkpoint's dataset description.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    ckpt = load_checkpoint(path)
    try:
        cfg = TrainConfig.from_dict(ckpt["config"])
        model = build_model(cfg, ckpt["data"])
        model.to(DTYPES[cfg.dtype]).load_state_dict(ckpt["model"])
        if "solver" in ckpt:
            set_training_solver(model, training_solver(model).replace(**ckpt["solver"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
        detail = next((ln for ln in lines if ln.startswith(("size mismatch", "Missing", "Unexp"))),
                      lines[0])  # fmt: skip
        raise CheckpointError(
            f"{path} does not fit this cnf model ({detail[:300]}): it was written for other data "
            "or by another version"
        ) from err
    return model.to(resolve_device(str(device))).eval(), cfg, ckpt["data"]


def final_report(out: Path, data: Dataset, device: torch.device, dtype: torch.dtype) -> dict:
    """Evaluate the best checkpoint on fresh test data with the solver-validity verdict; write
    report.json and the figures."""
    model, cfg, _ = load_model(out / "best.pt", device)
    x_test = to_tensor(data.test(cfg.test_size), device, dtype)
    report = evaluate(model, x_test, entropy=getattr(data, "entropy", None)).to_dict()
    validity = solver_validity(model, x_test[: cfg.validity_size])
    report["validity"] = validity.to_dict()
    print(validity.summary(), file=sys.stderr)
    write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    from cnf import viz

    viz.plot_solver(out / "log.jsonl", out / "solver.png")
    if data.kind == "toy":
        viz.plot_run(model, data, out)
    if data.kind == "tabular":
        viz.plot_marginals(model, data, out / "marginals.png")
    if data.kind == "image":
        viz.save_sample_grid(model, out / "samples.png")
    return report
