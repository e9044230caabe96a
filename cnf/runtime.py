"""Where computations run: devices, CPU threads, CUDA settings, and moving batches there."""

from __future__ import annotations

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


def configure_threads(threads: int, device: torch.device, dim: int) -> int:
    """Small CNFs on a CPU run fastest on one thread: the per-op work is too small to split, and
    on a shared 2-core machine a second thread mostly contends (bench/bench_threads.py).
    ``threads`` 0 chooses so; returns the number set."""
    if threads == 0:
        threads = 1 if device.type == "cpu" and dim <= 16 else torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


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
