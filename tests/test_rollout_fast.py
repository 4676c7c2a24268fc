"""The fast rollout engine: same distribution as the reference, exact log-probs, stops, masking."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from dapo_rl.data.synthetic import VOCAB
from dapo_rl.models.decode import PLAIN_PRODUCTS_MAX_HIDDEN, Projection, SpecDecoder, can_pack, packs_by_default
from dapo_rl.models.spec import read_spec
from dapo_rl.models.tiny import build_char_tokenizer, build_tiny_llama
from dapo_rl.rollout import HFGenerateEngine, SamplingParams
from dapo_rl.rollout.decoder_engine import DecoderEngine, draw, filter_logits, ladder_rows, sample_tokens


def _decoder(model, **options) -> SpecDecoder:
    return SpecDecoder(model, read_spec(model), **options)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_char_tokenizer(VOCAB)
    model = build_tiny_llama(tokenizer, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, seed=5)
    return model.eval(), tokenizer


def _prompts(tok):
    # Different lengths, so left padding and per-row positions are exercised.
    return [tok(text)["input_ids"] for text in ("12=", "3456..=", "7=", "98765432=")]


def _full_forward_logprobs(model, prompt, response, temperature):
    """log softmax(logits / T) of each response token, from one unpadded forward of prompt + response."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


# Finished rows dropped through the row ladder, at once, in bulk, never; decode steps on the
# weights directly or through HF modules.
@pytest.mark.parametrize("compact,direct", [(None, True), (0.0, True), (0.5, True), (1.1, True), (0.5, False)])
def test_sampler_logprobs_match_a_full_forward_pass(tiny, compact, direct):
    model, tok = tiny
    engine = DecoderEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                               compact_min_fraction=compact or 0.0, row_ladder=compact is None, direct_decode=direct)
    torch.manual_seed(0)
    params = SamplingParams(temperature=0.7, max_new_tokens=12)
    groups = engine.generate(_prompts(tok), 6, params)
    reasons = {s.finish_reason for g in groups for s in g}
    assert reasons == {"stop", "length"}  # both kinds occur, so rows really left the batch
    for prompt, group in zip(_prompts(tok), groups):
        for sample in group:
            assert sample.prompt_ids == prompt
            assert len(sample.logprobs) == len(sample.response_ids)
            expected = _full_forward_logprobs(model, prompt, sample.response_ids, params.temperature)
            torch.testing.assert_close(torch.tensor(sample.logprobs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("direct", [True, False])
def test_greedy_output_equals_hf_generate(tiny, direct):
    model, tok = tiny
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
    fast = DecoderEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             direct_decode=direct).generate(_prompts(tok), 2, greedy)
    # (HF generate refuses greedy with num_return_sequences > 1, so its reference is n = 1.)
    ref = HFGenerateEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id).generate(_prompts(tok), 1, greedy)
    assert [[(s.response_ids, s.finish_reason) for s in g] for g in fast] == [[(g[0].response_ids, g[0].finish_reason)] * 2 for g in ref]


def test_stops_at_eos_and_stop_ids_with_finish_reasons(tiny):
    model, tok = tiny
    stop = tok.convert_tokens_to_ids("5")
    engine = DecoderEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(1)
    groups = engine.generate(_prompts(tok), 8, SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)))
    stops = {tok.eos_token_id, stop}
    ended_on = set()
    for group in groups:
        for sample in group:
            assert all(t not in stops for t in sample.response_ids[:-1])
            if sample.finish_reason == "stop":
                assert sample.response_ids[-1] in stops
                ended_on.add(sample.response_ids[-1])
            else:
                assert sample.finish_reason == "length" and sample.truncated
                assert len(sample.response_ids) == 10 and sample.response_ids[-1] not in stops
    assert ended_on == stops


def test_same_seed_same_samples(tiny):
    model, tok = tiny
    engine = DecoderEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    params = SamplingParams(max_new_tokens=8, top_k=5)
    torch.manual_seed(7)
    a = engine.generate(_prompts(tok), 3, params)
    torch.manual_seed(7)
    b = engine.generate(_prompts(tok), 3, params)
    assert [[s.response_ids for s in g] for g in a] == [[s.response_ids for s in g] for g in b]


