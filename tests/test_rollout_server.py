"""``rollout.engine=vllm-server`` without vLLM: the trainer side against a fake rollout server.

The fake (:class:`FakeServer`, standard-library HTTP) speaks the routes the engine uses and joins
the weight group for real through :mod:`dapo_rl.rollout.weight_transport` (gloo), so the push,
the request batching, the secret, the timeouts and the error lines are exercised as they run
against vLLM; what only vLLM can show (its log-probs, its in-place reload) is in
``tests/test_vllm_server.py`` (``.ci/vllm``).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import random
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from dapo_rl.config import ConfigError, load_config
from dapo_rl.training.compose import check_config
from dapo_rl.rollout.base import SamplingParams
from dapo_rl.rollout.server_client import RolloutServerError, RolloutServerRefused, ServerClient
from dapo_rl.rollout.server_engine import VLLMServerEngine
from dapo_rl.rollout.server_hooks import SECRET_ENV, RequireSecret, WeightReceiver
from dapo_rl.rollout.server_launch import ServerLaunchError, ServerSpec, check_bind
from dapo_rl.rollout.weight_transport import join_group, receive_tensors


class FakeServer:
    """A rollout server stand-in on a free loopback port.

    ``info``: what ``dapo_model_info`` reports; ``secret``: required as a Bearer token on every
    route but /health; ``generate_delay_s``: how long each generate request takes. It records
    every request (``log``: (route, body, start, end)) and the tensors of the last push.
    """

    def __init__(self, info: dict, secret: str | None = None, generate_delay_s: float = 0.0, eos: int = 2):
        self.info, self.secret, self.delay, self.eos = info, secret, generate_delay_s, eos
        self.log: list[tuple[str, dict, float, float]] = []
        self.received: dict[str, torch.Tensor] = {}
        self.group = None
        self.active = self.max_active = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, code: int, body) -> None:
                raw = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._reply(200 if self.path == "/health" else 404, {})

            def do_POST(self):
                if fake.secret and self.headers.get("Authorization") != f"Bearer {fake.secret}":
                    return self._reply(401, {"error": "unauthorized"})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                start = time.monotonic()
                code, answer = fake.handle(self.path, body)
                fake.log.append((self.path, body, start, time.monotonic()))
                self._reply(code, answer)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def handle(self, path: str, body: dict):
        if path == "/inference/v1/generate":
            with self.lock:
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            time.sleep(self.delay)
            params = body["sampling_params"]
            rng = random.Random(params.get("seed", 0))
            choices = []
            for j in range(params["n"]):
                ids = [rng.randrange(3, 16) for _ in range(rng.randint(1, params["max_tokens"]))]
                if len(ids) < params["max_tokens"] and rng.random() < 0.5:
                    ids.append(self.eos)
                choices.append({"index": j, "token_ids": ids, "logprobs": {"content": [{"logprob": -1.0} for _ in ids]}})
            with self.lock:
                self.active -= 1
            return 200, {"choices": choices}
        if path == "/reset_prefix_cache":
            return 200, {"success": True}
        if path == "/collective_rpc":
            method, payload = body["method"], (body.get("kwargs") or {}).get("payload")
            if method == "dapo_model_info":
                return 200, {"results": [self.info]}
            if method == "dapo_join_weight_group":
                args = json.loads(payload)
                args.pop("secret")
                self.group = join_group(rank=1, **args)
                return 200, {"results": [{"rank": 1}]}
            if method == "dapo_receive_weights":
                self.received = dict(receive_tensors(self.group, json.loads(payload)))
                return 200, {"results": [{"tensors": len(self.received)}]}
        return 404, {"error": path}

    def requests(self, route: str) -> list[tuple[str, dict, float, float]]:
        return [entry for entry in self.log if entry[0] == route]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _info(model) -> dict:
    c = model.config
    return {"architectures": list(c.architectures or []), "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "tie_word_embeddings": c.tie_word_embeddings,
            "eos_token_id": c.eos_token_id, "dtype": "float32", "rank": 0}


@pytest.fixture(scope="module")
def policy():
    from dapo_rl.data.synthetic import VOCAB
    from dapo_rl.models.tiny import build_char_tokenizer, build_tiny_llama

    tokenizer = build_char_tokenizer(VOCAB)
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=4)
    model.config.architectures = ["LlamaForCausalLM"]
    return model, tokenizer


@pytest.fixture
def server(policy):
    fake = FakeServer(_info(policy[0]), secret="sesame")
    yield fake
    fake.close()


def test_connect_pushes_the_weights_over_the_weight_group(server, policy):
    model, tokenizer = policy
    engine = VLLMServerEngine(server.url, model, tokenizer, api_key="sesame", timeout_s=30)
    try:
        expected = dict(model.named_parameters())
        assert set(server.received) == set(expected)
        assert all(torch.equal(server.received[k], v.detach()) for k, v in expected.items())
        changed = copy.deepcopy(model)
        with torch.no_grad():
            next(changed.parameters()).add_(1.0)
        engine.sync_weights(changed)
        name, param = next(changed.named_parameters())
        assert torch.equal(server.received[name], param.detach())
        assert server.requests("/reset_prefix_cache"), "the prefix cache must be reset after a push"
    finally:
        engine.close()


@contextmanager
def _engine_on_fake_server(policy, **fake_options):
    """A :class:`VLLMServerEngine` connected to a :class:`FakeServer` of ``policy``; both closed after."""
    model, tokenizer = policy
    fake = FakeServer(_info(model), **fake_options)
    engine = VLLMServerEngine(fake.url, model, tokenizer, timeout_s=30)
    try:
        yield fake, engine
    finally:
        engine.close()
        fake.close()


def test_generate_sends_one_request_per_prompt_all_at_once(policy):
    tokenizer = policy[1]
    with _engine_on_fake_server(policy, generate_delay_s=0.2) as (fake, engine):
        prompts = [[5, 6, 7], [8, 9], [10], [11, 12, 13, 14]]
        torch.manual_seed(0)
        groups = engine.generate(prompts, 3, SamplingParams(temperature=1.0, max_new_tokens=6, stop_token_ids=(4,)))
        sent = fake.requests("/inference/v1/generate")
        assert [body["token_ids"] for _, body, _, _ in sent] != [] and len(sent) == len(prompts)
        assert sorted(body["token_ids"] for _, body, _, _ in sent) == sorted(prompts)
        assert all(body["sampling_params"]["n"] == 3 for _, body, _, _ in sent)
        assert all(set(body["sampling_params"]["stop_token_ids"]) == {tokenizer.eos_token_id, 4} for _, body, _, _ in sent)
        assert fake.max_active == len(prompts), "requests must be in flight together, not one after another"
        assert len({body["sampling_params"]["seed"] for _, body, _, _ in sent}) == len(prompts)  # distinct streams per prompt
        for prompt, group in zip(prompts, groups):
            assert len(group) == 3
            for s in group:
                assert s.prompt_ids == prompt and len(s.logprobs) == len(s.response_ids)
                assert s.finish_reason == ("stop" if s.response_ids[-1] in (tokenizer.eos_token_id, 4) else "length")
        # The same torch seed asks for the same streams (resume regenerates the same samples).
        torch.manual_seed(0)
        again = engine.generate(prompts, 3, SamplingParams(temperature=1.0, max_new_tokens=6, stop_token_ids=(4,)))
        assert [[s.response_ids for s in g] for g in again] == [[s.response_ids for s in g] for g in groups]


def test_push_waits_for_requests_in_flight(policy):
    """A push between two tokens of a sample would mix two policies in it."""
    model = policy[0]
    with _engine_on_fake_server(policy, generate_delay_s=0.5) as (fake, engine):
        future = engine.submit([[5, 6], [7]], 2, SamplingParams(temperature=1.0, max_new_tokens=4))
        engine.sync_weights(model)
        assert future.done()
        last_generate_end = max(end for _, _, _, end in fake.requests("/inference/v1/generate"))
        push_start = max(start for path, body, start, _ in fake.log if body.get("method") == "dapo_receive_weights")
        assert push_start >= last_generate_end


def test_wrong_or_missing_secret_is_refused(server, policy):
    model, tokenizer = policy
    with pytest.raises(RolloutServerRefused, match="rollout.server.api_key"):
        ServerClient(server.url, None, 5).call("/inference/v1/generate", {"token_ids": [1]})
    with pytest.raises(ConfigError, match=r"rollout.server.api_key: the server at .* refused the trainer's secret \(401\)"):
        VLLMServerEngine(server.url, model, tokenizer, api_key="wrong", timeout_s=5)
    assert not server.requests("/collective_rpc"), "nothing may reach the server's RPC without the secret"


def test_unreachable_server_is_one_line_with_the_address_and_the_fix(policy):
    from dapo_rl.rollout.weight_transport import free_port

    model, tokenizer = policy
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError) as info:
        VLLMServerEngine(url, model, tokenizer, timeout_s=2)
    message = str(info.value)
    assert "\n" not in message and url in message and "dapo rollout-server" in message and "launch=true" in message


def test_a_different_model_on_the_server_is_refused_at_connect(policy):
    model, tokenizer = policy
    fake = FakeServer({**_info(model), "vocab_size": 999, "architectures": ["Qwen2ForCausalLM"]})
    try:
        with pytest.raises(ConfigError, match=r"different model \(architectures .*vocab_size 999 on the server"):
            VLLMServerEngine(fake.url, model, tokenizer, timeout_s=5)
        assert not fake.requests("/inference/v1/generate")
    finally:
        fake.close()


def test_timeouts_are_retried_then_reported_as_a_dead_server(policy):
    model, _ = policy
    fake = FakeServer(_info(model), generate_delay_s=1.5)
    try:
        client = ServerClient(fake.url, None, timeout_s=0.3, retries=2)
        started = time.monotonic()
        with pytest.raises(RolloutServerError, match="did not answer /inference/v1/generate after 3 attempts"):
            client.call("/inference/v1/generate", {"token_ids": [1], "sampling_params": {"n": 1, "max_tokens": 1}})
        assert time.monotonic() - started < 5
        time.sleep(1.6)  # let the slow handlers finish
        assert len(fake.requests("/inference/v1/generate")) == 3
    finally:
        fake.close()


# ----------------------------------------------------------------------------- inside the server


def _asgi(middleware: RequireSecret, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def send(message):
        sent.append(message)

    middleware.app = app
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers, "client": ("10.1.2.3", 5555)}
    asyncio.run(middleware(scope, None, send))
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    return status, bool(reached)


def test_server_middleware_refuses_and_logs_requests_without_the_secret(caplog):
    guard = RequireSecret(None, secret="sesame")
    with caplog.at_level(logging.WARNING, logger="vllm.dapo_rl.server_hooks"):
        assert _asgi(guard, "/collective_rpc", []) == (401, False)
        assert _asgi(guard, "/inference/v1/generate", [(b"authorization", b"Bearer nope")]) == (401, False)
    assert "refused POST /collective_rpc from 10.1.2.3" in caplog.text
    assert _asgi(guard, "/collective_rpc", [(b"authorization", b"Bearer sesame")]) == (None, True)
    assert _asgi(guard, "/health", []) == (None, True)  # liveness stays open
    assert _asgi(RequireSecret(None, secret=""), "/collective_rpc", []) == (None, True)  # no secret configured


def test_worker_refuses_a_weight_group_join_without_the_secret(monkeypatch, caplog):
    monkeypatch.setenv(SECRET_ENV, "sesame")
    worker = WeightReceiver()
    payload = json.dumps({"host": "127.0.0.1", "port": 1, "world_size": 2, "prefix": "p", "secret": "guess"})
    with caplog.at_level(logging.WARNING, logger="vllm.dapo_rl.server_hooks"), pytest.raises(PermissionError):
        worker.dapo_join_weight_group(payload)
    assert "refused a weight-group join" in caplog.text
    assert not hasattr(worker, "_dapo_group")


def test_server_listens_on_loopback_unless_told_and_given_a_secret():
    check_bind("127.0.0.1", allow_remote=False, secret=None)
    with pytest.raises(ServerLaunchError, match="--allow-remote"):
        check_bind("0.0.0.0", allow_remote=False, secret="s")
    with pytest.raises(ServerLaunchError, match=SECRET_ENV):
        check_bind("0.0.0.0", allow_remote=True, secret=None)
    check_bind("0.0.0.0", allow_remote=True, secret="s")
    cmd = ServerSpec(model="m").command(python="py", on_gpu=False)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    for flag in ("--skip-tokenizer-init", "--enable-scale-out", "--worker-extension-cls", "--middleware", "--enforce-eager"):
        assert flag in cmd
    assert cmd[cmd.index("--logprobs-mode") + 1] == "processed_logprobs"


def test_rollout_server_command_refuses_a_remote_host_without_the_flag(capsys, monkeypatch, tmp_path):
    from dapo_rl.cli import main

    monkeypatch.delenv(SECRET_ENV, raising=False)
    (tmp_path / "config.json").write_text("{}")
    assert main(["rollout-server", str(tmp_path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--allow-remote" in err and SECRET_ENV in err


def test_server_config_validation():
    for overrides, key in ((["rollout.async_steps=1"], "rollout.async_steps"),
                           (["rollout.engine=vllm-server", "rollout.async_steps=2"], "rollout.async_steps"),
                           (["rollout.engine=vllm-server", "rollout.server.url=localhost:80"], "rollout.server.url"),
                           (["rollout.engine=vllm-server", "rollout.server.url=http://10.0.0.9:8765"], "rollout.server.api_key"),
                           (["rollout.engine=vllm-server", "rollout.server.timeout_s=0"], "rollout.server.timeout_s")):
        with pytest.raises(ConfigError, match=key):
            check_config(load_config(None, overrides))
    config = load_config(None, ["rollout.engine=vllm-server", "rollout.server.url=http://10.0.0.9:8765", "rollout.server.api_key=k"])
    from dapo_rl.config import to_dict, to_yaml
    from dapo_rl.training.compose import correction_mode

    assert "k" != to_dict(config)["rollout"]["server"]["api_key"] and "api_key: <redacted>" in to_yaml(config)
    assert correction_mode(config) == "token_truncate"  # a separate sampler is corrected by default


# ----------------------------------------------------------------------------- one-step-off overlap


def _parity_reward(text, *args):
    return len(text) % 2 == 0  # deterministic, and mixed within a group


def _async_trainer(policy, url: str, checkpoint_fn=None):
    from dapo_rl.data.encoding import encode_prompts
    from dapo_rl.data.synthetic import builtin_splits
    from dapo_rl.training.trainer import Trainer

    model, tokenizer = policy
    config = load_config(overrides=["rollout.engine=vllm-server", f"rollout.server.url={url}", "rollout.async_steps=1", "steps=4",
                                    "prompts_per_step=2", "group_size=4", "mini_batch_size=2", "micro_batch_size=8",
                                    "rollout.max_response_length=6", "overlong.cache_length=2", "optim.warmup_updates=0",
                                    "rollout.verify_sync=false", "dynamic_sampling.max_surplus_age=2"])
    model = copy.deepcopy(model).train()
    engine = VLLMServerEngine(url, model, tokenizer, timeout_s=30)
    prompts, _ = encode_prompts(builtin_splits(64, 4)[0], tokenizer)
    return Trainer(config, model, tokenizer, prompts, None, _parity_reward, engine, device=torch.device("cpu"),
                   checkpoint_fn=checkpoint_fn)


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))}


def test_one_step_off_tags_versions_and_resumes_exactly(policy, tmp_path):
    """The next step's first round is sampled before the update, tagged with the version that
    sampled it (one behind), corrected as off-policy; a checkpoint between steps holds it, and a
    resumed run equals the uninterrupted one."""
    from dapo_rl.training.checkpoint import load_checkpoint, save_checkpoint

    fake = FakeServer(_info(policy[0]))
    try:
        torch.manual_seed(0)
        whole = _async_trainer(policy, fake.url)
        rows = []
        for metrics in whole.steps():
            rows.append(metrics)
            if len(rows) == 1:
                pending = whole.rollouts.pending
                assert pending is not None and pending.policy_version == whole.policy_version - whole.updates_per_step
        assert rows[0]["rollout/groups_sampled_ahead"] == 0 and all(r["rollout/groups_sampled_ahead"] > 0 for r in rows[1:])
        # Sampled one step off: never exactly on-policy, so the correction sees them.
        assert all("rollout/logp_abs_diff" in r for r in rows[1:])
        assert whole.rollouts.pending is None  # nothing sent ahead after the last step

        torch.manual_seed(0)
        first = _async_trainer(policy, fake.url)
        for i, _ in enumerate(first.steps()):
            if i == 1:
                break
        assert first.rollouts.pending is not None and first.rollouts.pending.future.done()
        folder = save_checkpoint(first, tmp_path)
        torch.manual_seed(123)  # the checkpoint's RNG state must win
        resumed = _async_trainer(policy, fake.url)
        load_checkpoint(resumed, folder)
        assert resumed.rollouts.pending is not None and resumed.rollouts.pending.samples is not None
        rest = list(resumed.steps())
        assert [_comparable(r) for r in rest] == [_comparable(r) for r in rows[2:]]
        for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
            assert torch.equal(a, b), name
    finally:
        fake.close()


def test_a_round_in_flight_at_a_forced_checkpoint_is_sampled_again(policy, tmp_path):
    """A checkpoint taken while the round sent ahead has no results (the server died) keeps its
    prompts and seed; the resumed run samples it again with the restored weights."""
    from dapo_rl.training.checkpoint import load_checkpoint, save_checkpoint

    fake = FakeServer(_info(policy[0]))
    try:
        trainer = _async_trainer(policy, fake.url)
        next(trainer.steps())
        pending = trainer.rollouts.pending
        pending.samples, pending.future = None, None  # as if the server died before answering
        folder = save_checkpoint(trainer, tmp_path)
        resumed = _async_trainer(policy, fake.url)
        load_checkpoint(resumed, folder)
        before = len(fake.requests("/inference/v1/generate"))
        metrics = next(resumed.steps())
        sent = fake.requests("/inference/v1/generate")[before:]
        seeds = {body["sampling_params"].get("seed") for _, body, _, _ in sent}
        assert pending.seed in seeds  # the same base seed as the lost round
        assert metrics["rollout/groups_sampled_ahead"] == len(pending.indices)
    finally:
        fake.close()


def test_server_death_checkpoints_then_exits_1_with_one_line(quickstart_cache, quickstart_model, tmp_path, capsys):
    """The server stops answering after the second step's push: the run saves its progress and
    ends with one line naming the server and how to resume; resume=true with a new server finishes."""
    from transformers import AutoModelForCausalLM

    from dapo_rl.cli import main

    model = AutoModelForCausalLM.from_pretrained(quickstart_model)
    fake = FakeServer(_info(model))
    pushes = [0]
    handle = fake.handle

    def dying(path, body):
        answer = handle(path, body)
        if body.get("method") == "dapo_receive_weights":
            pushes[0] += 1
            if pushes[0] == 3:  # connect + 2 steps
                threading.Thread(target=fake.close, daemon=True).start()
        return answer

    fake.handle = dying
    run = tmp_path / "run"
    common = ["rollout.engine=vllm-server", "steps=4", "prompts_per_step=2", "group_size=4", "mini_batch_size=2",
              "micro_batch_size=8", "rollout.max_response_length=6", "overlong.cache_length=2", "data.eval=null",
              "rollout.verify_sync=false", f"quickstart.cache_dir={quickstart_cache}", f"output_dir={run}",
              "logging.progress=false", "checkpoint.interval=1", "rollout.server.timeout_s=5"]
    code = main(["train", f"rollout.server.url={fake.url}", *common])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dapo train")]
    assert code == 1
    assert len(err) == 1 and fake.url in err[0] and "resume=true" in err[0] and "step_000002" in err[0], err
    second = FakeServer(_info(model))
    try:
        assert main(["train", f"rollout.server.url={second.url}", "resume=true", *common]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 4
    finally:
        second.close()


def test_launch_without_vllm_is_one_line_naming_the_python(policy, monkeypatch):
    """``launch=true`` from a Python without vLLM (this one, in the default suite)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this Python has vLLM")
    model, tokenizer = policy
    model = copy.deepcopy(model)
    model.config.hidden_size, model.config.head_dim = 128, 32  # pass the CPU head-size check; the server never starts
    config = load_config(None, ["rollout.engine=vllm-server", "rollout.server.launch=true", "rollout.server.start_timeout_s=60"])
    with pytest.raises(ConfigError) as info:
        VLLMServerEngine.from_config(config, model, tokenizer)
    message = str(info.value)
    assert "\n" not in message and "needs vLLM" in message and "rollout.server.python" in message
