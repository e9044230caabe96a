"""Where computations run: devices, CPU threads, CUDA settings, and moving batches there."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, checked."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


SAMPLE_CHUNK = 10_000  # samples per solve when many are asked for: memory stays bounded


def available_memory() -> int:
    """Bytes of memory this machine can still give a process: Linux's ``MemAvailable``, or the
    physical memory where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return 2**63 - 1  # unknown: nothing is refused


def physical_memory() -> int | None:
    """The machine's physical memory in bytes (``None`` where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name
        return None


def check_memory(nbytes: float, what: str, fix: str) -> None:
    """Refuse, before any work, a job that needs more memory than the machine has available;
    ``what`` says what needs it, ``fix`` what to do (the user's own flag or argument)."""
    free = available_memory()
    if nbytes > free:
        raise ValueError(
            f"{what} need about {nbytes / 1e9:.3g} GB of memory, but this machine has "
            f"{free / 1e9:.3g} GB available: {fix}"
        )


# torch's thread count when cnf was imported: a different one later is the user's own choice
_IMPORT_THREADS = torch.get_num_threads()


SMALL = 16  # dimensions up to which a model runs on one CPU thread


def configure_threads(threads: int, device: torch.device, dim: int) -> int:
    """``threads`` 0 chooses for a model of ``dim`` dimensions on ``device``: on a CPU, one
    thread for a small model, and for a larger one as many as the machine has idle cores, at
    most torch's default. A thread whose core another job holds makes every step wait for it:
    beside one busy process on 2 cores, two threads were 2.2 to 3.5 times slower than one for
    every model size; on the idle machine they gained 1.2 to 1.3 times on the 2-D toys, too
    little for that risk, and up to 1.5 on a U-Net (bench/bench_threads.py). A count the caller
    set with ``torch.set_num_threads`` (:func:`chosen_threads`, and not one this rule set
    before) stays theirs, as an explicit ``threads`` does. Sets the count for the process (a
    command's, or training's) and returns it."""
    own = chosen_threads() if threads == 0 else 0
    if own and _SET != [own]:
        return own
    _SET[:] = [_rule(threads, device, dim)]
    return _SET[0]


def _rule(threads: int, device: torch.device, dim: int) -> int:
    if threads == 0:
        threads = _IMPORT_THREADS
        if device.type == "cpu":
            idle = idle_cores() if dim > SMALL else 1.0
            threads = threads if idle is None else max(1, min(threads, round(idle)))
    torch.set_num_threads(threads)
    return threads


_SET: list[int] = []  # the count configure_threads last set for the process
_RULING = [0]  # how many thread_rule blocks are open (a flow's calls inside one are ruled)


_IDLE: list[float] = []  # the last measurement: [when, idle cores]
IDLE_WINDOW, IDLE_FOR = 0.1, 10.0  # seconds measured over, and how long a measurement holds


def idle_cores() -> float | None:
    """How many of the machine's cores were idle over :data:`IDLE_WINDOW` seconds (Linux's
    ``/proc/stat``, measured again after :data:`IDLE_FOR` seconds; ``None`` where the system
    does not say)."""
    if _IDLE and time.monotonic() - _IDLE[0] < IDLE_FOR:
        return _IDLE[1]
    try:
        idle0, all0 = _cpu_times()
        time.sleep(IDLE_WINDOW)
        idle1, all1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    if all1 <= all0:
        return None
    _IDLE[:] = [time.monotonic(), (idle1 - idle0) / (all1 - all0) * (os.cpu_count() or 1)]
    return _IDLE[1]


def _cpu_times() -> tuple[float, float]:
    """The machine's idle and total CPU time so far (clock ticks, every core)."""
    with open("/proc/stat") as f:
        ticks = [float(v) for v in f.readline().split()[1:]]
    return ticks[3] + ticks[4], sum(ticks[:8])  # idle and iowait; user to steal


def chosen_threads() -> int:
    """The thread count the caller chose (``torch.set_num_threads`` to a count other than the
    one torch had when cnf was imported), or 0: none, so cnf's rule applies."""
    now = torch.get_num_threads()
    return now if now != _IMPORT_THREADS else 0


@contextmanager
def thread_rule(device: torch.device, dim: int) -> Iterator[None]:
    """Inside the block, :func:`configure_threads`' rule, unless the caller chose a count of
    their own (:func:`chosen_threads`); the caller's count is restored after. For the Python
    entry points, which must not change the process's setting."""
    before = torch.get_num_threads()
    _rule(chosen_threads(), device, dim)
    _RULING[0] += 1
    try:
        yield
    finally:
        _RULING[0] -= 1
        torch.set_num_threads(before)


def ruled(method: Callable) -> Callable:
    """A flow's public ``method`` (``log_prob``, ``sample``, ...) under :func:`thread_rule` when
    a user's own code calls it on a CPU model in eval mode, as after ``cnf.load_run``. Not in
    training mode (a user's training loop sets its own count), inside an entry point that
    already rules (``CNFDensity``, nested calls), or where a command or ``train`` has set the
    process's count and it still holds."""

    @functools.wraps(method)
    def run(self, *args: Any, **kwargs: Any) -> Any:
        if self.training or _RULING[0] or _SET == [torch.get_num_threads()]:
            return method(self, *args, **kwargs)
        device = self._like().device
        if device.type != "cpu":
            return method(self, *args, **kwargs)
        with thread_rule(device, self.dim):
            return method(self, *args, **kwargs)

    return run


def configure_cuda(device: torch.device, tf32: bool) -> None:
    """On CUDA, allow TF32 matrix products and convolutions (Ampere and later: several times the
    float32 throughput; 10-bit mantissa products, float32 accumulation) and let cuDNN pick the
    fastest convolution for each shape. Process-wide settings; no effect on the CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True


def to_tensor(batch: Any, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A batch (numpy array or tensor) on ``device`` in ``dtype``."""
    return torch.as_tensor(batch).to(device=device, dtype=dtype)


def to_tensors(
    batch: Any, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """A batch's rows ``x`` on ``device`` in ``dtype``, and a conditional dataset's conditions
    (its batches are pairs ``(x, c)``): labels as integers, features in ``dtype``; ``None``
    for a dataset without them."""
    if not hasattr(batch, "c"):
        return to_tensor(batch, device, dtype), None
    c = torch.as_tensor(batch.c)
    c = c.to(device=device, dtype=dtype if c.is_floating_point() else torch.long)
    return to_tensor(batch.x, device, dtype), c