def test_filter_logits_on_a_hand_made_example():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0]])
    ninf = float("-inf")
    # top-k keeps every token tied with the k-th largest.
    assert filter_logits(logits, top_k=1).tolist() == [[ninf, 3.0, ninf, 3.0, ninf]]
    assert filter_logits(logits, top_k=3).tolist() == [[ninf, 3.0, 2.0, 3.0, ninf]]
    # probabilities 0.1, 0.2, 0.3, 0.4: top-p 0.5 needs {0.4, 0.3}; 0.7 exactly is reached by the same two;
    # 0.71 needs a third; a tiny p keeps the single most likely token.
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    kept = lambda p: torch.isfinite(filter_logits(probs.log(), top_p=p)).squeeze(0).tolist()
    assert kept(0.5) == [False, False, True, True]
    assert kept(0.71) == [False, True, True, True]
    assert kept(0.01) == [False, False, False, True]
    assert kept(1.0) == [True, True, True, True]
    # top-k is applied before top-p: top-2 renormalises {0.3, 0.4} to {3/7, 4/7}, and 4/7 alone reaches 0.5
    # (top-p first would keep {0.3, 0.4}).
    assert torch.isfinite(filter_logits(probs.log(), top_k=2, top_p=0.5)).squeeze(0).tolist() == [False, False, False, True]


def test_filter_logits_agrees_with_transformers_warpers():
    torch.manual_seed(3)
    logits = torch.randn(32, 50) * 3
    for k, p in [(0, 0.9), (5, 1.0), (10, 0.6), (0, 0.3)]:
        ref = logits.clone()
        if k:
            ref = TopKLogitsWarper(top_k=k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(top_p=p)(None, ref)
        assert torch.equal(torch.isfinite(filter_logits(logits, k, p)), torch.isfinite(ref))


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.8)])
def test_sampling_frequencies_match_the_filtered_softmax(top_k, top_p):
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0, 1.5, -0.5]]).expand(20000, -1)
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p)
    torch.manual_seed(11)
    tokens, logprobs = sample_tokens(logits, params)
    expected = torch.softmax(filter_logits(logits[:1] / 0.8, top_k, top_p), dim=-1).squeeze(0)
    observed = torch.bincount(tokens, minlength=6).double() / tokens.numel()
    # 5 standard errors of a binomial proportion: a wrong distribution fails, chance does not.
    tolerance = 5 * torch.sqrt(expected.double() * (1 - expected.double()) / tokens.numel()) + 1e-12
    assert torch.all((observed - expected.double()).abs() <= tolerance), (observed, expected)
    assert observed[expected == 0].sum() == 0  # masked tokens are never drawn
    # Reported log-probs are the unfiltered tempered ones.
    torch.testing.assert_close(logprobs, torch.log_softmax(logits / 0.8, -1).gather(-1, tokens[:, None]).squeeze(-1))


def test_draw_has_multinomials_distribution_and_never_draws_a_zero(monkeypatch):
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3, 0.0], [0.0, 3.0, 0.0, 0.0, 1.0]])  # the second row unnormalised
    torch.manual_seed(0)
    tokens = draw(probs.repeat(20000, 1)).view(20000, 2)
    for row in range(2):
        expected = (probs[row] / probs[row].sum()).double()
        observed = torch.bincount(tokens[:, row], minlength=5).double() / 20000
        assert torch.all((observed - expected).abs() <= 5 * torch.sqrt(expected * (1 - expected) / 20000) + 1e-12)
        assert observed[expected == 0].sum() == 0
    # The ends of the uniform's range: the first and the last token of positive probability.
    for u, expected in ((0.0, [0, 1]), (1 - 2**-53, [3, 4])):
        monkeypatch.setattr(torch, "rand", lambda shape, u=u, **kw: torch.full(shape, u, **kw))
        assert draw(probs).tolist() == expected
    # Float64 sums: one likely token at the end of a 150k vocabulary of tiny ones.
    tail = torch.full((1, 150_000), 1e-9)
    tail[0, -1] = 1.0
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.full(shape, 0.5, **kw))
    assert draw(tail).item() == 149_999


