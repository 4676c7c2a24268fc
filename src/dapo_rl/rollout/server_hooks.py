"""What dapo-rl adds inside a vLLM server process, through vLLM's own extension points only.

``dapo rollout-server`` (see :mod:`dapo_rl.rollout.server_launch`) starts vLLM's API server with:

- ``--middleware dapo_rl.rollout.server_hooks.RequireSecret``: when the server has a shared secret
  (environment ``DAPO_RL_SERVER_API_KEY``), every HTTP request except ``GET /health`` must carry
  ``Authorization: Bearer <secret>``; others get 401 and a log line naming the client address.
  vLLM's own ``--api-key`` guards only ``/v1``, ``/v2``, ``/inference`` and ``/cohere``; the
  development routes this engine needs (``/collective_rpc``, ``/reset_prefix_cache``) would stay open.
- ``--worker-extension-cls dapo_rl.rollout.server_hooks.WeightReceiver``: methods mixed into each
  vLLM worker, called through ``POST /collective_rpc`` (needs ``VLLM_SERVER_DEV_MODE=1``):
  ``dapo_model_info`` (the connect-time compatibility check), ``dapo_join_weight_group`` and
  ``dapo_receive_weights`` (the torch.distributed weight push of
  :mod:`dapo_rl.rollout.weight_transport`).

This module is imported by vLLM's processes, never by the trainer (it needs no vLLM import itself:
the worker methods use only what vLLM's worker object provides).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from typing import Any

SECRET_ENV = "DAPO_RL_SERVER_API_KEY"
OPEN_PATHS = ("/health",)  # liveness only: reveals nothing, changes nothing

# Under "vllm.": vLLM configures that logger tree, so the line lands in the server log.
logger = logging.getLogger("vllm.dapo_rl.server_hooks")


def secret_matches(given: str | None, expected: str | None) -> bool:
    """True when no secret is configured, or ``given`` equals it (constant-time comparison)."""
    if not expected:
        return True
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header in raw ASGI headers."""
    for key, value in headers:
        if key.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class RequireSecret:
    """ASGI middleware: refuse (401) and log every request without the server's secret.

    A plain ASGI class (no Starlette import), so vLLM's ``--middleware`` adds it with
    ``app.add_middleware`` and tests can drive it with a hand-made scope.
    """

    def __init__(self, app: Any, secret: str | None = None):
        self.app = app
        self.secret = secret if secret is not None else os.environ.get(SECRET_ENV) or None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") not in ("http", "websocket") or not self.secret or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if secret_matches(bearer(scope.get("headers", [])), self.secret):
            return await self.app(scope, receive, send)
        client = scope.get("client") or ("?", 0)
        logger.warning("refused %s %s from %s:%s: missing or wrong shared secret (Authorization: Bearer)",
                       scope.get("method", "?"), scope.get("path"), client[0], client[1])
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": "unauthorized: this rollout server needs its shared secret "
                                    "(rollout.server.api_key)"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class WeightReceiver:
    """Mixed into each vLLM worker (``--worker-extension-cls``). ``self`` is the worker: it has
    ``model_runner``, ``rank`` and ``reload_weights`` (vLLM 0.32)."""

    def dapo_model_info(self) -> dict:
        """What the trainer compares at connect time: architecture, vocabulary, shape, dtype."""
        runner = self.model_runner  # type: ignore[attr-defined]
        hf = runner.model_config.hf_config
        keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "tie_word_embeddings", "eos_token_id")
        info = {key: getattr(hf, key, None) for key in keys}
        info["architectures"] = list(getattr(hf, "architectures", None) or [])
        info["dtype"] = str(runner.model_config.dtype).removeprefix("torch.")
        info["rank"] = int(getattr(self, "rank", 0))
        return info

    def dapo_join_weight_group(self, payload: str) -> dict:
        """Join the trainer's weight group (see :func:`~dapo_rl.rollout.weight_transport.join_group`).

        ``payload`` is JSON: the join arguments and ``secret``. A join without the server's
        secret is refused and logged (the HTTP layer refuses it first when the secret is set;
        this holds even if the server was started without the middleware).
        """
        from dapo_rl.rollout.weight_transport import join_group

        args = json.loads(payload)
        if not secret_matches(args.pop("secret", None), os.environ.get(SECRET_ENV) or None):
            logger.warning("refused a weight-group join to %s:%s: missing or wrong shared secret",
                           args.get("host"), args.get("port"))
            raise PermissionError("weight-group join refused: missing or wrong shared secret")
        rank = 1 + int(getattr(self, "rank", 0))
        self._dapo_group = join_group(rank=rank, **args)
        return {"rank": rank}

    def dapo_receive_weights(self, payload: str) -> dict:
        """Receive one push (``payload``: JSON list of ``[name, dtype, shape]``) and load it in
        place, in one call: no engine step ever sees half-loaded weights."""
        import torch

        from dapo_rl.rollout.vllm_engine import _ExpectedReloadWarnings, _refresh_tied_lm_head
        from dapo_rl.rollout.weight_transport import receive_tensors

        group = getattr(self, "_dapo_group", None)
        if group is None:
            raise RuntimeError("no weight group: call dapo_join_weight_group first")
        meta = json.loads(payload)
        named = list(receive_tensors(group, meta))  # all of them first: the sender broadcasts in order
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        tied = bool(getattr(self.model_runner.model_config.hf_config, "tie_word_embeddings", False))  # type: ignore[attr-defined]
        quiet = _ExpectedReloadWarnings(tied)
        reload_logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        reload_logger.addFilter(quiet)
        try:
            with torch.no_grad():
                self.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)  # type: ignore[attr-defined]
        finally:
            reload_logger.removeFilter(quiet)
        retied = _refresh_tied_lm_head(self) if tied else False
        return {"tensors": len(named), "retied_head": retied, "model": type(model).__name__}
