"""HTTP client of a vLLM rollout server (standard library only: no vLLM import on the trainer side).

Sampling uses vLLM's tokens-in/tokens-out route ``POST /inference/v1/generate`` (enabled by
``--enable-scale-out``): one request per prompt with ``n = G``, all prompts of a call in flight
at once from a thread pool, so the server's scheduler batches them (never one sample at a time).
Each response carries the sampled token ids and the sampled token's log-prob (π_rollout).

Faults: a connection error or a timeout (``timeout_s``) is retried :data:`RETRIES` times
with a short back-off, then raised as :class:`RolloutServerError`, which the trainer handles as
a server death (checkpoint, one line, non-zero exit). A 401 is :class:`RolloutServerRefused`:
the secret is wrong, retrying cannot help.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from dapo_rl.rollout.base import FINISH_LENGTH, FINISH_STOP, EngineLost, Sample, SamplingParams

RETRIES = 2  # after the first attempt; then the server counts as dead
BACKOFF_S = 0.5
MAX_CONCURRENT_REQUESTS = 64


class RolloutServerError(EngineLost):
    """The rollout server did not answer (unreachable, dead, or past its timeouts and retries)."""

    def __init__(self, url: str, message: str):
        super().__init__(message)
        self.url = url


class RolloutServerRefused(RolloutServerError):
    """The server refused the request (HTTP 401): missing or wrong shared secret."""


@dataclass(frozen=True)
class GenerateRequest:
    """One prompt's request: ``n`` samples from ``params``; ``seed`` makes it reproducible
    (vLLM gives choice j the seed ``seed + j``)."""

    prompt: list[int]
    n: int
    params: SamplingParams
    stop_token_ids: tuple[int, ...]
    seed: int | None = None

    def body(self) -> dict[str, Any]:
        greedy = self.params.temperature == 0
        sampling: dict[str, Any] = {
            "n": self.n,
            "max_tokens": self.params.max_new_tokens,
            "temperature": 0.0 if greedy else self.params.temperature,
            "top_p": 1.0 if greedy else self.params.top_p,
            "top_k": 0 if greedy else self.params.top_k,
            "stop_token_ids": list(self.stop_token_ids),
            "logprobs": 0,  # the sampled token's own log-prob
            "detokenize": False,
        }
        if self.seed is not None and not greedy:
            sampling["seed"] = self.seed
        return {"token_ids": list(self.prompt), "sampling_params": sampling}


def parse_choices(request: GenerateRequest, answer: dict[str, Any]) -> list[Sample]:
    """The ``n`` samples of one ``/inference/v1/generate`` answer, with the in-process engines'
    semantics: a response that ends on EOS or a stop id holds that token and is ``"stop"``,
    anything else is ``"length"`` (truncated)."""
    choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != request.n:
        raise RolloutServerError("", f"rollout server returned {len(choices)} choices for n={request.n}")
    stop_ids = set(request.stop_token_ids)
    samples = []
    for choice in choices:
        ids = [int(t) for t in choice["token_ids"]]
        content = (choice.get("logprobs") or {}).get("content")
        logprobs = [float(step["logprob"]) for step in content] if content is not None else None
        if logprobs is not None and len(logprobs) != len(ids):
            raise RolloutServerError("", f"rollout server returned {len(logprobs)} log-probs for {len(ids)} tokens")
        reason = FINISH_STOP if ids and ids[-1] in stop_ids else FINISH_LENGTH
        samples.append(Sample(prompt_ids=list(request.prompt), response_ids=ids, finish_reason=reason, logprobs=logprobs))
    return samples


class ServerClient:
    """JSON over HTTP to one server, with the shared secret, timeouts and bounded retries.

    Args:
        url: ``http://host:port`` of the server.
        api_key: the shared secret, sent as ``Authorization: Bearer``; None = none.
        timeout_s: per request (a generation request included: size it for the longest batch).
    """

    def __init__(self, url: str, api_key: str | None, timeout_s: float, retries: int = RETRIES):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.retries = retries
        self.pool = ThreadPoolExecutor(MAX_CONCURRENT_REQUESTS, thread_name_prefix="dapo-rollout-http")

    def _open(self, path: str, body: Any | None, timeout: float) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST")
        request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def call(self, path: str, body: Any | None = None, *, retries: int | None = None, timeout: float | None = None) -> Any:
        """GET (``body`` None) or POST JSON; returns the decoded answer.

        Raises:
            RolloutServerRefused: HTTP 401.
            RolloutServerError: any other HTTP error (with the server's message), or no answer
                after the retries.
        """
        attempts = 1 + (self.retries if retries is None else retries)
        problem = ""
        for attempt in range(attempts):
            try:
                return self._open(path, body, timeout or self.timeout_s)
            except urllib.error.HTTPError as exc:
                detail = " ".join(exc.read().decode("utf-8", "replace").split())[:300]
                if exc.code == 401:
                    raise RolloutServerRefused(self.url, f"rollout server {self.url} refused {path} (401): set "
                                                         f"rollout.server.api_key to the server's shared secret") from None
                raise RolloutServerError(self.url, f"rollout server {self.url}{path} answered HTTP {exc.code}: {detail}") from None
            except (urllib.error.URLError, OSError) as exc:  # refused, reset, timed out
                reason = getattr(exc, "reason", exc)
                problem = " ".join(str(reason).split()) or type(exc).__name__
            if attempt + 1 < attempts:
                time.sleep(BACKOFF_S * (attempt + 1))
        raise RolloutServerError(self.url, f"rollout server {self.url} did not answer {path} after {attempts} attempts "
                                           f"({problem})")

    def submit(self, requests: Sequence[GenerateRequest]) -> Future:
        """All requests in flight at once; the future's result is one sample list per request."""
        futures = [self.pool.submit(self.call, "/inference/v1/generate", r.body()) for r in requests]
        done: Future = Future()
        lock = threading.Lock()

        def gather(_: Future) -> None:
            with lock:
                if done.done() or not all(f.done() for f in futures):
                    return
                try:
                    done.set_result([parse_choices(r, f.result()) for r, f in zip(requests, futures)])
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                    done.set_exception(exc)

        if not futures:
            done.set_result([])
        for f in futures:
            f.add_done_callback(gather)
        return done

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