def test_greedy_sample_tokens_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    tokens, logprobs = sample_tokens(logits, SamplingParams(temperature=0.0))
    assert tokens.tolist() == [1, 0]
    assert math.isclose(logprobs[0].item(), torch.log_softmax(logits[0], -1)[1].item(), abs_tol=1e-6)


@pytest.mark.parametrize("compact", [None, 0.0, 0.3])
def test_direct_decode_with_grouped_query_attention_and_equal_length_prompts(tiny, gqa_llama, compact):
    # Equal-length prompts take the mask-free path; GQA takes enable_gqa; both must stay exact.
    _, tok = tiny
    model = gqa_llama(tok)
    prompts = [tok(text)["input_ids"] for text in ("12=", "34=", "56=")]
    assert len({len(p) for p in prompts}) == 1
    engine = DecoderEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                               compact_min_fraction=compact or 0.0, row_ladder=compact is None)
    torch.manual_seed(2)
    groups = engine.generate(prompts, 5, SamplingParams(temperature=1.3, max_new_tokens=10))
    assert {s.finish_reason for g in groups for s in g} == {"stop", "length"}
    for prompt, group in zip(prompts, groups):
        for sample in group:
            expected = _full_forward_logprobs(model, prompt, sample.response_ids, 1.3)
            torch.testing.assert_close(torch.tensor(sample.logprobs), expected, atol=1e-5, rtol=0)


def _assert_same_samples(first, second) -> None:
    """Two engines' ``generate`` results: the same tokens, log-probs within 1e-5."""
    assert [[s.response_ids for s in g] for g in first] == [[s.response_ids for s in g] for g in second]
    for a, b in zip(first, second):
        for sa, sb in zip(a, b):
            torch.testing.assert_close(torch.tensor(sa.logprobs), torch.tensor(sb.logprobs), atol=1e-5, rtol=0)


def test_direct_and_module_decoding_agree_greedily_on_a_gqa_model(tiny, gqa_llama):
    _, tok = tiny
    model = gqa_llama(tok, seed=4)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=14)
    runs = [DecoderEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                              direct_decode=direct).generate(_prompts(tok), 2, greedy) for direct in (True, False)]
    _assert_same_samples(*runs)


def test_packed_weight_products_match_plain_float32_products(tiny):
    # On a CPU the direct decode runs its products on oneDNN with pre-packed weights; the plain
    # path (torch's own float32 products) must give the same greedy tokens and log-probs.
    model, tok = tiny
    assert _decoder(model, pack_weights=True).packed and not _decoder(model, pack_weights=False).packed
    assert not _decoder(model.double(), pack_weights=True).packed  # oneDNN has no float64 products
    model.float()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=14)
    runs = [DecoderEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                              pack_weights=pack).generate(_prompts(tok), 3, greedy) for pack in (True, False)]
    _assert_same_samples(*runs)


def test_products_are_packed_by_default_except_small_models_on_intel(tiny, monkeypatch):
    # A function of the model and the machine, never of a timing: the same run picks the same products.
    import dapo_rl.models.decode as decode

    cpu = torch.device("cpu")
    for vendor, small_packed in (("GenuineIntel", False), ("AuthenticAMD", True), ("", True)):
        monkeypatch.setattr(decode, "cpu_vendor", lambda vendor=vendor: vendor)
        assert packs_by_default(PLAIN_PRODUCTS_MAX_HIDDEN, cpu) is (small_packed and can_pack(torch.ones(1)))
        assert packs_by_default(PLAIN_PRODUCTS_MAX_HIDDEN + 1, cpu) is can_pack(torch.ones(1))
        assert packs_by_default(4096, torch.device("meta")) is False  # not a CPU
        model, _ = tiny
        assert _decoder(model).packed is (small_packed and can_pack(torch.ones(1)))  # hidden 64


