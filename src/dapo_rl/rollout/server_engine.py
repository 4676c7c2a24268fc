"""``rollout.engine=vllm-server``: rollouts from a separate vLLM server process, weights pushed
over torch.distributed. For models whose sampler does not fit beside the trainer (the server
has its own tensor/data-parallel layout, on other devices or nodes), and for one-step-off
overlap (``rollout.async_steps=1``: :meth:`VLLMServerEngine.submit` returns at once).

Peers: TRL ``vllm_mode="server"`` with ``trl vllm-serve`` (``vllm_server_host/port``), verl's
and OpenRLHF's rollout workers, verl/AReaL/prime-rl/SkyRL asynchronous rollouts.

- **Connect** (at construction): ``GET /health`` (no answer: :class:`ConfigError`, exit 2, with
  the address and the fix); each worker's model description (``dapo_model_info``) against the
  trainer's config (different architecture or vocabulary: exit 2); the weight group is joined and
  the trainer's current weights are pushed, so the server may start from any copy of the model.
- **Sampling**: :class:`~dapo_rl.rollout.server_client.ServerClient`, one request per prompt
  (``n = G``), all in flight at once. Each call draws one seed from torch's generator (which the
  trainer checkpoints) and gives prompt i the request seed ``seed + i·n``: a rerun after resume
  asks for the same random streams. Greedy calls draw nothing.
- **Weight push** (:meth:`sync_weights`): wait for this engine's requests in flight (a push
  between two tokens of a sample would mix two policies in it), then the metadata over the
  authenticated ``/collective_rpc`` and the tensors over the weight group
  (:mod:`dapo_rl.rollout.weight_transport`), received and loaded in place by
  :class:`~dapo_rl.rollout.server_hooks.WeightReceiver` in one call; then the prefix cache is reset
  (KV blocks computed by the old weights must not be reused). Under ``torchrun`` every rank drains
  its requests, rank 0 pushes, and all ranks meet at a barrier before and after.
- **Launch** (``rollout.server.launch=true``): rank 0 saves the policy to a temporary folder and
  starts ``dapo rollout-server`` on a free loopback port with a random shared secret.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence
from urllib.parse import urlsplit

import torch
import torch.distributed as tdist

from dapo_rl.config import ConfigError
from dapo_rl.models.lora import save_servable
from dapo_rl.rollout.base import RolloutEngine, Sample, SamplingParams
from dapo_rl.rollout.server_client import GenerateRequest, RolloutServerError, RolloutServerRefused, ServerClient
from dapo_rl.rollout.server_hooks import SECRET_ENV
from dapo_rl.rollout.server_launch import LaunchedServer, ServerLaunchError, ServerSpec
from dapo_rl.rollout.vllm_engine import CPU_ATTENTION_HEAD_SIZES, _head_size, _named_tensors, _unwrap
from dapo_rl.rollout.weight_transport import WeightSender, free_port, tensor_meta

if TYPE_CHECKING:
    from dapo_rl.config import Config

# Compared at connect time: a server on another model would sample garbage token ids.
COMPARED_KEYS = ("architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "tie_word_embeddings")
SEED_RANGE = 2**31 - 1


def _rank_world() -> tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        tdist.barrier()


def model_mismatches(server: dict[str, Any], hf_config: Any) -> list[str]:
    """``key server≠trainer`` for each compared key that differs (None on the trainer = unknown)."""
    out = []
    for key in COMPARED_KEYS:
        mine = getattr(hf_config, key, None)
        if key == "architectures":
            mine = list(mine or [])
        if mine is None or (key == "architectures" and not mine):
            continue
        if server.get(key) != mine:
            out.append(f"{key} {server.get(key)!r} on the server, {mine!r} in the trainer")
    return out


def _both(remote: Callable[[], Any], local: Callable[[], None], timeout_s: float) -> Any:
    """Run ``remote`` (an HTTP call the server blocks in) and ``local`` (this side of the same
    collective) at once; a failed ``remote`` is raised at once instead of waiting for ``local`` to
    time out. Returns ``remote``'s result."""
    result: dict[str, Any] = {}

    def run_local() -> None:
        try:
            local()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            result["local_error"] = exc

    thread = threading.Thread(target=run_local, name="dapo-weight-group", daemon=True)
    thread.start()
    answer = remote()  # raises RolloutServerError on refusal or failure
    thread.join(timeout_s)
    if thread.is_alive():
        raise RolloutServerError("", f"the weight group did not complete within {timeout_s:.0f} s")
    if "local_error" in result:
        raise RolloutServerError("", f"weight group: {' '.join(str(result['local_error']).split())[:300]}")
    return answer


