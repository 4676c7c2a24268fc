"""Multi-process data parallelism with ``torch.distributed`` (launched by ``torchrun``).

Every rank holds the full policy and sees the same prompts. Generation is split (rank r samples
prompts r, r+W, ...), the scored groups are all-gathered, so dynamic-sampling decisions, group
statistics and the token-level normaliser are computed identically on every rank from the global
batch. Each rank then trains on the samples it owns (sample i belongs to rank i mod W) and the
gradients are summed across ranks before the optimiser step: the update equals the
single-process update to float rounding, whatever W.

Why an explicit gradient all-reduce rather than the ``DistributedDataParallel`` wrapper: ranks
process different numbers of micro-batches (zero-advantage and overlong-filtered samples get no
forward/backward), and DDP requires every rank to run the same number of synchronised backward
passes. Summing the gradients once per optimiser step, in one flattened bucket, is the same
communication DDP performs, without that constraint.

CPU runs use the gloo backend, CUDA runs NCCL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def owns(self, sample_index: int) -> bool:
        """Whether this rank trains sample ``sample_index`` of the global batch."""
        return sample_index % self.world_size == self.rank

    def all_gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def all_reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum gradients over ranks in one flattened bucket; a missing gradient counts as zero."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_preference: str = "auto") -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_preference != "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
