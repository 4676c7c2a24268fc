"""Bit-identical runs at the machine's default thread count (issue 16): no forward path gathers in
a way whose backward adds with thread-timed atomics, a repeated backward is bit-identical, the
``reproducible`` switch sets PyTorch's deterministic mode and restores it, and (slow) whole
training runs repeat to the last bit of the final weights."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dapo_rl.data.synthetic import VOCAB
from dapo_rl.models.tiny import build_char_tokenizer
from dapo_rl.reproducibility import reproducible_torch
from dapo_rl.rollout import Sample
from dapo_rl.telemetry import read_metrics
from dapo_rl.training.batching import pack
from dapo_rl.training.logprobs import ForwardSettings, forward_path, logprobs

TOK = build_char_tokenizer(VOCAB)
CPU = torch.device("cpu")


def _batch(num_prompts: int, group_size: int, prompt_len: int, max_response: int, seed: int = 0):
    """Every prompt repeated ``group_size`` times (as in a rollout batch), responses of random length."""
    rng = random.Random(seed)
    prompts = [[rng.randint(3, len(TOK) - 1) for _ in range(rng.randint(prompt_len // 2, prompt_len))]
               for _ in range(num_prompts)]
    samples = [Sample(p, [rng.randint(3, len(TOK) - 1) for _ in range(rng.randint(1, max_response))], "stop")
               for p in prompts for _ in range(group_size)]
    return pack(samples, TOK.pad_token_id, CPU)


PATHS = {
    "flat": ForwardSettings(),
    "shared": ForwardSettings(flat=False),
    "buckets": ForwardSettings(share_prompts=False),
    "whole": ForwardSettings(one_forward=True),
}


@pytest.mark.parametrize("path", PATHS)
def test_no_forward_path_accumulates_through_index_put(path, gqa_llama, accumulating_index_puts):
    model = gqa_llama(TOK).train()
    batch = _batch(num_prompts=6, group_size=8, prompt_len=12, max_response=20)
    settings = PATHS[path]
    assert forward_path(model, batch, settings) == path
    with accumulating_index_puts() as recorded:
        logp, _ = logprobs(model, batch, settings, with_entropy=True)
        logp.sum().backward()
    assert recorded.calls == []


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="a thread-timing race needs two threads")
def test_the_training_backward_repeats_bit_for_bit_at_the_default_thread_count(gqa_llama):
    # Sizes past PyTorch's 32768-element threshold for a threaded index_put: 64 rows gather
    # [64, 2 kv heads, 16, 16] prompt keys per layer, and ~2000 tokens × vocab logits rows.
    # Written as x[idx], 20 repeats gave ~20 different gradients on this 2-core machine.
    model = gqa_llama(TOK).train()
    batch = _batch(num_prompts=8, group_size=8, prompt_len=16, max_response=60, seed=1)
    assert forward_path(model, batch) == "flat"
    weights = torch.randn(batch.response_ids.shape, generator=torch.Generator().manual_seed(0))
    seen = set()
    for _ in range(20):
        model.zero_grad(set_to_none=True)
        logp, _ = logprobs(model, batch)
        (logp * weights).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        seen.add(hashlib.sha256(grads.numpy().tobytes()).hexdigest())
    assert len(seen) == 1


def test_reproducible_torch_turns_deterministic_mode_on_and_restores_it():
    before = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    with reproducible_torch(True, CPU):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        # No NaN fill of torch.empty: it costs the sampler time and changes no result.
        assert not torch.utils.deterministic.fill_uninitialized_memory
    assert (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory) == before
    with reproducible_torch(False, CPU):
        assert torch.are_deterministic_algorithms_enabled() == before[0]


def test_an_operation_without_a_deterministic_version_is_reported_once_in_one_line():
    lines = []
    alert = ("fancy_kernel does not have a deterministic implementation, but you set "
             "'torch.use_deterministic_algorithms(True, warn_only=True)'. You can file an issue ...")
    with reproducible_torch(True, CPU, notice=lines.append):
        for _ in range(3):
            warnings.warn(alert, UserWarning)
        warnings.warn("other_kernel does not have a deterministic implementation, but ...", UserWarning)
        with pytest.warns(UserWarning, match="unrelated"):  # other warnings pass through untouched
            warnings.warn("unrelated", UserWarning)
    assert len(lines) == 2
    assert lines[0].startswith("reproducible=true: fancy_kernel has no deterministic implementation on cpu")
    assert "reproducible=false" in lines[0] and "\n" not in lines[0]


def test_reproducible_is_a_config_key_on_by_default():
    from dapo_rl.config import load_config

    assert load_config().reproducible is True
    assert load_config(overrides=["reproducible=false"]).reproducible is False


def _train_twice(tmp_path: Path, cache: str, *overrides: str) -> list[tuple[str, list[dict]]]:
    # Two threads (the default on the 2-core machines this project targets): the race this guards
    # against needs at least two. One run after the other, so they do not share the cores.
    env = {k: v for k, v in os.environ.items() if k != "MKL_NUM_THREADS"}
    env.update(DAPO_RL_CACHE=cache, OMP_NUM_THREADS="2")
    results = []
    for run in ("a", "b"):
        out = tmp_path / run
        proc = subprocess.run([sys.executable, "-m", "dapo_rl.cli", "train", f"quickstart.cache_dir={cache}",
                               f"output_dir={out}", "logging.progress=false", *overrides],
                              env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [{k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))}
                for row in read_metrics(out / "metrics.jsonl")]
        results.append((hashlib.sha256((out / "final" / "model.safetensors").read_bytes()).hexdigest(), rows))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    [],  # the quickstart as the README runs it
    # Four optimiser updates per step, two epochs: π_old differs from π_θ, so clipping is active.
    ["steps=20", "mini_batch_size=4", "micro_batch_size=32", "ppo_epochs=2"],
    # bf16 sampling (the decoder's bf16 weights and cache) and bf16-autocast training, corrected.
    ["steps=10", "rollout.dtype=bfloat16", "model.dtype=bf16-autocast"],
], ids=["quickstart", "several-updates-per-step", "bf16"])
def test_training_twice_at_two_threads_gives_identical_weights(overrides, tmp_path, quickstart_cache):
    (sha_a, rows_a), (sha_b, rows_b) = _train_twice(tmp_path, quickstart_cache, *overrides)
    assert rows_a == rows_b
    assert sha_a == sha_b
    if "ppo_epochs=2" in overrides:
        assert any(row.get("train/clip_frac_low", 0) + row.get("train/clip_frac_high", 0) > 0 for row in rows_a), \
            "no token was clipped: the case tests nothing"
    if "rollout.dtype=bfloat16" in overrides:  # the sampler really differed from the trainer, and was corrected
        gaps = [row["rollout/logp_abs_diff"] for row in rows_a if "rollout/logp_abs_diff" in row]
        assert len(gaps) >= 5 and min(gaps) > 1e-4, gaps
