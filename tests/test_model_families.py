"""Every supported family through the spec decoder, exact against Hugging Face: the engine's
log-probs against a full single-sequence forward, greedy samples against ``generate``, the
trainer's flat forward (log-probs and gradients) against the padded full forward, left padding,
the one-line fallback notice and the one-line weight-mismatch error."""

from __future__ import annotations

import functools
import logging

import pytest
import safetensors.torch
import torch
import transformers as tf

from dapo_rl.data.synthetic import VOCAB
from dapo_rl.models import rotary as rope
from dapo_rl.models import spec as spec_module
from dapo_rl.models.decode import SpecDecoder
from dapo_rl.models.packed_forward import FlatPrompts, FlatResponses, flat_logits
from dapo_rl.models.spec import (SpecMismatchError, check_checkpoint, check_checkpoint_keys, fast_spec, has_sliding_layers,
                                 read_spec, supports_fast_path)
from dapo_rl.models.tiny import build_char_tokenizer
from dapo_rl.rollout import HFGenerateEngine, SamplingParams
from dapo_rl.rollout.decoder_engine import DecoderEngine
from dapo_rl.rollout.base import Sample
from dapo_rl.rollout.hf import left_pad
from dapo_rl.training.batching import pack
from dapo_rl.training.logprobs import ForwardSettings, forward_path, logprobs

TOK = build_char_tokenizer(VOCAB)
# head_dim 16 ≠ hidden / heads = 12; grouped-query attention (4 query heads on 2 key/value heads).
COMMON = dict(vocab_size=len(TOK), hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=TOK.pad_token_id,
              bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id, tie_word_embeddings=False)

# name: (config class, model class, config overrides). Windows of 4–7 tokens, shorter than the
# prompt + response sequences below (up to 9 + 12 tokens).
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama-rope-linear": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "llama-rope-dynamic": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    "llama-rope-llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama-rope-yarn": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2-bias-window": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen3-qk-norm": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6)),
    "phi3-partial-rotary-window": ("Phi3Config", "Phi3ForCausalLM", dict(partial_rotary_factor=0.5, sliding_window=7)),
    "phi3-rope-longrope": ("Phi3Config", "Phi3ForCausalLM", dict(hidden_size=64, max_position_embeddings=128, original_max_position_embeddings=32, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [2.0 + 0.3 * i for i in range(8)], "original_max_position_embeddings": 32})),
    # Eager attention: the implementation that applies Gemma2's attention soft-capping.
    "gemma2-softcap-window": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=3.0, query_pre_attn_scalar=24,
        attn_implementation="eager")),
    "gemma3-window-local-global": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        sliding_window=5, sliding_window_pattern=2, query_pre_attn_scalar=24, rope_parameters={
            "full_attention": {"rope_type": "linear", "rope_theta": 100000.0, "factor": 2.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
}
WINDOWED = [name for name in CASES if "window" in name]
PROMPTS = [TOK(text)["input_ids"] for text in ("12=", "3456..=", "7=", "98765432=")]  # different lengths: left padding
_built: dict[str, torch.nn.Module] = {}


def family(name: str, fresh: bool = False) -> torch.nn.Module:
    """The case's tiny float32 model (built once, unless ``fresh``), every 1-D weight (norm
    scales, biases) randomised so that a wrong norm offset or a dropped bias shows."""
    if name not in _built or fresh:
        config_cls, model_cls, overrides = CASES[name]
        kwargs = {**COMMON, **overrides}
        attn = kwargs.pop("attn_implementation", None)
        config = getattr(tf, config_cls)(**kwargs)
        if attn:
            config._attn_implementation = attn
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sum(map(ord, name)))
            model = getattr(tf, model_cls)(config).float().eval()
            with torch.no_grad():
                for p in model.parameters():
                    if p.ndim == 1:
                        p.normal_(0.0, 0.3)
        if fresh:
            return model
        _built[name] = model
    return _built[name]


