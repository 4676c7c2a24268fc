"""Shared fixtures: one quickstart model per test session, built into a temporary cache; a
grouped-query-attention Llama builder."""

from __future__ import annotations

import pytest
import torch

from dapo_rl.config import QuickstartConfig
from dapo_rl.training.quickstart import prepare_quickstart_model


@pytest.fixture(scope="session")
def quickstart_cache(tmp_path_factory) -> str:
    """A cache folder holding the default quickstart model (warm-up run once per session, ~20 s)."""
    cache = tmp_path_factory.mktemp("dapo-cache")
    prepare_quickstart_model(QuickstartConfig(cache_dir=str(cache)), seed=0, progress=False)
    return str(cache)


@pytest.fixture(scope="session")
def quickstart_model(quickstart_cache) -> str:
    """Path of the default quickstart model folder."""
    return str(prepare_quickstart_model(QuickstartConfig(cache_dir=quickstart_cache), seed=0, progress=False))


@pytest.fixture(scope="session")
def gqa_llama():
    """Builder of a tiny float32 Llama with grouped-query attention (4 query heads on 2 key/value
    heads, 2 layers) for a tokenizer: ``gqa_llama(tokenizer, seed=3)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(tokenizer, seed: int = 3):
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).float().eval()

    return build
