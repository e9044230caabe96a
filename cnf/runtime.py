"""Where computations run: devices, CPU threads, CUDA settings, and moving batches there."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


def configure_threads(threads: int, device: torch.device, dim: int) -> int:
    """Small CNFs on a CPU run fastest on one thread: the per-op work is too small to split, and
    on a shared 2-core machine a second thread mostly contends (bench/bench_threads.py).
    ``threads`` 0 chooses so; returns the number set."""
    if threads == 0:
        threads = 1 if device.type == "cpu" and dim <= 16 else torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


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
    configure_threads(chosen_threads(), device, dim)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