def _full_logprobs(model, prompt, response, temperature=1.0):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def _engine(model, **options):
    return DecoderEngine(model, pad_token_id=TOK.pad_token_id, eos_token_id=TOK.eos_token_id, **options)


# Products on oneDNN with packed weights, and plain (what a small model gets on an Intel CPU).
@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("name", CASES)
def test_spec_is_read_and_the_engine_log_probs_equal_a_full_forward(name, pack):
    model = family(name)
    spec = fast_spec(model, 32)
    assert spec is not None and spec.head_dim == 16 and spec.kv_heads == 2
    assert has_sliding_layers(model.config) == (name in WINDOWED) == any(w is not None for w in spec.windows)
    torch.manual_seed(0)
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    groups = _engine(model, pack_weights=pack).generate(PROMPTS, 3, params)
    assert max(len(p) + len(s.response_ids) for p, g in zip(PROMPTS, groups) for s in g) > 8  # past every window
    for prompt, group in zip(PROMPTS, groups):
        for sample in group:
            expected = _full_logprobs(model, prompt, sample.response_ids)
            torch.testing.assert_close(torch.tensor(sample.logprobs, dtype=torch.float64), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_an_adapted_model_decodes_in_place_exactly(name, adapters):
    # LoRA: the decoder's products read the model's own matrices (no weight-sized copy of a base
    # that never changes) and add every projection's adapter term on the fly.
    model = adapters(family(name), b_scale=0.2).eval()
    decoder = SpecDecoder(model, read_spec(model))
    products = [product for layer in decoder.layers for product in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    own = {param.data_ptr() for param in model.parameters()}
    assert decoder.in_place and not decoder.packed
    assert all(weight.data_ptr() in own for product in [decoder.lm_head, *products] for weight in product.weights)
    assert all(product.low_rank is not None for product in products)
    torch.manual_seed(0)
    groups = _engine(model).generate(PROMPTS, 3, SamplingParams(temperature=1.0, max_new_tokens=12))
    for prompt, group in zip(PROMPTS, groups):
        for sample in group:
            expected = _full_logprobs(model, prompt, sample.response_ids)
            torch.testing.assert_close(torch.tensor(sample.logprobs, dtype=torch.float64), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_greedy_samples_equal_hf_generate(name):
    model = family(name)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    fast = _engine(model).generate(PROMPTS, 1, greedy)
    ref = HFGenerateEngine(model, pad_token_id=TOK.pad_token_id, eos_token_id=TOK.eos_token_id).generate(PROMPTS, 1, greedy)
    assert [g[0].response_ids for g in fast] == [g[0].response_ids for g in ref]


SPREAD = ["qwen3-qk-norm", "phi3-partial-rotary-window", "gemma2-softcap-window", "gemma3-window-local-global"]


@pytest.mark.parametrize("name", SPREAD)
def test_pytorch_ops_decode_like_the_fused_kernels(name, monkeypatch):
    # The decoder's other paths: plain float32 products and PyTorch ops (no C kernels, as on a
    # GPU), then Hugging Face's rotate-half form (no complex rotary, as in bfloat16).
    model = family(name)
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    runs = []
    for options in ({"pack_weights": True}, {"native_kernels": False, "pack_weights": False}, {"native_kernels": False}):
        if len(runs) == 2:
            monkeypatch.setattr(rope, "complex_rotary_applies", lambda *args: False)
        torch.manual_seed(4)
        runs.append(_engine(model, **options).generate(PROMPTS, 2, params))
    for run in runs[1:]:
        assert [[s.response_ids for s in g] for g in run] == [[s.response_ids for s in g] for g in runs[0]]
        for a, b in zip(run, runs[0]):
            for sa, sb in zip(a, b):
                torch.testing.assert_close(torch.tensor(sa.logprobs), torch.tensor(sb.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", SPREAD)
def test_bfloat16_models_decode_close_to_their_full_forward(name):
    # The GPU configuration: bfloat16 weights, PyTorch ops, rotate-half rotary, float32 Gemma norms.
    model = family(name, fresh=True).to(torch.bfloat16)
    torch.manual_seed(0)
    groups = _engine(model).generate(PROMPTS, 2, SamplingParams(temperature=1.0, max_new_tokens=10))
    for prompt, group in zip(PROMPTS, groups):
        for sample in group:
            expected = _full_logprobs(model, prompt, sample.response_ids)
            torch.testing.assert_close(torch.tensor(sample.logprobs, dtype=torch.float64), expected, atol=0.02, rtol=0)


# rollout.dtype=bfloat16 on a float32 model: the decoder's copies of the weights, its activations
# and its key/value cache are bf16; the prompt's prefill, the last norm, the output product, the
# softmax and the log-probs stay float32. Measured on these tiny models: at most 0.004 from the
# fp32 full forward (Gemma's soft-capped logits the most), against 1e-5 in float32.
BF16_LOGPROB_TOLERANCE = 0.01


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("name", CASES)
def test_bf16_sampling_log_probs_are_close_to_the_fp32_full_forward(name, pack):
    model = family(name)
    engine = _engine(model, pack_weights=pack, dtype=torch.bfloat16)
    assert engine.precision == "bfloat16"
    torch.manual_seed(0)
    groups = engine.generate(PROMPTS, 3, SamplingParams(temperature=1.0, max_new_tokens=12))
    errors = []
    for prompt, group in zip(PROMPTS, groups):
        for sample in group:
            expected = _full_logprobs(model, prompt, sample.response_ids)
            errors.append((torch.tensor(sample.logprobs, dtype=torch.float64) - expected).abs().max())
    assert max(errors) <= BF16_LOGPROB_TOLERANCE
    assert max(errors) > 1e-6  # the decode steps did run in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model itself is untouched


@pytest.mark.parametrize("name", ["llama", "qwen3-qk-norm", "gemma2-softcap-window"])
def test_bf16_sampling_is_bit_reproducible_from_a_seed(name):
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        groups = _engine(family(name), dtype=torch.bfloat16, keep_decoder=True).generate(
            PROMPTS, 2, SamplingParams(temperature=1.0, max_new_tokens=12))
        runs.append([(s.response_ids, s.logprobs) for g in groups for s in g])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("one_call", [True, False], ids=["one-decode-loop", "turn-by-turn"])
@pytest.mark.parametrize("name", ["llama", "qwen3-qk-norm", "gemma3-window-local-global"])
def test_bf16_multi_turn_log_probs_are_close_to_a_full_forward(name, one_call, monkeypatch, three_turns):
    """Multi-turn in bf16: environment tokens fed through the bf16 decoder (one loop), or kept bf16
    keys/values continued by the fp32 prefill (turn by turn)."""
    if not one_call:
        monkeypatch.setattr(DecoderEngine, "generate_turns", lambda self, *args, **kwargs: None)
    model = family(name)
    _multi_turn_matches_a_full_forward(model, _engine(model, dtype=torch.bfloat16), three_turns, BF16_LOGPROB_TOLERANCE)


def _multi_turn_matches_a_full_forward(model, engine, environment, atol: float, wait_steps: int = 0) -> None:
    """Trajectories of two prompts × 2 through ``engine``: the model tokens' log-probs against one
    full forward of the whole final sequence (``atol``); at least one continued past a message."""
    from dapo_rl.rollout.multi_turn import MultiTurnSampler

    sampler = MultiTurnSampler(engine, TOK, environment=environment, max_turns=3, wait_steps=wait_steps)
    torch.manual_seed(0)
    groups = sampler.generate(PROMPTS[:2], 2, SamplingParams(temperature=1.0, max_new_tokens=24))
    turns = 0
    for prompt, group in zip(PROMPTS, groups):
        for s in group:
            turns = max(turns, s.trajectory.turns)
            model_at = torch.tensor(s.model_mask, dtype=torch.bool)
            full = _full_logprobs(model, prompt, s.response_ids)
            torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64)[model_at], full[model_at], atol=atol, rtol=0)
    assert turns >= 2  # at least one trajectory continued past an environment message


@pytest.mark.parametrize("name", ["llama", "mistral-window", "gemma2-softcap-window", "gemma3-window-local-global"])
def test_left_padding_changes_nothing(name):
    model = family(name)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    alone = _engine(model).generate(PROMPTS[:1], 1, greedy)[0][0]
    batched = _engine(model).generate(PROMPTS, 1, greedy)[0][0]  # prompt 0 left-padded by 7
    assert alone.response_ids == batched.response_ids
    torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(batched.logprobs), atol=1e-5, rtol=0)


def _padded_logprobs(model, prompts, owner, responses):
    """Log-probs ``[N]`` of every response token (row by row) from one padded forward of all rows
    (one forward per row under eager attention, whose float32 softmax turns an all-masked padding
    row into NaN in float64, which its values then spread)."""
    if model.config._attn_implementation == "eager" and len(responses) > 1:
        return torch.cat([_padded_logprobs(model, prompts, [o], [r]) for o, r in zip(owner, responses)])
    seqs = [prompts[o] + r for o, r in zip(owner, responses)]
    width_p, width_r = max(len(p) for p in prompts), max(len(r) for r in responses)
    ids = torch.full((len(seqs), width_p + width_r), TOK.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, (o, r) in enumerate(zip(owner, responses)):
        p = prompts[o]
        ids[i, width_p - len(p) : width_p + len(r)] = torch.tensor(p + r)
        mask[i, width_p - len(p) : width_p + len(r)] = 1
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    logp = torch.log_softmax(logits[:, width_p - 1 : -1], -1)
    return torch.cat([logp[i, : len(r)].gather(-1, torch.tensor(r)[:, None]).squeeze(-1) for i, r in enumerate(responses)])


def _flat_logprobs(model, prompts, owner, responses, complex_rotary=None):
    """The same log-probs from :func:`flat_logits`: each prompt once, groups of two rows."""
    ids, attention = left_pad(prompts, TOK.pad_token_id)
    rows = list(range(len(responses)))
    groups = [rows[i : i + 2] for i in range(0, len(rows), 2)]
    flat = FlatResponses.build(groups, [len(prompts[o]) for o in owner], [len(r) for r in responses], torch.device("cpu"))
    owner_t = torch.tensor(owner)
    tokens = torch.tensor([responses[r][s] for r, s in zip(flat.row_of.tolist(), flat.step_of.tolist())])
    after, last = flat_logits(model, FlatPrompts.build(ids, attention), owner_t, tokens, flat, complex_rotary=complex_rotary)
    n = tokens.numel()
    source = torch.where(flat.step_of == 0, n + owner_t[flat.row_of], torch.arange(n) - 1)
    logp = torch.log_softmax(torch.cat([after, last])[source], -1).gather(-1, tokens[:, None]).squeeze(-1)
    # Back to row-by-row order, as _padded_logprobs.
    order = sorted(range(n), key=lambda j: (flat.row_of[j].item(), flat.step_of[j].item()))
    return logp[torch.tensor(order)]


@pytest.mark.parametrize("name", CASES)
def test_flat_training_forward_equals_the_padded_forward_in_float64(name):
    _check_flat_forward(name, complex_rotary=None)


@pytest.mark.parametrize("name", SPREAD)
def test_flat_training_forward_with_the_rotate_half_form(name):
    # The trainer's path under autocast (no complex bfloat16), checked in float64.
    _check_flat_forward(name, complex_rotary=False)


@pytest.mark.parametrize("name", ["llama", *SPREAD])
def test_flat_training_forward_in_float32(name):
    # float32 takes the native kernels where they apply (the gated MLP activation: SiLU, GeLU-tanh).
    _check_flat_forward(name, complex_rotary=None, dtype=torch.float32, tolerance=2e-5)


# model.dtype=bf16-autocast: products in bf16; weights, softmax, log-probs and reductions in float32.
# Measured on these tiny models: log-probs within 0.004 of the fp32 forward, gradients with a
# relative error (norm of the difference over the norm) of at most 1.4% (Gemma's the most).
BF16_TRAIN_LOGPROB_TOLERANCE = 0.01
BF16_TRAIN_GRADIENT_RELATIVE_ERROR = 0.03


@pytest.mark.parametrize("name", ["llama", *SPREAD])
def test_bf16_autocast_training_log_probs_and_gradients_are_close_to_fp32(name):
    """The trainer's own forward (:func:`logprobs`, the flat path: prompts shared) under
    ``ForwardSettings(autocast_dtype=bfloat16)`` against the same in float32."""
    model = family(name)
    gen = torch.Generator().manual_seed(1)
    samples = [Sample(PROMPTS[o], torch.randint(3, len(TOK), (k,), generator=gen).tolist(), "stop")
               for o, k in ((1, 9), (1, 4), (3, 12), (3, 1), (0, 7))]
    batch = pack(samples, TOK.pad_token_id, torch.device("cpu"))
    weights = torch.randn(batch.response_ids.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for autocast in (None, torch.bfloat16):
        settings = ForwardSettings(autocast_dtype=autocast)
        assert forward_path(model, batch, settings) == "flat"
        model.zero_grad()
        with settings.autocast(torch.device("cpu")):
            logp, _ = logprobs(model, batch, settings)
        assert logp.dtype == torch.float32
        (logp * weights * batch.response_mask).sum().backward()
        results.append((logp.detach() * batch.response_mask, torch.cat([p.grad.flatten() for p in model.parameters()])))
    model.zero_grad()
    (fp32_logp, fp32_grad), (bf16_logp, bf16_grad) = results
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert 0 < (bf16_logp - fp32_logp).abs().max() <= BF16_TRAIN_LOGPROB_TOLERANCE
    assert (bf16_grad - fp32_grad).norm() / fp32_grad.norm() <= BF16_TRAIN_GRADIENT_RELATIVE_ERROR


def _check_flat_forward(name: str, complex_rotary: bool | None, dtype: torch.dtype = torch.float64,
                        tolerance: float = 1e-6) -> None:
    """:func:`flat_logits` log-probs and gradients against the padded full forward."""
    model = family(name).to(dtype)
    try:
        gen = torch.Generator().manual_seed(1)
        prompts = [PROMPTS[1], PROMPTS[3], PROMPTS[0]]
        if model.config._attn_implementation == "eager":
            # (see _padded_logprobs: the prompt forward must not pad either)
            prompts = [TOK(text)["input_ids"] for text in ("3456..=", "1212.0=", "98.765=")]
        owner = [0, 0, 1, 1, 2]
        responses = [torch.randint(3, len(TOK), (k,), generator=gen).tolist() for k in (9, 4, 12, 1, 7)]
        results = []
        for forward in (_padded_logprobs, functools.partial(_flat_logprobs, complex_rotary=complex_rotary)):
            model.zero_grad()
            logp = forward(model, prompts, owner, responses)
            weights = torch.randn(logp.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
            (logp * weights).sum().backward()
            results.append((logp.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
        (full_logp, full_grad), (flat_logp, flat_grad) = results
        torch.testing.assert_close(flat_logp, full_logp, rtol=tolerance, atol=tolerance * full_logp.abs().max().item())
        torch.testing.assert_close(flat_grad, full_grad, rtol=tolerance, atol=tolerance * full_grad.abs().max().item())
    finally:
        model.float()


@pytest.mark.parametrize("name", ["llama", *SPREAD])
def test_gradient_checkpointing_recomputes_the_flat_forward_exactly_and_keeps_less(name):
    # model.gradient_checkpointing: the trainer's flat forward recomputes each layer (prompts and
    # responses) in the backward pass.
    model = family(name, fresh=True).double().train()
    gen = torch.Generator().manual_seed(3)
    # (equal-length prompts: eager attention's float32 softmax turns float64 left padding into NaN)
    prompts = [TOK(text)["input_ids"] for text in ("3456..=", "98.765=")]
    samples = [Sample(prompts[p], torch.randint(3, len(TOK), (k,), generator=gen).tolist(), "stop")
               for p, k in ((0, 9), (0, 4), (1, 12), (1, 5))]
    batch = pack(samples, TOK.pad_token_id, torch.device("cpu"))
    results = []
    for recompute in (False, True):
        if recompute:
            model.gradient_checkpointing_enable()
        assert forward_path(model, batch) == "flat"
        model.zero_grad()
        saved = []

        def keep(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            logp, _ = logprobs(model, batch)
        logp.sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], sum(saved)))
    (logp, grads, kept), (logp_re, grads_re, kept_re) = results
    assert torch.equal(logp, logp_re)
    assert len(grads) == len(grads_re) and all(torch.equal(a, b) for a, b in zip(grads, grads_re))
    assert kept_re < 0.6 * kept


def test_under_a_wrapper_gradient_checkpointing_avoids_the_prompt_cache_path():
    # A DDP-style wrapper (``.module``) cannot take the flat path; the "shared" path runs on a
    # prompt cache that checkpointed Hugging Face layers leave empty, so it must not be chosen.
    model = family("llama", fresh=True).train()
    wrapper = torch.nn.Module()
    wrapper.module = model
    samples = [Sample(PROMPTS[1], [5, 6, 7], "stop"), Sample(PROMPTS[1], [8, 9], "stop")]
    batch = pack(samples, TOK.pad_token_id, torch.device("cpu"))
    assert forward_path(wrapper, batch) == "shared"
    model.gradient_checkpointing_enable()
    assert forward_path(wrapper, batch) == "buckets"
    assert forward_path(model, batch) == "flat"


@pytest.mark.parametrize("name", CASES)
def test_training_backward_never_accumulates_through_index_put(name, accumulating_index_puts):
    # Each prompt's keys, values and last logits are gathered once per response: written as
    # x[idx], their backward would add with thread-timed atomics (issue 16).
    from dapo_rl.rollout import Sample
    from dapo_rl.training.batching import pack
    from dapo_rl.training.logprobs import logprobs

    model = family(name)
    gen = torch.Generator().manual_seed(5)
    samples = [Sample(list(p), torch.randint(3, len(TOK), (k,), generator=gen).tolist(), "stop")
               for p in PROMPTS for k in (6, 2, 9)]
    batch = pack(samples, TOK.pad_token_id, torch.device("cpu"))
    try:
        with accumulating_index_puts() as recorded:
            logp, _ = logprobs(model, batch, with_entropy=True)
            logp.sum().backward()
        assert recorded.calls == []
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    finally:
        model.zero_grad(set_to_none=True)


def test_an_unsupported_architecture_falls_back_announced_once_in_one_line(caplog, monkeypatch):
    monkeypatch.setattr(spec_module, "announced", set())
    config = tf.GPT2Config(vocab_size=len(TOK), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                           bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id)
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(config).eval()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    with caplog.at_level(logging.WARNING, logger="dapo_rl.models.spec"):
        runs = [_engine(model).generate(PROMPTS, 1, greedy) for _ in range(2)]
        assert not supports_fast_path(model)
    notices = [r.getMessage() for r in caplog.records if r.name == "dapo_rl.models.spec"]
    assert notices == ["GPT2LMHeadModel (gpt2): this architecture not supported by the fast decoder; using the Hugging Face forward"]
    ref = HFGenerateEngine(model, pad_token_id=TOK.pad_token_id, eos_token_id=TOK.eos_token_id).generate(PROMPTS, 1, greedy)
    assert [g[0].response_ids for g in runs[0]] == [g[0].response_ids for g in ref]


def test_length_dependent_rope_falls_back_past_its_exact_length(caplog, monkeypatch):
    monkeypatch.setattr(spec_module, "announced", set())
    model = family("llama-rope-dynamic")
    spec = read_spec(model)
    assert spec.exact_up_to == 63 and spec.exact_for(63) and not spec.exact_for(64) and not spec.exact_for(None)
    longrope = read_spec(family("phi3-rope-longrope"))
    assert longrope.exact_up_to == 32 and longrope.rotary_dim == 16 and read_spec(family("phi3-partial-rotary-window")).rotary_dim == 8
    with caplog.at_level(logging.WARNING, logger="dapo_rl.models.spec"):
        out = _engine(model).generate(PROMPTS[:1], 1, SamplingParams(temperature=0.0, max_new_tokens=60))
    assert len(out[0][0].response_ids) > 0
    (notice,) = [r.getMessage() for r in caplog.records if r.name == "dapo_rl.models.spec"]
    assert "dynamic RoPE past 63 tokens" in notice and "\n" not in notice


def test_a_family_whose_weights_do_not_match_raises_one_line_naming_the_tensor(tmp_path):
    config_cls, model_cls, overrides = CASES["qwen3-qk-norm"]
    torch.manual_seed(0)
    model = getattr(tf, model_cls)(getattr(tf, config_cls)(**{**COMMON, **overrides})).eval()
    keys = list(model.state_dict())
    with pytest.raises(SpecMismatchError, match=r"^Qwen3 config, but the checkpoint has no tensor model\.layers\.1\.self_attn\.q_norm\.weight$"):
        check_checkpoint_keys(read_spec(model), model.config, [k for k in keys if k != "model.layers.1.self_attn.q_norm.weight"])
    # A checkpoint folder without the tensor: from_pretrained would fill it in with ones.
    model.save_pretrained(tmp_path)
    check_checkpoint(model, tmp_path)  # complete: nothing to say
    state = {k: v for k, v in model.state_dict().items() if k != "model.layers.1.self_attn.q_norm.weight"}
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(SpecMismatchError, match=r"no tensor model\.layers\.1\.self_attn\.q_norm\.weight$"):
        check_checkpoint(model, tmp_path)
    model.model.layers[1].self_attn.q_norm = None
    with pytest.raises(SpecMismatchError) as error:
        _engine(model).generate(PROMPTS, 1, SamplingParams(max_new_tokens=4))
    assert str(error.value) == "Qwen3 config, but the model has no tensor model.layers.1.self_attn.q_norm.weight"
    assert isinstance(error.value, ValueError)
    # A tensor the family would ignore is as wrong as a missing one.
    llama = getattr(tf, "LlamaForCausalLM")(tf.LlamaConfig(**COMMON))
    llama.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(64))
    with pytest.raises(SpecMismatchError, match="model.layers.0.self_attn.q_proj.bias"):
        read_spec(llama)


@pytest.mark.parametrize("one_call, wait_steps", [(True, 0), (True, 3), (False, 0)],
                         ids=["one-decode-loop", "one-decode-loop-waiting", "turn-by-turn"])
@pytest.mark.parametrize("name", CASES)
def test_a_multi_turn_trajectorys_log_probs_equal_a_full_forward_of_the_final_sequence(name, one_call, wait_steps, monkeypatch,
                                                                                        three_turns):
    """Trajectories through the fast engine, environment messages between the turns: the model
    tokens' log-probs equal one full forward of the whole final sequence (1e-5). In one decode loop
    (the default) a message is fed to its row while the others sample; waiting (``wait_steps``),
    each reply is computed in a thread and the row skips steps the full forward never sees; turn by
    turn (an engine call per turn), each call continues the kept keys and values and prefills only
    the new tokens."""
    import dapo_rl.rollout.decoder_turns as decoder_turns

    fed: list[tuple[int, int]] = []  # (tokens prefilled per row, longest prompt) of each continued call
    continued = decoder_turns.continued_prefill

    def spy(prompts, kept, pad_token_id, device, **kwargs):
        out = continued(prompts, kept, pad_token_id, device, **kwargs)
        fed.append((out[1].shape[1], max(len(p) for p in prompts)))
        return out

    monkeypatch.setattr(decoder_turns, "continued_prefill", spy)
    if not one_call:
        monkeypatch.setattr(DecoderEngine, "generate_turns", lambda self, *args, **kwargs: None)
    model = family(name)
    _multi_turn_matches_a_full_forward(model, _engine(model), three_turns, 1e-5, wait_steps)
    if one_call:
        assert not fed  # one prefill of the prompts, then one decode loop
    else:
        assert all(width < longest for width, longest in fed)  # never prefilled again from the start
        # Kept keys/values serve the direct decoder; a model it serves at every length reached
        # here continues (dynamic/longrope RoPE only up to a length: longer calls prefill whole).
        assert fed or fast_spec(model, 64) is None


@pytest.mark.parametrize("name", ["llama", "gemma2-softcap-window"])
def test_one_decode_loop_and_turn_by_turn_give_the_same_greedy_trajectories(name, monkeypatch, three_turns):
    from dapo_rl.rollout.multi_turn import MultiTurnSampler

    model = family(name)
    digits = tuple(TOK.convert_tokens_to_ids(list("0123456789")))  # turns end often: at any digit
    params = SamplingParams(temperature=0.0, max_new_tokens=24, stop_token_ids=digits)
    one_call = MultiTurnSampler(_engine(model), TOK, environment=three_turns, max_turns=3).generate(PROMPTS, 1, params)
    waiting = MultiTurnSampler(_engine(model), TOK, environment=three_turns, max_turns=3, wait_steps=4).generate(PROMPTS, 1, params)
    monkeypatch.setattr(DecoderEngine, "generate_turns", lambda self, *args, **kwargs: None)
    by_turn = MultiTurnSampler(_engine(model), TOK, environment=three_turns, max_turns=3).generate(PROMPTS, 1, params)
    for (a,), (b,), (c,) in zip(one_call, by_turn, waiting):
        assert (a.response_ids, a.model_mask, a.finish_reason, a.trajectory.turns) == \
               (b.response_ids, b.model_mask, b.finish_reason, b.trajectory.turns) == \
               (c.response_ids, c.model_mask, c.finish_reason, c.trajectory.turns)
    assert any(s.trajectory.turns > 1 for (s,) in one_call)


class _SlowThreeTurns:
    """ThreeTurns whose replies take a random time, and which records the threads they ran in."""

    threads: set = set()

    def reset(self, row):
        self.turns = 0

    def step(self, text):
        import random
        import threading
        import time

        _SlowThreeTurns.threads.add(threading.current_thread().name)
        time.sleep(random.random() * 0.02)
        self.turns += 1
        return ("=", False) if self.turns < 3 else (None, True)


def test_replies_computed_while_the_loop_samples_give_the_same_trajectories_whatever_they_take():
    """With ``wait_steps`` each reply runs in a thread while the other rows sample; it is fed a
    fixed number of steps after its turn, so random reply times change nothing (bit-identical)."""
    import threading

    from dapo_rl.rollout.multi_turn import MultiTurnSampler

    model = family("llama")
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        sampler = MultiTurnSampler(_engine(model), TOK, environment=_SlowThreeTurns, max_turns=3, wait_steps=2)
        runs.append(sampler.generate(PROMPTS, 3, SamplingParams(temperature=1.0, max_new_tokens=24)))
    flat = [[(s.response_ids, s.logprobs, s.model_mask, s.finish_reason) for g in run for s in g] for run in runs]
    assert flat[0] == flat[1]
    assert any(s.trajectory.turns > 1 for g in runs[0] for s in g)
    assert threading.current_thread().name not in _SlowThreeTurns.threads  # never on the decode loop's thread
