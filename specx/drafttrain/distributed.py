"""The processes of one train-draft job: one by default, N under a launcher (``torchrun --nproc-per-node N -m
specx.drafttrain``, ``accelerate launch``), which sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address.
gloo on CPUs, NCCL on GPUs (the process's LOCAL_RANK-th).

The data phases split their shards by rank (shard i: process i mod N) and meet at barriers; training is
DistributedDataParallel over one global batch (each process a slice of it); the main process (rank 0) writes the
manifests, the checkpoints and the bundle. Every collective has a timeout: a process that dies or hangs makes the
others fail with a DistributedTrainingError rather than wait forever (torchrun also stops the job and names the
process that failed first), and running the same command again resumes from the last shard or checkpoint. The work
directory must be one every process reads and writes (one machine, or a filesystem the machines share).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import inspect
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from specx.errors import SpecxError

DEFAULT_TIMEOUT_SECONDS = 1800.0  # a collective waits this long for the other processes (a shard's imbalance)


class DistributedTrainingError(SpecxError):
    """A process of a multi-process job stopped, hung, or could not join the others."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def mine(self, index: int) -> bool:
        """Whether shard ``index`` is this process's to write (round robin: each shard has one writer)."""
        return index % self.world_size == self.rank

    def barrier(self, where: str) -> None:
        """Wait for every process (gloo: a monitored barrier, whose error names the processes that did not come)."""
        if not self.distributed:
            return
        with self.collective(where):
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(wait_all_ranks=True)
            else:
                dist.barrier()

    def total(self, value: torch.Tensor, where: str) -> torch.Tensor:
        """The sum of ``value`` (a tensor) over the processes."""
        if not self.distributed:
            return value
        summed = value.detach().clone()
        with self.collective(where):
            dist.all_reduce(summed)
        return summed

    @contextlib.contextmanager
    def collective(self, where: str) -> Iterator[None]:
        """Turn a collective's failure (gloo and NCCL raise RuntimeError: a peer closed, a timeout) into one
        error that says what to do."""
        if not self.distributed:
            yield
            return
        try:
            yield
        except RuntimeError as exc:
            raise DistributedTrainingError(
                f"process {self.rank} of {self.world_size}: {where} failed ({str(exc).splitlines()[0]}); another "
                "process of the job stopped or did not answer in time (the launcher's report names the process that "
                "failed first). Run the same command again to resume from the last shard or checkpoint") from exc


def job_ranks() -> Ranks:
    """This process's place in the job, from the launcher's environment (none: a job of one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Ranks(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def processes(device: str, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> Iterator[tuple[Ranks, str]]:
    """(ranks, this process's device): joins the launcher's process group for the span (gloo on CPUs, NCCL on
    GPUs), and leaves it after."""
    ranks = job_ranks()
    if not ranks.distributed:
        yield ranks, device
        return
    if device == "cuda":
        torch.cuda.set_device(ranks.local_rank)
        device = f"cuda:{ranks.local_rank}"
    joined = not dist.is_initialized()
    if joined:
        try:
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                    timeout=_dt.timedelta(seconds=timeout_seconds))
        except (RuntimeError, ValueError) as exc:
            raise DistributedTrainingError(f"process {ranks.rank} of {ranks.world_size} could not join the others "
                                           f"({exc}); start every process with the same launcher command") from exc
    try:
        yield ranks, device
    finally:
        if joined:
            dist.destroy_process_group()


def data_parallel(module: nn.Module, ranks: Ranks, device: str) -> nn.Module:
    """``module`` itself in a job of one, else DistributedDataParallel over it: gradients averaged over the
    processes in backward. Buffers (the draft's frozen embedding and rotary tables: the same in every process) are
    not synchronised at every forward."""
    if not ranks.distributed:
        return module
    options = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    quiet = {"forward_sync_buffers": False} if "forward_sync_buffers" in options else {"broadcast_buffers": False}
    with ranks.collective("setting up DistributedDataParallel"):
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[ranks.local_rank] if device.startswith("cuda") else None, **quiet)