def test_cpu_info_reads_one_field_of_proc_cpuinfo(tmp_path, monkeypatch):
    import builtins

    import dapo_rl.models.decode as decode

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu avx2\n\n"
                    "processor\t: 1\nvendor_id\t: GenuineIntel\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path, *a, **k))
    decode.cpu_info.cache_clear()
    try:
        assert decode.cpu_vendor() == "GenuineIntel" and decode.cpu_info("model name") == "Some CPU @ 2.0GHz"
        assert decode.cpu_info("flags") == "fpu avx2" and decode.cpu_info("no such key") == ""
    finally:
        decode.cpu_info.cache_clear()


def test_ladder_rows_is_the_smallest_ladder_value_that_fits():
    assert [ladder_rows(n) for n in (1, 7, 8, 9, 10, 11, 16, 17, 21, 33, 64, 65, 100, 257)] == \
        [1, 7, 8, 10, 10, 12, 16, 20, 24, 40, 64, 80, 112, 320]
    values = {ladder_rows(n) for n in range(1, 1025)}
    assert len({v for v in values if v <= 64}) == 20
    for n in range(1, 1025):  # fits, at most a quarter of the rows dead, and a fixed point
        assert n <= ladder_rows(n) <= max(n, 1.25 * n) and ladder_rows(ladder_rows(n)) == ladder_rows(n)


def test_decode_batch_shrinks_through_ladder_row_counts_only(tiny, monkeypatch):
    # The products see only ladder row counts (plus the starting count), whatever the draws.
    model, tok = tiny
    seen = set()
    product = Projection.__call__

    def recording(self, x, *args, **kwargs):
        seen.add(x.shape[0])
        return product(self, x, *args, **kwargs)

    monkeypatch.setattr(Projection, "__call__", recording)
    engine = DecoderEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(3)
    groups = engine.generate(_prompts(tok), 15, SamplingParams(temperature=1.2, max_new_tokens=24))
    lengths = sorted(len(s.response_ids) for g in groups for s in g)
    assert len(set(lengths)) > 8 and lengths[0] < lengths[-1]  # rows finished at many different steps
    assert seen - {60} <= {ladder_rows(n) for n in range(1, 61)} and len(seen) > 4


@pytest.fixture
def built_decoders(monkeypatch):
    """Weak references to every :class:`SpecDecoder` the fast engine builds in the test, in order."""
    import weakref

    import dapo_rl.rollout.decoder_engine as fast

    built = []

    class Recorded(SpecDecoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(weakref.ref(self))

    monkeypatch.setattr(fast, "SpecDecoder", Recorded)
    return built


def test_a_kept_decoder_is_reused_only_while_the_weights_are_unchanged(tiny, built_decoders):
    model, tok = tiny
    model = copy.deepcopy(model)
    built = built_decoders
    engine = DecoderEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, keep_decoder=True)
    params = SamplingParams(temperature=1.0, max_new_tokens=10)

    def sample_and_check():
        torch.manual_seed(0)
        for prompt, group in zip(_prompts(tok), engine.generate(_prompts(tok), 2, params)):
            for sample in group:
                expected = _full_forward_logprobs(model, prompt, sample.response_ids, 1.0)
                torch.testing.assert_close(torch.tensor(sample.logprobs), expected, atol=1e-5, rtol=0)

    sample_and_check()
    sample_and_check()
    assert len(built) == 1 and built[0]().kv is None  # reused (kept alive by the engine); no call's key/value buffer kept

    def optimizer_step(fused: bool):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused, foreach=None if fused else True)
        model(input_ids=torch.tensor([_prompts(tok)[1]])).logits.sum().backward()
        optimizer.step()
        model.zero_grad()

    optimizer_step(fused=False)  # in place, through ops that move every parameter's version
    sample_and_check()
    model.load_state_dict({k: v + 0.01 for k, v in model.state_dict().items()})
    sample_and_check()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)  # one matrix changed in place
    sample_and_check()
    assert len(built) == 4
    optimizer_step(fused=True)  # the fused kernel moves no version: the push says the weights changed
    engine.sync_weights(model)
    sample_and_check()
    engine.release_memory()
    sample_and_check()
    assert len(built) == 6
    plain = DecoderEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # the default keeps nothing
    plain.generate(_prompts(tok), 2, params)
    plain.generate(_prompts(tok), 2, params)
    assert len(built) == 8


