"""Shared fixtures and helpers: one quickstart model per test session, built into a temporary
cache; a grouped-query-attention Llama builder; hand-made scored groups and a trainer on a tiny
model (plain functions too, for test workers in spawned processes)."""

from __future__ import annotations

import copy
from dataclasses import replace
import random

import pytest
import torch

from dapo_rl.config import QuickstartConfig
from dapo_rl.models.quickstart import prepare_quickstart_model


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


def make_scored_groups(tok, num_groups: int, group_size: int, seed: int, truncate_some: bool = True):
    """Hand-made groups with random responses, rewards with spread, and some truncated samples;
    the last group is uniform (zero advantage everywhere, counted in the normaliser only)."""
    from dapo_rl.data.encoding import encode_prompts
    from dapo_rl.data.synthetic import builtin_splits
    from dapo_rl.rollout import Sample
    from dapo_rl.training.rollouts import ScoredGroup

    rng = random.Random(seed)
    train, _ = builtin_splits(64, 8)
    prompts, _ = encode_prompts(train[:num_groups], tok)
    groups = []
    for prompt in prompts:
        samples, scores, correct = [], [], []
        for j in range(group_size):
            length = rng.randint(1, 9)
            response = [rng.randint(3, len(tok) - 1) for _ in range(length)]
            truncated = truncate_some and j == 0
            samples.append(Sample(list(prompt.ids), response, "length" if truncated else "stop"))
            ok = j % 2 == 1 or (j == 2 and rng.random() < 0.5)
            scores.append(1.0 if ok else -1.0)
            correct.append(ok)
        groups.append(ScoredGroup(prompt=prompt, samples=samples, scores=scores, correct=correct))
    groups[-1].scores = [1.0] * group_size
    return groups


def with_adapters(model, r: int = 4, seed: int = 0, b_scale: float = 0.1, target_modules=("all-linear",)):
    """A copy of ``model`` with LoRA adapters (PEFT; alpha = 2r) on ``target_modules``, B drawn
    at random with std ``b_scale`` (PEFT starts B at 0, where A gets no gradient and the adapters
    change nothing: a law would hold trivially); ``b_scale=0`` keeps PEFT's initialisation."""
    from dapo_rl.models.lora import add_adapters

    model = copy.deepcopy(model)
    add_adapters(model, r=r, alpha=2.0 * r, dropout=0.0, target_modules=list(target_modules), base_path="test-base", seed=seed)
    if b_scale:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * b_scale)
    return model


def make_trainer(tiny_model, tok, overrides: list[str], dist=None, share_prompts: bool = False, autocast_dtype=None,
                 engine: str = "hf"):
    """A trainer on a copy of ``tiny_model`` (4 prompts × 4 samples, one mini-batch, lr 1e-2, no
    warm-up or clipping), sampling with the ``engine`` rollout engine. The exact (1e-9) law tests run the full forward of every row
    (``share_prompts=False``): the shared-prompt forward changes tensor shapes, and Hugging Face's
    RMSNorm computes in float32 even for float64 models, so the two differ by ~1e-8."""
    from dapo_rl.config import load_config
    from dapo_rl.data.encoding import encode_prompts
    from dapo_rl.data.synthetic import builtin_splits
    from dapo_rl.rollout.engines import build_engine
    from dapo_rl.training.trainer import Trainer

    config = load_config(overrides=["prompts_per_step=4", "group_size=4", "mini_batch_size=4", "micro_batch_size=16",
                                    "optim.warmup_updates=0", "optim.lr=1e-2", "optim.grad_clip=0", *overrides])
    model = copy.deepcopy(tiny_model).train()
    engine = build_engine(replace(config, rollout=replace(config.rollout, engine=engine)), model, tok)
    prompts, _ = encode_prompts(builtin_splits(16, 4)[0], tok)
    return Trainer(config, model, tok, prompts, None, lambda *a: True, engine, device=torch.device("cpu"), dist=dist,
                   share_prompts=share_prompts, autocast_dtype=autocast_dtype)


@pytest.fixture(scope="session")
def scored_groups():
    """:func:`make_scored_groups`."""
    return make_scored_groups


@pytest.fixture(scope="session")
def adapters():
    """:func:`with_adapters`."""
    return with_adapters


@pytest.fixture(scope="session")
def trainer_factory():
    """:func:`make_trainer`."""
    return make_trainer


class AccumulatingIndexPuts:
    """Context manager recording every ``index_put`` with ``accumulate=True`` that runs inside it
    (forward or backward), as ``(op name, shape)``. On a CPU that operation adds with atomics from
    several threads once it has ≥ 32768 elements, so its result depends on thread timing; it is
    the backward of an advanced-indexing gather ``x[idx]``, and ``x.index_select(0, idx)`` is the
    deterministic way to write the same gather."""

    def __init__(self):
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        calls = self.calls

        class _Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if "index_put" in str(func) and kwargs.get("accumulate", len(args) > 3 and args[3]):
                    calls.append((str(func), tuple(args[0].shape)))
                return func(*args, **kwargs)

        self._mode = _Record()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


@pytest.fixture
def accumulating_index_puts():
    """:class:`AccumulatingIndexPuts` (a fresh recorder per call)."""
    return AccumulatingIndexPuts


class ThreeTurns:
    """An environment for the built-in chain models: it answers each model turn with '=' and ends
    the trajectory after the third."""

    def reset(self, row):
        self.turns = 0

    def step(self, text):
        self.turns += 1
        return ("=", False) if self.turns < 3 else (None, True)


@pytest.fixture(scope="session")
def three_turns():
    """:class:`ThreeTurns` (a multi-turn environment class)."""
    return ThreeTurns
