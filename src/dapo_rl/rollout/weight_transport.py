"""Weight transport over torch.distributed: the trainer broadcasts named tensors to a rollout
server's workers through a process group of its own (gloo on CPU, NCCL on GPU). No files.

Both sides use this module: the trainer (rank 0, hosts the rendezvous store) through
:class:`WeightSender`; each vLLM worker (rank 1 + its worker rank) through :func:`join_group`
and :func:`receive_tensors`, called from :mod:`dapo_rl.rollout.server_hooks`. The group is
created once and reused by every push; it is separate from any ``torchrun`` group (it is never
the default group), so a 2-process trainer keeps its own collectives.

A push is: the metadata ``[(name, dtype, shape), ...]`` travels over HTTP (the server's
authenticated ``/collective_rpc``), then one broadcast per tensor from rank 0, in that order.
Peers: TRL's ``vllm_serve`` (``/init_communicator/`` + PyNccl broadcast per parameter) and vLLM's
``examples/rl`` weight-transfer routes do the same over NCCL only.

Security: the store listens on the address the trainer gives (127.0.0.1 by default), and every
key lives under a random prefix that the trainer sends only through the authenticated RPC, so a
process that reaches the port but does not know the prefix cannot take a rank.
"""

from __future__ import annotations

import secrets
import socket
from datetime import timedelta
from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

# Tensor dtypes by name: the metadata crosses HTTP as JSON.
_DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}

TensorMeta = tuple[str, str, list[int]]  # (name, dtype name, shape)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _group(store: dist.Store, prefix: str, rank: int, world_size: int, backend: str, timeout: timedelta):
    prefixed = dist.PrefixStore(prefix, store)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(prefixed, rank, world_size)  # not exercised on this CPU machine
    return dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)


def _broadcast(group, tensor: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


def tensor_meta(named: Iterable[tuple[str, torch.Tensor]]) -> list[TensorMeta]:
    """``[(name, dtype name, shape)]``, JSON-ready."""
    out = []
    for name, tensor in named:
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"weight push: {name} has dtype {tensor.dtype}; only {', '.join(_DTYPES)} are sent")
        out.append((name, dtype, list(tensor.shape)))
    return out


class WeightSender:
    """Rank 0 of the weight group: hosts the store and broadcasts.

    Construction only opens the store; :meth:`connect` must run while the receivers join (both
    block until all ranks arrive), so the caller starts the receivers' RPC in a thread first.

    Args:
        host: the trainer's address as the server's workers reach it (127.0.0.1 on one machine).
        receivers: number of server workers (tensor × pipeline × data parallel size).
        timeout_s: how long a join or a broadcast may wait for the other side.
    """

    def __init__(self, host: str, receivers: int, timeout_s: float, backend: str = "gloo"):
        self.host = host
        self.port = free_port(host)
        self.world_size = receivers + 1
        self.backend = backend
        self.timeout = timedelta(seconds=timeout_s)
        self.prefix = f"dapo-weights-{secrets.token_hex(16)}"  # travels only over the authenticated RPC
        self.store = dist.TCPStore(host, self.port, self.world_size, is_master=True, timeout=self.timeout,
                                   wait_for_workers=False)
        self.group = None

    def join_args(self) -> dict:
        """What each receiver needs to join (the kwargs of :func:`join_group`)."""
        return {"host": self.host, "port": self.port, "world_size": self.world_size, "prefix": self.prefix,
                "backend": self.backend, "timeout_s": self.timeout.total_seconds()}

    def connect(self) -> None:
        """Join the group as rank 0 (blocks until every receiver has joined)."""
        self.group = _group(self.store, self.prefix, 0, self.world_size, self.backend, self.timeout)

    def send(self, named: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Broadcast each tensor (contiguous; the receivers run :func:`receive_tensors` on the
        same metadata at the same time)."""
        assert self.group is not None, "connect() first"
        with torch.no_grad():
            for _, tensor in named:
                _broadcast(self.group, tensor.detach().contiguous())


def join_group(host: str, port: int, world_size: int, prefix: str, rank: int, backend: str = "gloo",
               timeout_s: float = 60.0):
    """A receiver joins the trainer's weight group as ``rank`` (1..world_size-1); returns the group."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    return _group(store, prefix, rank, world_size, backend, timeout)


def receive_tensors(group, meta: Sequence[TensorMeta], device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Receive the tensors ``meta`` describes, in order, as ``(name, tensor)``."""
    for name, dtype, shape in meta:
        tensor = torch.empty(tuple(shape), dtype=_DTYPES[dtype], device=device)
        _broadcast(group, tensor)
        yield name, tensor
