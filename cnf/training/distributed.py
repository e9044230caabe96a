"""Training on several processes with PyTorch's own engine: ``torchrun`` and
DistributedDataParallel.

``torchrun --standalone --nproc_per_node=N -m cnf train ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`from_environment` joins them into one process group
(``nccl`` on CUDA, one device per process; ``gloo`` on the CPU). The global batch stays
``--batch-size``: every process draws the batch of ``(seed, iteration)`` that one process would,
with its noise (Hutchinson probes, flow matching's noise, times and pairing), and trains on its
disjoint share of the rows, so a run's result does not depend on the number of processes beyond
the order of floating-point reductions (and an adaptive training solver's own steps, which it
chooses per share). Everything that steers training is agreed on by a collective: the loss that
is logged, the step adapter's metric, a failed solve on any process, a stop signal.
"""

from __future__ import annotations

import datetime
import gc
import inspect
import os
from dataclasses import dataclass

import torch
from torch import Tensor

# a process that stops answering ends the job after this long, not torch's default 30 minutes
TIMEOUT = datetime.timedelta(seconds=60)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job (one process: rank 0 of 1, and every method trivial)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and shows progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise ValueError(
                f"--batch-size {batch_size} does not divide among {self.world} processes: the "
                f"global batch is split into equal shares; use a multiple of {self.world}"
            )

    def shard(self, n: int) -> tuple[int, int]:
        """This process's rows ``(start, stop)`` of a training batch of ``n`` (equal shares)."""
        per = n // self.world
        return self.rank * per, (self.rank + 1) * per

    def share(self, n: int) -> slice:
        """This process's rows of an evaluation set of ``n`` (shares differ by at most one)."""
        bounds = [n * r // self.world for r in range(self.world + 1)]
        return slice(bounds[self.rank], bounds[self.rank + 1])

    def mean(self, values: list[float]) -> list[float]:
        """The mean over processes of each value (one collective)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return (t / self.world).tolist()

    def maximum(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.tolist()

    def first_error(self, message: str | None) -> str | None:
        """The error of the lowest rank that had one, on every process (``None``: none had)."""
        if not self.active:
            return message
        failed = self.maximum([0.0 if message is None else float(self.world - self.rank)])[0]
        if not failed:
            return None
        messages: list = [None] * self.world
        torch.distributed.all_gather_object(messages, message)
        return next(m for m in messages if m is not None)

    def gather(self, t: Tensor) -> Tensor:
        """Every process's 1-D tensor, joined in rank order (shares may differ in length)."""
        if not self.active:
            return t
        sizes = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.world)]
        torch.distributed.all_gather(sizes, torch.tensor([len(t)], device=self.device))
        longest = int(max(sizes).item())
        padded = torch.zeros(longest, dtype=t.dtype, device=self.device)
        padded[: len(t)] = t.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(parts, padded)
        joined = torch.cat([p[: int(n.item())] for p, n in zip(parts, sizes, strict=True)])
        return joined.to(t.device)

    def broadcast(self, obj):
        """Rank 0's ``obj`` (plain, picklable data), on every process."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    @property
    def device(self) -> torch.device:
        """Where collectives run: this process's GPU under nccl, else the CPU."""
        if self.active and torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` in DistributedDataParallel (gradients averaged over processes during the
        backward pass, parameters broadcast from rank 0 first); itself with one process."""
        if not self.active:
            return module
        ids = [self.local_rank] if self.device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel
        # the buffers (a table's normalizer, log T) are the same on every process: no syncing
        quiet = ("forward_sync_buffers" if "forward_sync_buffers" in
                 inspect.signature(ddp).parameters else "broadcast_buffers")  # fmt: skip
        return ddp(module, device_ids=ids, **{quiet: False})


SINGLE = Distributed()


def from_environment(device: str = "auto") -> Distributed:
    """This process's :class:`Distributed`: joins torchrun's process group when ``WORLD_SIZE``
    says there is more than one process (once; later calls return the same)."""
    world = environment_int("WORLD_SIZE", "1")
    if world <= 1:
        return SINGLE
    if "RANK" not in os.environ:
        raise ValueError(
            f"WORLD_SIZE={world} is set but RANK is not: start the processes with torchrun "
            "(which sets both), or unset WORLD_SIZE to train in one process"
        )
    rank, local = environment_int("RANK", "0"), environment_int("LOCAL_RANK", "0")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not one of the {world} processes of WORLD_SIZE={world}")
    if not torch.distributed.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"--device {device}: CUDA is not available here, so the nccl backend cannot "
                "run; use --device cpu (gloo) or auto"
            )
        if cuda and local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} GPUs: "
                "start at most one process per GPU (--nproc_per_node)"
            )
        if cuda:
            torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return Distributed(rank, world, local)


def environment_int(name: str, default: str) -> int:
    text = os.environ.get(name, default)
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"{name}={text!r} is not a number: torchrun sets it; unset it to train in one process"
        ) from None


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only one): it alone prints errors and output."""
    return os.environ.get("RANK", "0").strip() in ("0", "")


def shutdown() -> None:
    """Leave the process group. DistributedDataParallel's reducers hold it and can outlive their
    models in reference cycles; collected at interpreter exit, after the group is destroyed,
    gloo's threads abort the process (one run in five of tests/test_distributed.py did)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()