def test_in_training_the_decoder_is_built_once_per_step_and_never_held_through_an_update(tiny, trainer_factory, scored_groups,
                                                                                          built_decoders, monkeypatch):
    # Per step: the weight-sync probe after the push builds it, the next step's sampling rounds
    # reuse it, the update releases it (no copy of the weights alive during forward/backward).
    import dapo_rl.training.trainer as trainer_module

    model, tok = tiny
    built = built_decoders
    alive_in_update = []
    forward = trainer_module.logprobs

    def watched(*args, **kwargs):
        if torch.is_grad_enabled():
            alive_in_update.append(sum(ref() is not None for ref in built))
        return forward(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "logprobs", watched)
    trainer = trainer_factory(model, tok, ["dynamic_sampling.enabled=true", "dynamic_sampling.max_rounds=3",
                                           "dynamic_sampling.on_exhausted=train", "rollout.max_response_length=8"], engine="fast")
    rounds = 0
    for _ in range(3):
        rounds += trainer.train_step()["train/generation_rounds"]
    assert rounds > 3 and len(built) == 4  # probe before step 1, then one probe per push; rounds reuse it
    assert built[-1]() is not None  # the last probe's decoder, kept for the next step's sampling
    trainer.update(scored_groups(tok, 4, 4, seed=5))
    assert alive_in_update and set(alive_in_update) == {0}


@pytest.mark.parametrize("sharded", [False, True])
def test_under_fsdp2_the_kept_decoder_goes_with_the_gathered_parameters(tiny, trainer_factory, built_decoders, sharded):
    # FSDP2 frees the gathered storage at reshard, and a kept decoder reads it: released together.
    from dapo_rl.training.distributed import DistContext

    model, tok = tiny
    built = built_decoders
    trainer = trainer_factory(model, tok, [], engine="fast")
    if sharded:  # a one-process model has no FSDP2 units to gather: only the release rule is exercised
        trainer.dist = DistContext(world_size=2, strategy="fsdp2")
    for _ in range(2):
        with trainer.full_parameters():
            trainer.engine.generate(_prompts(tok), 2, SamplingParams(temperature=1.0, max_new_tokens=6))
    assert len(built) == (2 if sharded else 1)


def test_rotary_table_equals_the_models_rotary_module(tiny):
    # float32/float64: e^{iθ} per pair (i, i + d/2); other dtypes: (cos, sin with its first half negated).
    model, _ = tiny
    positions = torch.tensor([0, 3, 17, 5])
    half = model.model.layers[0].self_attn.head_dim // 2
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        decoder = _decoder(model)
        assert decoder.complex_rotary == (dtype == torch.float32)
        with torch.no_grad():
            (from_table,) = decoder.rotary_at(decoder.rotary_tables(20, "cpu"), positions)  # one rotary kind
            cos, sin = model.model.rotary_emb(model.model.embed_tokens.weight[:1][None], positions[:, None])
        for got in (from_table,):
            if decoder.complex_rotary:
                assert got.shape == (4, 1, half) and got.is_complex()
                assert torch.equal(got.real, cos[..., :half]) and torch.equal(got.imag, sin[..., :half])
                assert torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:])
            else:
                signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
                assert torch.equal(got[:, 0:1], cos) and torch.equal(got[:, 1:2], signed_sin)
    model.float()


