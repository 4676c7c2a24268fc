"""Multi-process training with ``torch.distributed`` (launched by ``torchrun``): DDP or FSDP2.

Every rank sees the same prompts. Generation is split (rank r samples prompts r, r+W, ...), the
scored groups are all-gathered, so dynamic-sampling decisions, group statistics and the
token-level normaliser are computed identically on every rank from the global batch. Each rank
then trains on the samples it owns (sample i belongs to rank i mod W) and the gradients are
summed across ranks: the update equals the single-process update to float rounding, whatever W.

Two strategies (``distributed.strategy``):

- ``ddp``: every rank holds the whole model, wrapped in ``DistributedDataParallel``. Gradients
  of a mini-batch accumulate locally (``no_sync``) and are all-reduced by DDP's bucketed,
  backward-overlapped all-reduce in the mini-batch's last backward.
- ``fsdp2``: ``fully_shard`` on every decoder layer and the root. Parameters, gradients and
  AdamW state are split across ranks (each holds 1/W); a layer's parameters are all-gathered
  for its forward and backward and its gradients reduce-scattered. For generation the
  parameters are gathered once per step (:meth:`DistContext.gathered`) and freed afterwards,
  so the optimiser state (2× the parameters) and gradients (1×) stay sharded all along.

Both reduce gradients by summation, not DDP's/FSDP's default mean: the loss of each rank is
already divided by the global normaliser (tokens of the whole mini-batch on all ranks).

The collectives require every rank to run the same sequence of them. Ranks own different
numbers of trainable samples (zero-advantage and overlong-filtered ones get no forward), so
:meth:`DistContext.micro_batch_count` tells every rank how many micro-batches the busiest rank
runs; a rank with fewer runs zero-weight placeholders (FSDP2: every forward/backward is
collective; DDP: only the synchronising last backward must exist on every rank).

Checkpoints hold full (unsharded) state, keyed by parameter name, and are written by rank 0:
they resume on any world size and either strategy. CPU runs use the gloo backend, CUDA NCCL.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

# GIL-free pause before leaving the process group (see shutdown_distributed).
GLOO_RELEASE_PAUSE_S = 0.1


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"
    reshard_after_forward: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """FSDP2: every forward and backward of the policy is a collective."""
        return self.enabled and self.strategy == "fsdp2"

    def owners(self, num_samples: int) -> torch.Tensor:
        """``[num_samples]`` the rank that trains each sample of the global batch (i mod W)."""
        return torch.arange(num_samples) % self.world_size

    # ------------------------------------------------------------------ model wrapping

    def wrap_policy(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run training forwards through (``model`` itself stays the plain model).

        DDP: a ``DistributedDataParallel`` wrapper whose all-reduce sums. FSDP2: ``model`` is
        sharded in place and returned. Alone: ``model``. Call before building the optimiser.
        """
        if not self.enabled:
            return model
        if self.strategy == "fsdp2":
            self._shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel

        on_cuda = next(model.parameters()).device.type == "cuda"
        # Rotary tables are the only buffers and are identical everywhere: no per-forward broadcast.
        wrapped = DistributedDataParallel(model, device_ids=[self.local_rank] if on_cuda else None, forward_sync_buffers=False)
        wrapped.register_comm_hook(state=None, hook=_sum_allreduce_hook)
        return wrapped

    def wrap_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen model (the KL reference): sharded like the policy under FSDP2, else as is."""
        if self.sharded:
            self._shard(model)
        return model

    def _shard(self, model: torch.nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        # Hugging Face lists the blocks that must not be split (the decoder layers): one FSDP
        # unit each, so only one layer's full parameters exist at a time; the root takes the rest.
        block_names = set(getattr(model, "_no_split_modules", None) or ())
        blocks = [m for m in model.modules() if type(m).__name__ in block_names]
        for block in blocks:
            fully_shard(block, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, reshard_after_forward=self.reshard_after_forward)
        for unit in _fsdp_units(model):
            # A plain SUM reduce-scatter, as in the single-process update (a divide factor alone
            # would use PREMUL_SUM for fp32, which gloo lacks).
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)

    @contextmanager
    def gathered(self, model: torch.nn.Module) -> Iterator[None]:
        """Hold ``model``'s full parameters as plain tensors (FSDP2), for generation or evaluation.

        Collective: every rank must enter. Inside, the rollout engines read and run the model
        as a plain module and ranks need not stay in step. Without FSDP2 this does nothing.
        """
        units = _fsdp_units(model) if self.sharded else []
        if not units:
            yield
            return
        for unit in units:
            unit.unshard()
            unit.set_reshard_after_forward(False, recurse=False)  # a forward inside must not free them
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(self.reshard_after_forward, recurse=False)

    def no_sync(self, train_model: torch.nn.Module, last: bool):
        """DDP: skip the all-reduce in every backward of a mini-batch but the last."""
        if last or not hasattr(train_model, "no_sync"):
            return nullcontext()
        return train_model.no_sync()

    def micro_batch_count(self, counts_per_rank: list[int]) -> int:
        """Micro-batches this rank runs in a training pass, given how many each rank has real work for.

        FSDP2: as many as the busiest rank (each is a collective). DDP: at least one when any
        rank trains (the last backward all-reduces). Alone: its own count.
        """
        mine = counts_per_rank[self.rank]
        if not self.enabled or max(counts_per_rank) == 0:
            return mine
        if self.sharded:
            return max(counts_per_rank)
        return max(mine, 1)

    def micro_batches_per_rank(self, work: torch.Tensor, size: int) -> list[int]:
        """``work [num_samples]`` bool over the global batch → micro-batches of ``size`` each rank needs
        for the samples it owns (every rank computes the same list without asking the others)."""
        owner = self.owners(work.numel())
        return [math.ceil(int((work & (owner == r)).sum()) / size) for r in range(self.world_size)]

    def balanced_micro_batches(self, work: torch.Tensor, size: int, placeholder: Callable[[], None], *,
                               train_model: torch.nn.Module | None = None) -> Iterator[list[int]]:
        """This rank's micro-batches of the samples it owns where ``work`` is True, in step with the other ranks.

        Yields lists of global sample indices, ``size`` at most. A training pass passes
        ``train_model``: each micro-batch is then processed inside DDP's ``no_sync`` but the last,
        whose backward all-reduces. Where the collectives need this rank after its own work has
        run out (FSDP2: every forward; DDP: the synchronising backward), ``placeholder()`` runs
        instead: a zero-weight pass that adds exactly nothing to any gradient.
        """
        counts = self.micro_batches_per_rank(work, size)
        if train_model is not None:
            runs = self.micro_batch_count(counts)
        else:  # a no-grad pass: only FSDP2's forwards are collective
            runs = max(counts) if self.sharded else counts[self.rank]
        owner = self.owners(work.numel())
        mine = [i for i in range(work.numel()) if work[i] and owner[i] == self.rank]
        for run in range(runs):
            batch = mine[run * size : (run + 1) * size]
            with self.no_sync(train_model, run == runs - 1) if train_model is not None else nullcontext():
                if batch:
                    yield batch
                else:
                    placeholder()

    # ------------------------------------------------------------------ state for checkpoints

    def full_model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's state on CPU, on rank 0 (other ranks get ``{}``). Collective under FSDP2."""
        if not self.sharded:
            return {k: v.detach().cpu() for k, v in model.state_dict().items()} if self.is_main else {}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def full_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """AdamW state keyed by parameter name (whatever the world size) on rank 0. Collective under FSDP2."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if self.sharded:
            return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return get_optimizer_state_dict(model, optimizer) if self.is_main else {}

    def load_full_model_state(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Load a full state (as saved) into the plain or sharded model; returns (missing, unexpected)."""
        if not self.sharded:
            result = model.load_state_dict(state, strict=False)
            return list(result.missing_keys), list(result.unexpected_keys)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        result = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return list(result.missing_keys), list(result.unexpected_keys)

    def load_full_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True) if self.sharded else None
        set_optimizer_state_dict(model, optimizer, state, options=options)

    # ------------------------------------------------------------------ collectives on plain data

    def all_gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _sum_allreduce_hook(state, bucket):  # unannotated: DDP inspects the annotations, which are strings here
    """DDP communication hook: sum a gradient bucket over ranks (DDP's default divides by W)."""
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def init_distributed(device_preference: str = "auto", strategy: str = "ddp", reshard_after_forward: bool = True) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(strategy=strategy, reshard_after_forward=reshard_after_forward)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_preference != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, strategy=strategy,
                       reshard_after_forward=reshard_after_forward)


def shutdown_distributed() -> None:
    """Leave the process group (no-op when there is none).

    Gloo's worker threads drop their reference to a collective's tensors only after the caller
    has seen it complete. Dropping the last reference to a tensor that Python created takes the
    GIL, and a thread that asks for it while the interpreter shuts down aborts the process
    (SIGABRT, "terminate called without an active exception": a rank that ends right after its
    last collective, seen in about 1 run in 13). The process group is not freed by
    ``destroy_process_group`` while DDP has used it, so its threads are never joined; a short
    GIL-free pause lets them finish first.
    """
    if dist.is_available() and dist.is_initialized():
        time.sleep(GLOO_RELEASE_PAUSE_S)
        dist.destroy_process_group()
