"""The fused C decode kernels: each equals the PyTorch ops it replaces; building and falling back."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dapo_rl.data.synthetic import VOCAB
from dapo_rl.models import native
from dapo_rl.models.decode import SpecDecoder
from dapo_rl.models.rotary import rotate_pairs
from dapo_rl.models.spec import read_spec
from dapo_rl.models.tiny import build_char_tokenizer, build_tiny_llama
from dapo_rl.rollout import SamplingParams
from dapo_rl.rollout.decoder_engine import DecoderEngine

HAS_COMPILER = bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))  # as native.native_kernels looks
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def kernels():
    if not HAS_COMPILER:
        pytest.skip("no C compiler on this machine")
    built = native.native_kernels()
    assert built is not None, "a C compiler is present, so the kernels must build"
    return built


def test_rms_norm_equals_torch(kernels):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 96, generator=gen) * 3
    weight = torch.randn(96, generator=gen)
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-5), F.rms_norm(x, (96,), weight, 1e-5), rtol=1e-6, atol=1e-6)
    # Rows of a wider tensor (row stride ≠ n) are read in place.
    wide = torch.randn(5, 200, generator=gen)
    torch.testing.assert_close(kernels.rms_norm(wide[:, :96], weight, 1e-6), F.rms_norm(wide[:, :96], (96,), weight, 1e-6),
                               rtol=1e-6, atol=1e-6)



@pytest.mark.parametrize("name", ["silu", "gelu_tanh"])
def test_gated_activation_and_its_gradient_equal_torch(kernels, name):
    gen = torch.Generator().manual_seed(3)
    act = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[name]
    # Rows of a wider tensor (row stride 2n + 5), values from 0 to ±150 (both tails of exp).
    wide = torch.randn(33, 2 * 50 + 5, generator=gen) * torch.logspace(-3, 2, 105)
    wide[0, :4] = torch.tensor([150.0, -150.0, 0.0, -0.0])
    gate_up = wide[:, :100].clone().requires_grad_()
    grad = torch.randn(33, 50, generator=gen)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = act(gate) * up
    (expected_grad,) = torch.autograd.grad(expected, gate_up, grad)
    scale = expected.abs().max().item()
    torch.testing.assert_close(kernels.gated(wide[:, :50], wide[:, 50:100], name), expected.detach(), rtol=1e-5, atol=1e-6 * scale)
    got_grad = torch.cat(kernels.gated_backward(grad, wide[:, :50], wide[:, 50:100], name), dim=-1)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-6 * expected_grad.abs().max().item())
    # The differentiable wrapper the trainer's flat forward calls takes the kernels, same numbers.
    from dapo_rl.models.layer_ops import gated

    out = gated(SimpleNamespace(activation=name), *gate_up.chunk(2, dim=-1))  # (a ModelSpec's .activation)
    assert out.grad_fn is not None and "Gated" in type(out.grad_fn).__name__
    (wrapped_grad,) = torch.autograd.grad(out, gate_up, grad)
    torch.testing.assert_close(wrapped_grad, got_grad, rtol=0, atol=0)


def test_gated_activation_propagates_nan(kernels):
    gate_up = torch.tensor([[float("nan"), 1.0, 2.0, 3.0]])
    out = kernels.gated(gate_up[:, :2], gate_up[:, 2:], "silu")
    assert torch.isnan(out[0, 0]) and torch.isfinite(out[0, 1])

def _qkv_and_cache(rows, heads, kv_heads, d, capacity, gen, extra_rows=2):
    qkv = torch.randn(rows, heads + 2 * kv_heads, d, generator=gen)
    cache = torch.randn(rows + extra_rows, 2 * kv_heads, capacity, d, generator=gen)  # more rows than in use
    angles = torch.rand(rows, 1, d // 2, generator=gen) * 6.28
    return qkv, cache, torch.polar(torch.ones_like(angles), angles)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_rotary_append_rotates_queries_and_keys_and_writes_the_cache(kernels, heads, kv_heads):
    gen = torch.Generator().manual_seed(1)
    rows, d, capacity, pos = 3, 8, 10, 6
    qkv, cache, rotation = _qkv_and_cache(rows, heads, kv_heads, d, capacity, gen)
    expected_qkv = qkv.clone()
    qk = expected_qkv[:, : heads + kv_heads]
    qk.copy_(rotate_pairs(qk, rotation))
    expected_cache = cache.clone()
    expected_cache[:rows, :, pos] = expected_qkv[:, heads:]
    kernels.rotary_append(qkv, rotation, cache, heads, pos)
    torch.testing.assert_close(qkv, expected_qkv, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache, expected_cache, rtol=0, atol=1e-6)  # other positions and rows untouched


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("length,masked", [(1, False), (9, False), (9, True), (300, True)])
def test_decode_attention_equals_sdpa(kernels, heads, kv_heads, length, masked):
    gen = torch.Generator().manual_seed(2)
    rows, d = 5, 16
    capacity = length + 3
    qkv, cache, _ = _qkv_and_cache(rows, heads, kv_heads, d, capacity, gen)
    mask = None
    if masked:  # left padding: row r masks its first r positions (never the last one)
        mask = torch.zeros(rows + 2, capacity)
        for r in range(rows):
            mask[r, : min(r, length - 1)] = float("-inf")
    scale = d ** -0.5
    got = kernels.attention(qkv, cache, mask, heads, length, scale)
    q = qkv[:, :heads, None]
    keys, values = cache[:rows, :kv_heads, :length], cache[:rows, kv_heads:, :length]
    attn_mask = None if mask is None else mask[:rows, None, None, :length]
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, scale=scale, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(got, expected.reshape(rows, heads * d), rtol=1e-5, atol=1e-6)


def test_rotary_append_with_per_head_norms_and_partial_rotary(kernels):
    # Qwen3/Gemma3: RMSNorm of each query and key head before rotary; Phi-3: only the first r dims turn.
    gen = torch.Generator().manual_seed(5)
    rows, heads, kv_heads, d, r, capacity, pos = 3, 4, 2, 16, 8, 6, 2
    qkv, cache, _ = _qkv_and_cache(rows, heads, kv_heads, d, capacity, gen)
    angles = torch.rand(rows, 1, r // 2, generator=gen) * 6.28
    rotation = torch.polar(torch.ones_like(angles), angles)
    q_norm, k_norm = (torch.randn(d, generator=gen), 1e-6), (torch.randn(d, generator=gen), 1e-6)
    expected = qkv.clone()
    expected[:, :heads] = F.rms_norm(expected[:, :heads], (d,), *q_norm)
    expected[:, heads : heads + kv_heads] = F.rms_norm(expected[:, heads : heads + kv_heads], (d,), *k_norm)
    expected[:, : heads + kv_heads, :r] = rotate_pairs(expected[:, : heads + kv_heads, :r], rotation)
    expected_cache = cache.clone()
    expected_cache[:rows, :, pos] = expected[:, heads:]
    kernels.rotary_append(qkv, rotation, cache, heads, pos, q_norm, k_norm)
    torch.testing.assert_close(qkv, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, expected_cache, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("first,softcap", [(0, 2.0), (4, None), (4, 1.5)])
def test_decode_attention_over_a_window_with_soft_capping(kernels, first, softcap):
    # Sliding-window layers read positions first … length−1; Gemma2 caps scores at softcap·tanh(s / softcap).
    gen = torch.Generator().manual_seed(6)
    rows, heads, kv_heads, d, length = 4, 4, 2, 16, 11
    qkv, cache, _ = _qkv_and_cache(rows, heads, kv_heads, d, length + 2, gen)
    mask = torch.zeros(rows, length + 2)
    mask[1, :6] = float("-inf")  # left padding reaching into the window
    scale = 0.3
    got = kernels.attention(qkv, cache, mask, heads, length, scale, first, softcap)
    q = qkv[:, :heads].reshape(rows, kv_heads, heads // kv_heads, d)
    keys, values = cache[:rows, :kv_heads, first:length], cache[:rows, kv_heads:, first:length]
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + mask[:rows, None, None, first:length]
    expected = torch.matmul(scores.softmax(-1), values).reshape(rows, heads * d)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_char_tokenizer(VOCAB)
    return build_tiny_llama(tokenizer, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, seed=7).eval(), tokenizer


def test_decoder_uses_the_kernels_only_where_they_apply(kernels, tiny):
    model, _ = tiny
    assert SpecDecoder(model, read_spec(model)).kernels is kernels
    assert SpecDecoder(model, read_spec(model), native_kernels=False).kernels is None
    try:
        assert SpecDecoder(model.double(), read_spec(model)).kernels is None  # float32 loops only
    finally:
        model.float()  # the module-scoped model stays float32 for the other tests


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_with_kernels_equals_generation_with_torch_ops(kernels, tiny, temperature):
    model, tok = tiny
    prompts = [tok(text)["input_ids"] for text in ("12=", "3456..=", "7=", "98765432=")]  # padded: masked attention
    params = SamplingParams(temperature=temperature, max_new_tokens=20)
    runs = []
    for use in (True, False):
        torch.manual_seed(3)
        runs.append(DecoderEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                      native_kernels=use).generate(prompts, 4, params))
    assert [[s.response_ids for s in g] for g in runs[0]] == [[s.response_ids for s in g] for g in runs[1]]
    for a, b in zip(*runs):
        for sa, sb in zip(a, b):
            torch.testing.assert_close(torch.tensor(sa.logprobs), torch.tensor(sb.logprobs), atol=1e-5, rtol=0)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """native_kernels() as on a machine that has never built them (empty cache folder)."""
    monkeypatch.setenv("DAPO_RL_CACHE", str(tmp_path))
    native.native_kernels.cache_clear()
    yield tmp_path
    native.native_kernels.cache_clear()


@needs_compiler
def test_kernels_are_built_once_into_the_cache_folder(fresh_build):
    assert native.native_kernels() is not None
    built = list((fresh_build / "kernels").glob("native_*.so"))
    assert len(built) == 1 and not list((fresh_build / "kernels").glob("*.tmp"))
    stamp = built[0].stat().st_mtime_ns
    native.native_kernels.cache_clear()
    assert native.native_kernels() is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_without_a_working_compiler_decoding_falls_back_to_torch_ops(fresh_build, monkeypatch, tiny, caplog):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level("INFO", logger="dapo_rl.models.native"):
        assert native.native_kernels() is None
    assert "decoding and the MLP activation with PyTorch ops" in caplog.text
    assert not list(fresh_build.rglob("*.so")) and not list(fresh_build.rglob("*.tmp"))  # nothing half-written
    model, tok = tiny
    assert SpecDecoder(model, read_spec(model)).kernels is None
    out = DecoderEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id).generate(
        [tok("12=")["input_ids"]], 2, SamplingParams(temperature=0.0, max_new_tokens=5))
    assert len(out[0][0].response_ids) > 0


def test_kernels_can_be_turned_off(fresh_build, monkeypatch):
    monkeypatch.setenv("DAPO_RL_NATIVE_KERNELS", "0")
    assert native.native_kernels() is None
    assert not (fresh_build / "kernels").exists()