def test_interleaved_rotary_is_the_half_split_rotation_permuted():
    # The complex product on pairs (x_i, y_i) rotates exactly as Hugging Face's rotate_half form
    # on (x_0 … x_{d/2-1}, y_0 … y_{d/2-1}), and permuting queries and keys alike keeps q·k.
    from transformers.models.llama.modeling_llama import rotate_half

    from dapo_rl.models.rotary import interleaved_pairs, rotate_pairs

    d = 8
    order = interleaved_pairs(d)
    assert order.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, d, generator=gen, dtype=torch.float64), torch.randn(3, d, generator=gen, dtype=torch.float64)
    theta = torch.rand(3, d // 2, generator=gen, dtype=torch.float64) * 6
    cos, sin = torch.cat([theta.cos()] * 2, -1), torch.cat([theta.sin()] * 2, -1)
    hf_q, hf_k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    turn = torch.polar(torch.ones_like(theta), theta)
    ours_q, ours_k = rotate_pairs(q[:, order], turn), rotate_pairs(k[:, order], turn)
    torch.testing.assert_close(ours_q, hf_q[:, order], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((ours_q * ours_k).sum(-1), (hf_q * hf_k).sum(-1), rtol=1e-12, atol=1e-12)


def test_finished_rows_are_dropped_by_moving_only_survivors(tiny):
    model, _ = tiny
    decoder = _decoder(model)
    # Buffer [layers, rows, 2·kv_heads, capacity, d]: row r holds the value r everywhere.
    decoder.kv = torch.arange(6.0).view(1, 6, 1, 1, 1).expand(len(decoder.layers), 6, 2, 3, 1).clone()
    decoder.rows, decoder.length, decoder.mask = 6, 2, None
    ids = torch.arange(6) * 10
    (kept,) = decoder.drop_rows(torch.tensor([1, 2, 5]), [ids])
    # Rows 0, 3, 4 survive: 0 stays, 4 fills hole 1, 3 fills hole 2 (the only rows that move).
    assert decoder.rows == 3 and sorted(kept.tolist()) == [0, 30, 40]
    for layer in range(len(decoder.layers)):
        assert decoder.kv[layer, :3, :, :2, 0].tolist() == [[[k / 10] * 2] * 2 for k in kept.tolist()]
    # Nothing past the filled length is touched.
    assert decoder.kv[0, :3, 0, 2, 0].tolist() == [0.0, 1.0, 2.0]


def test_direct_decode_runs_a_bfloat16_model_and_samples_from_float_logits(tiny):
    # (GPU runs use bf16 weights; the sampler must still see float32 logits.)
    _, tok = tiny
    model = build_tiny_llama(tok, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, seed=5)
    model = model.to(torch.bfloat16).eval()
    engine = DecoderEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    groups = engine.generate(_prompts(tok), 3, SamplingParams(temperature=1.0, max_new_tokens=8))
    for prompt, group in zip(_prompts(tok), groups):
        for sample in group:
            assert len(sample.logprobs) == len(sample.response_ids) and all(math.isfinite(x) and x <= 0 for x in sample.logprobs)
            expected = _full_forward_logprobs(model, prompt, sample.response_ids, 1.0)
            torch.testing.assert_close(torch.tensor(sample.logprobs), expected, atol=0.1, rtol=0)


def test_an_engine_added_by_import_path_trains_and_evaluates(tmp_path, quickstart_cache, monkeypatch):
    """Adding an engine is one module: ``rollout.engine=tests.toy:Engine`` trains two steps and
    ``dapo eval engine=tests.toy:Engine`` evaluates with it, through the same registry."""
    import json
    from pathlib import Path

    from dapo_rl.cli import main
    from dapo_rl.rollout import ROLLOUT_ENGINES

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # `tests.toy` importable
    toy = ROLLOUT_ENGINES.get("tests.toy:Engine")
    before = toy.calls
    out = tmp_path / "run"
    assert main(["train", f"output_dir={out}", f"quickstart.cache_dir={quickstart_cache}", "steps=2", "prompts_per_step=4",
                 "mini_batch_size=4", "group_size=4", "data.eval=null", "logging.progress=false",
                 "rollout.engine=tests.toy:Engine"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and toy.calls > before
    assert rows[0]["rollout/logp_abs_diff"] < 1e-4  # its log-probs are the trainer's (same model, full forward)
    calls = toy.calls
    result = tmp_path / "eval.json"
    assert main(["eval", str(out / "final"), "builtin:chain", "engine=tests.toy:Engine", "k=2", "max_rows=4", "greedy=false",
                 "max_response_length=16", "progress=false", f"output={result}"]) == 0
    assert toy.calls > calls and json.loads(result.read_text())["num_problems"] == 4
    assert main(["train", f"output_dir={tmp_path / 'bad'}", "rollout.engine=tests.toy:NoSuchEngine"]) == 2