class VLLMServerEngine(RolloutEngine):
    """Samples from a vLLM rollout server; see the module docstring.

    Args:
        url: the server, ``http://host:port``.
        model, tokenizer: the policy (compared with the server's model; pushed at connect) and its
            tokenizer (only the EOS id is used: ids in, ids out).
        api_key: the server's shared secret (None: the server has none).
        timeout_s: per HTTP request and per weight-group operation.
        trainer_host: the address the server's workers use to reach this process's weight group.
        launched: the server this engine started (stopped by :meth:`close`).
    """

    samples_in_background = True
    own_weights = True

    @classmethod
    def check_config(cls, config: "Config") -> None:
        """The server's address: ``http://HOST:PORT``, and a shared secret unless it is on this
        machine (a launched server always gets one)."""
        sc = config.rollout.server
        if sc.launch:
            return
        parts = urlsplit(sc.url)
        if not (parts.scheme == "http" and parts.hostname and parts.port is not None):
            raise ConfigError(f"rollout.server.url: {sc.url!r} is not http://HOST:PORT; e.g. "
                              f"rollout.server.url=http://127.0.0.1:8765 (or rollout.server.launch=true)")
        loopback = parts.hostname in ("localhost", "::1") or str(parts.hostname).startswith("127.")
        if not (loopback or sc.api_key or os.environ.get(SECRET_ENV)):
            raise ConfigError(f"rollout.server.api_key: a server on another address ({parts.hostname}) must be protected "
                              f"by a shared secret; set {SECRET_ENV} (or rollout.server.api_key) to the secret the server "
                              f"was started with")

    def __init__(self, url: str, model: torch.nn.Module, tokenizer: Any, *, api_key: str | None = None,
                 timeout_s: float = 300.0, trainer_host: str = "127.0.0.1", launched: LaunchedServer | None = None,
                 workdir: str | None = None):
        if tokenizer.eos_token_id is None:
            raise ConfigError("rollout.engine=vllm-server: the tokenizer has no EOS token; responses could never finish")
        self.url = url.rstrip("/")
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.timeout_s = timeout_s
        self.launched = launched
        self.workdir = workdir
        self.rank, self.world = _rank_world()
        self.client = ServerClient(self.url, api_key, timeout_s)
        self.api_key = api_key
        self._inflight: list[Future] = []
        self._lock = threading.Lock()
        self.sender: WeightSender | None = None
        self.last_sync_seconds: float | None = None
        model = _unwrap(model)
        self.info = self._check_server(model)
        self.dtype = str(self.info[0].get("dtype"))
        if self.rank == 0:
            self.sender = WeightSender(trainer_host, receivers=len(self.info), timeout_s=timeout_s)
            payload = json.dumps({**self.sender.join_args(), "secret": api_key})
            try:
                _both(lambda: self.client.call("/collective_rpc", {"method": "dapo_join_weight_group",
                                                                   "kwargs": {"payload": payload}}, retries=0),
                      self.sender.connect, timeout_s)
            except RolloutServerError as exc:
                raise ConfigError(f"rollout.server: cannot set up the weight push with {self.url} ({exc}); check "
                                  f"rollout.server.api_key and that the server reaches rollout.server.trainer_host="
                                  f"{trainer_host}") from None
        self.sync_weights(model)  # the server may hold any copy of the model: start from the trainer's

    @classmethod
    def from_config(cls, config: "Config", model: torch.nn.Module, tokenizer: Any) -> "VLLMServerEngine":
        """The engine ``rollout.server`` describes; launches the server when ``launch=true``."""
        sc = config.rollout.server
        api_key = sc.api_key or os.environ.get(SECRET_ENV) or None
        if not sc.launch:
            return cls(sc.url, model, tokenizer, api_key=api_key, timeout_s=sc.timeout_s, trainer_host=sc.trainer_host)
        rank, world = _rank_world()
        api_key = api_key or secrets.token_urlsafe(24)  # a launched server always has a secret
        launched, workdir, url = None, None, None
        if rank == 0:
            launched, workdir = launch_for(config, model, api_key)
            url = launched.url
        if world > 1:  # the other ranks learn where the server is, and its secret
            shared = [url, api_key]
            tdist.broadcast_object_list(shared, src=0)
            url, api_key = shared
        try:
            return cls(url, model, tokenizer, api_key=api_key, timeout_s=sc.timeout_s, trainer_host="127.0.0.1",
                       launched=launched, workdir=workdir)
        except BaseException:
            if launched is not None:
                launched.stop()
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            raise

    def _check_server(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        try:
            self.client.call("/health", retries=1, timeout=10)
        except RolloutServerError as exc:
            raise ConfigError(f"rollout.server.url: no rollout server answers at {self.url} ({exc}); start one with "
                              f"`dapo rollout-server MODEL --port PORT` and set rollout.server.url, or set "
                              f"rollout.server.launch=true") from None
        try:
            answer = self.client.call("/collective_rpc", {"method": "dapo_model_info"}, retries=0)
        except RolloutServerRefused:
            raise ConfigError(f"rollout.server.api_key: the server at {self.url} refused the trainer's secret (401); set "
                              f"rollout.server.api_key (or {SECRET_ENV}) to the value the server was started with") from None
        except RolloutServerError as exc:
            raise ConfigError(f"rollout.server.url: {self.url} is not a dapo rollout server ({exc}); start it with "
                              f"`dapo rollout-server MODEL` (vLLM with dapo-rl's worker extension and "
                              f"VLLM_SERVER_DEV_MODE=1)") from None
        info = (answer or {}).get("results") or []
        if not info or not all(isinstance(i, dict) for i in info):
            raise ConfigError(f"rollout.server.url: {self.url} gave no model description ({answer!r:.200}); start it with "
                              f"`dapo rollout-server MODEL`")
        problems = model_mismatches(info[0], model.config)
        if problems:
            raise ConfigError(f"rollout.server.url: the server at {self.url} serves a different model ({'; '.join(problems)}); "
                              f"start it with the trainer's model (model.path)")
        return info

    # ------------------------------------------------------------------ sampling

    def submit(self, prompts: Sequence[list[int]], n: int, params: SamplingParams, seed: int | None = None) -> Future:
        """Send every prompt's request now; the future's result is ``generate``'s. ``seed``: the
        call's base seed (None: drawn from torch's generator unless greedy)."""
        if seed is None and params.temperature > 0:
            seed = int(torch.randint(0, SEED_RANGE, ()).item())
        stop = tuple(sorted({self.eos_token_id, *params.stop_token_ids}))
        requests = [GenerateRequest(list(p), n, params, stop, None if seed is None else (seed + i * n) % SEED_RANGE)
                    for i, p in enumerate(prompts)]
        future = self.client.submit(requests)
        with self._lock:
            self._inflight = [f for f in self._inflight if not f.done()] + [future]
        return future

    def generate(self, prompts: Sequence[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]:
        return self.submit(prompts, n, params).result() if prompts else []

    def drain(self) -> None:
        """Wait until this engine has no request in flight (errors stay with their futures)."""
        with self._lock:
            pending, self._inflight = self._inflight, []
        for future in pending:
            try:
                future.result()
            except BaseException:  # noqa: BLE001 - whoever consumes the future sees it
                pass

    # ------------------------------------------------------------------ weights

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push ``model``'s current weights into the server (see the module docstring)."""
        import time

        started = time.perf_counter()
        self.drain()
        _barrier(self.world)  # every rank's requests are done: no sample mixes two policies
        if self.sender is not None:
            named = list(_named_tensors(_unwrap(model)))
            payload = json.dumps(tensor_meta(named))
            _both(lambda: self.client.call("/collective_rpc", {"method": "dapo_receive_weights", "kwargs": {"payload": payload}},
                                           retries=0),
                  lambda: self.sender.send(named), self.timeout_s)
            reset = self.client.call("/reset_prefix_cache", {}, retries=0)
            if isinstance(reset, dict) and reset.get("success") is False:
                raise RolloutServerError(self.url, f"rollout server {self.url} refused to reset its prefix cache after a weight push")
        _barrier(self.world)  # no rank samples before the push has landed
        self.last_sync_seconds = time.perf_counter() - started

    @property
    def precision(self) -> str:
        return self.dtype

    def describe(self) -> str:
        log = self.server_log
        return f"the rollout server at {self.url}" + (f" (its log: {log})" if log is not None else "")

    def resume_advice(self) -> str:
        if self.launched is not None or self.workdir is not None:
            return "continue with resume=true (a new server is launched)"
        return "restart it (dapo rollout-server MODEL ...) and continue with resume=true"

    def alive(self) -> bool:
        return self.launched is None or self.launched.alive()

    @property
    def server_log(self) -> Path | None:
        """The launched server's log (kept by :meth:`close` when the server died)."""
        return None if self.workdir is None else Path(self.workdir, "server.log")

    def close(self) -> None:
        """Stop talking to the server; stop it if this engine launched it. The temporary folder
        of a launched server goes, except the log of one that died (for the post-mortem)."""
        self.client.close()
        died = self.launched is not None and not self.launched.alive()
        if self.launched is not None:
            self.launched.stop()
            self.launched = None
        if self.workdir is not None:
            shutil.rmtree(Path(self.workdir, "model"), ignore_errors=True)
            if not died:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None


def launch_for(config: "Config", model: torch.nn.Module, secret: str) -> tuple[LaunchedServer, str]:
    """Save the policy and start a local server on it (``rollout.server.launch=true``); returns
    the ready server and its temporary folder (the model copy and ``server.log``)."""
    sc = config.rollout.server
    model = _unwrap(model)
    on_gpu = next(model.parameters()).device.type == "cuda"
    head = _head_size(model.config)
    if not on_gpu and head is not None and head not in CPU_ATTENTION_HEAD_SIZES:
        raise ConfigError(f"rollout.engine=vllm-server: vLLM's CPU attention has no kernel for head size {head}; for the "
                          f"built-in model set quickstart.hidden_size=128 quickstart.warmup_lr=1e-3 (head size 32)")
    workdir = tempfile.mkdtemp(prefix="dapo-rollout-server-")
    try:
        save_servable(model, Path(workdir, "model"))  # a LoRA policy: its merged weights
        spec = ServerSpec(model=str(Path(workdir, "model")), port=free_port(), seed=config.seed,
                          dtype=config.rollout.dtype, max_model_len=config.rollout.vllm_max_model_len,
                          kv_cache_gb=config.rollout.vllm_kv_cache_gb, extra_args=list(sc.launch_args))
        server = LaunchedServer(spec, secret, Path(workdir, "server.log"), python=sc.python or _default_python())
        try:
            server.wait_ready(sc.start_timeout_s)
        except ServerLaunchError as exc:
            server.stop()
            raise ConfigError(f"rollout.server.launch: {exc}; rollout.server.python must name a Python with vLLM "
                              f"installed (now {sc.python or _default_python()})") from None
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return server, workdir


def _default_python() -> str:
    import sys

    return sys.executable
