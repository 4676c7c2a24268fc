"""The training system: rollout engine, trainer update laws, and end-to-end learning."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dapo_rl.algorithm import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, aggregate_loss, is_batch_coupled
from dapo_rl.config import load_config
from dapo_rl.data.synthetic import VOCAB
from dapo_rl.models.tiny import build_char_tokenizer, build_tiny_llama
from dapo_rl.rollout import HFGenerateEngine, Sample, SamplingParams
from dapo_rl.training.batching import pack
from dapo_rl.training.logprobs import ForwardSettings, distinct_prompts, forward_path, logprobs
from dapo_rl.training.run import run_training

# ----------------------------------------------------------------------------- rollout engine


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_char_tokenizer(VOCAB)
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=3)
    return model.eval(), tokenizer


def test_hf_engine_groups_lengths_and_finish_reasons(tiny):
    model, tok = tiny
    engine = HFGenerateEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    prompts = [tok("12=")["input_ids"], tok("3456..=")["input_ids"]]
    torch.manual_seed(0)
    groups = engine.generate(prompts, 5, SamplingParams(max_new_tokens=6))
    assert [len(g) for g in groups] == [5, 5]
    for prompt, group in zip(prompts, groups):
        for sample in group:
            assert sample.prompt_ids == prompt
            assert 1 <= len(sample.response_ids) <= 6
            if sample.finish_reason == "stop":
                assert sample.response_ids[-1] == tok.eos_token_id
                assert tok.eos_token_id not in sample.response_ids[:-1]
            else:
                assert len(sample.response_ids) == 6 and tok.eos_token_id not in sample.response_ids


def test_hf_engine_left_padding_does_not_change_greedy_output(tiny):
    model, tok = tiny
    engine = HFGenerateEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    short, long = tok("7=")["input_ids"], tok("123456=")["input_ids"]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    alone = engine.generate([short], 1, greedy)[0][0].response_ids
    batched = engine.generate([long, short], 1, greedy)[1][0].response_ids
    assert alone == batched


def test_stop_token_ids_end_a_response(tiny):
    model, tok = tiny
    engine = HFGenerateEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    digits = tuple(tok.convert_tokens_to_ids(list("0123456789")))
    torch.manual_seed(1)
    for sample in engine.generate([tok("5=")["input_ids"]], 8, SamplingParams(max_new_tokens=10, stop_token_ids=digits))[0]:
        if sample.finish_reason == "stop":
            assert sample.response_ids[-1] in set(digits) | {tok.eos_token_id}
            assert not set(sample.response_ids[:-1]) & (set(digits) | {tok.eos_token_id})


def test_pack_aligns_responses_and_positions():
    samples = [Sample([1, 5, 6], [7, 2], "stop"), Sample([1], [8, 9, 10], "length")]
    packed = pack(samples, pad_id=0, device=torch.device("cpu"))
    assert packed.input_ids.tolist() == [[1, 5, 6, 7, 2, 0], [0, 0, 1, 8, 9, 10]]
    assert packed.response_ids.tolist() == [[7, 2, 0], [8, 9, 10]]
    assert packed.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]


# ----------------------------------------------------------------------------- trainer update laws


def _params_after_update(model, tok, trainer_factory, scored_groups, overrides: list[str]) -> torch.Tensor:
    trainer = trainer_factory(model.double(), tok, overrides)
    trainer.update(scored_groups(tok, 4, 4, seed=5))
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def _policy(tiny, adapters, lora: bool):
    """The tiny model, or (``lora``) a copy with LoRA adapters whose B is not zero."""
    model, tok = tiny
    return (adapters(model.double()) if lora else model), tok


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("loss", POLICY_LOSSES.names())
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_update_is_invariant_to_micro_batch_size(tiny, adapters, trainer_factory, scored_groups, mode, loss, lora):
    if is_batch_coupled(POLICY_LOSSES.get(loss)):
        pytest.skip(f"{loss} chooses tokens within each micro-batch, as verl does (tests/test_algorithm.py)")
    model, tok = _policy(tiny, adapters, lora)
    base = [f"loss.agg_mode={mode}", f"loss.policy_loss={loss}", "optim.lr=1e-3", "ppo_epochs=2"]
    whole = _params_after_update(model, tok, trainer_factory, scored_groups, [*base, "micro_batch_size=16"])
    for micro in (1, 2, 8):
        split = _params_after_update(model, tok, trainer_factory, scored_groups, [*base, f"micro_batch_size={micro}"])
        torch.testing.assert_close(split, whole, rtol=1e-9, atol=1e-10)


def test_clip_cov_draws_are_reproducible_and_seeded_per_update(tiny, trainer_factory, scored_groups):
    """Clip-Cov's random draws come from the trainer's per-update generator (seeded by the run's
    seed and the update's index): the same run gives bit-identical weights, another generator
    other draws, and the global torch stream is not touched by them."""
    model, tok = tiny
    busy = ["loss.policy_loss=clip_cov", "loss.clip_cov_ratio=0.2", "loss.clip_cov_lb=0.0001", "loss.clip_cov_ub=100",
            "ppo_epochs=3", "mini_batch_size=2", "micro_batch_size=8", "optim.lr=1e-2"]

    def run(generator_seed: int | None = None):
        trainer = trainer_factory(copy.deepcopy(model).double(), tok, busy)
        if generator_seed is not None:
            trainer._update_generator = lambda: torch.Generator().manual_seed(generator_seed)
        torch.manual_seed(123)
        metrics = trainer.update(scored_groups(tok, 4, 4, seed=5))
        return torch.cat([p.detach().flatten() for p in trainer.model.parameters()]), metrics, torch.rand(1)

    first, metrics, after = run()
    again, _, after_again = run()
    other, _, after_other = run(generator_seed=999)
    assert metrics["train/cov_clip_frac"] > 0
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(after, after_again) and torch.equal(after, after_other)


def _reference_gradient(model, tok, groups, overrides: list[str]) -> torch.Tensor:
    """The gradient of the paper's objective at π_θ = π_old on the whole mini-batch, from one plain
    Hugging Face forward of every sample: at ratio 1 no token is clipped, every loss is -A·log π."""
    config = load_config(overrides=["prompts_per_step=4", "group_size=4", "mini_batch_size=4", "micro_batch_size=16", *overrides])
    samples = [s for g in groups for s in g.samples]
    batch = pack(samples, tok.pad_token_id, torch.device("cpu"))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    p = batch.prompt_width
    logp = torch.log_softmax(logits[:, p - 1 : -1] / config.rollout.temperature, -1).gather(-1, batch.response_ids[..., None])[..., 0]
    advantages = ADVANTAGE_ESTIMATORS.get(config.advantage.estimator)(torch.tensor([g.scores for g in groups])).double()
    truncated = torch.tensor([s.truncated for s in samples])
    mask = batch.response_mask.double() * (~truncated if config.overlong.filter else torch.ones_like(truncated))[:, None]
    per_token = -advantages.reshape(-1, 1) * logp
    if config.loss.entropy_coef > 0:  # the entropy bonus, at the sampling temperature, of every sample
        log_probs = torch.log_softmax(logits[:, p - 1 : -1] / config.rollout.temperature, -1)
        per_token = per_token - config.loss.entropy_coef * -(log_probs.exp() * log_probs).sum(-1)
    loss = aggregate_loss(per_token, mask, config.loss.agg_mode, norm_constant=config.rollout.max_response_length)
    model.zero_grad()
    loss.backward()
    return torch.cat([q.grad.flatten() for q in model.parameters() if q.requires_grad])


@pytest.mark.parametrize("overrides", [[], ["overlong.filter=false"], ["loss.agg_mode=seq-mean-token-mean"], ["loss.kl_coef=0.1"],
                                       ["advantage.estimator=drgrpo"], ["loss.policy_loss=cispo"], ["loss.policy_loss=gspo"],
                                       ["loss.policy_loss=dapo_rl.algorithm.policy_loss:cispo_loss"],
                                       ["loss.policy_loss=geo_mean"], ["loss.policy_loss=sapo"], ["loss.policy_loss=dppo_kl"],
                                       ["loss.policy_loss=kl_cov"], ["loss.entropy_coef=0.05"],
                                       ["loss.entropy_coef=0.05", "loss.agg_mode=seq-mean-token-mean"]],
                         ids=lambda o: ",".join(o) or "default")
@pytest.mark.parametrize("share_prompts", [False, True])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_update_follows_the_reference_gradient(tiny, adapters, trainer_factory, scored_groups, overrides, share_prompts, lora):
    """One optimiser update equals AdamW's first step on the reference gradient of the whole
    mini-batch: ``Δθ = -lr·g / (|g| + eps)``. The trainer never runs the zero-advantage group nor
    (under overlong filtering) the truncated samples, yet counts their tokens in the normaliser:
    the reference runs everything, so skipping is proven to change nothing. With an entropy bonus
    the zero-advantage group has a gradient: the trainer runs it, and the reference adds
    ``-coef·H`` to every token's loss. With LoRA adapters
    (B ≠ 0) θ is the adapters alone, and the base stays bit-identical; the KL case is left out
    there, since its reference is the base without adapters, not the initial policy, so its
    gradient is not zero at the first step."""
    if lora and any(o.startswith("loss.kl_coef") for o in overrides):
        pytest.skip("the LoRA KL reference is the base (tested in test_lora.py)")
    model, tok = _policy(tiny, adapters, lora)
    model = copy.deepcopy(model).double()
    groups = scored_groups(tok, 4, 4, seed=5)
    trainer = trainer_factory(model, tok, [*overrides, "optim.eps=1.0"], share_prompts=share_prompts)
    trained = [q for q in trainer.model.parameters() if q.requires_grad]
    frozen = [q.detach().clone() for q in trainer.model.parameters() if not q.requires_grad]
    assert bool(frozen) == lora
    start = torch.cat([q.detach().flatten() for q in trained])
    trainer.update(groups)
    delta = torch.cat([q.detach().flatten() for q in trained]) - start
    assert all(torch.equal(a, b) for a, b in zip(frozen, [q for q in trainer.model.parameters() if not q.requires_grad]))
    g = _reference_gradient(model, tok, groups, overrides)
    assert g.abs().max() > 0
    # Hugging Face's RMSNorm rounds to float32 inside a float64 model: forwards of other shapes
    # (length groups, shared prompts) agree to ~1e-8 of the largest gradient, not to 1e-15.
    torch.testing.assert_close(delta, -1e-2 * g / (g.abs() + 1.0), rtol=1e-5, atol=1e-7 * delta.abs().max().item())


def test_update_moves_weights_and_reports_metrics(tiny, trainer_factory, scored_groups):
    model, tok = tiny
    trainer = trainer_factory(model.double(), tok, ["ppo_epochs=2", "clip.eps_low=0.01", "clip.eps_high=0.01"])
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.update(scored_groups(tok, 4, 4, seed=6))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert metrics["train/updates"] == 2.0
    # Second epoch is off-policy: with a tiny clip range some tokens must be clipped.
    assert metrics["train/clip_frac_low"] + metrics["train/clip_frac_high"] > 0
    assert metrics["diag/clip_low_old_prob_mean"] > 0 or metrics["diag/clip_high_old_prob_mean"] > 0
    assert metrics["train/advantage_zero_frac"] == pytest.approx(0.25)
    assert 0 < metrics["train/entropy"] < torch.log(torch.tensor(float(len(tok)))).item() + 1e-6


def test_old_logprob_pass_skipped_only_when_exactly_on_policy(tiny, trainer_factory, scored_groups, monkeypatch):
    import dapo_rl.training.trainer as trainer_module

    model, tok = tiny
    no_grad_calls = []
    original = trainer_module.logprobs

    def counting(*args, **kwargs):
        if not torch.is_grad_enabled():
            no_grad_calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "logprobs", counting)
    for overrides, expected in ((["ppo_epochs=1"], False), (["ppo_epochs=2"], True), (["mini_batch_size=2", "micro_batch_size=8"], True)):
        no_grad_calls.clear()
        trainer_factory(model.double(), tok, overrides).update(scored_groups(tok, 4, 4, seed=7))
        assert bool(no_grad_calls) == expected, overrides


def _mistral_with_a_small_window(tok):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=16, sliding_window=4, max_position_embeddings=64,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(4)
    return MistralForCausalLM(config).eval()


@pytest.mark.parametrize("complex_rotary", [True, False])
@pytest.mark.parametrize("architecture", ["tiny", "gqa", "mistral-window-4"])
def test_every_forward_path_matches_the_full_forward(tiny, gqa_llama, scored_groups, architecture, complex_rotary, monkeypatch):
    """Each distinct prompt run once (with its responses in one unpadded batch, ``flat``, or its
    responses in length groups on Hugging Face's cache, ``shared``): same log-probs, entropies and gradients
    as the full padded forward of every row (rotary as a complex product on permuted query/key
    rows, and as Hugging Face's rotate-half form, the path under bfloat16 autocast). A model with
    sliding windows (4 tokens, prompts of 6-8 and responses of 1-9) runs the flat path, which
    keeps every prompt position; Hugging Face's evicting cache cannot serve it, so without the
    flat path it runs length groups. With ``entropy_grad`` (an entropy bonus) the entropy's gradient
    agrees across paths too."""
    import dapo_rl.models.rotary as rotary

    if not complex_rotary:
        monkeypatch.setattr(rotary, "complex_rotary_applies", lambda *args: False)
    model, tok = tiny
    builders = {"tiny": lambda: model, "gqa": lambda: gqa_llama(tok, seed=11), "mistral-window-4": lambda: _mistral_with_a_small_window(tok)}
    model = copy.deepcopy(builders[architecture]()).double()
    samples = [s for g in scored_groups(tok, 4, 4, seed=5) for s in g.samples]
    for sample in samples[4:8]:  # a shorter prompt for the second group: left padding in the prompt forward
        sample.prompt_ids = sample.prompt_ids[:-2]
    packed = pack(samples, tok.pad_token_id, torch.device("cpu"))
    assert len(set(packed.prompt_lengths)) > 1 and len(set(packed.response_lengths)) > 3  # padding on both sides
    assert distinct_prompts(packed).prompt_of.tolist() == [i // 4 for i in range(16)]  # 4 groups of 4
    weights = torch.randn(packed.response_mask.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sliding = architecture.startswith("mistral")
    settings = {"flat": ForwardSettings(), ("buckets" if sliding else "shared"): ForwardSettings(flat=False),
                "whole": ForwardSettings(one_forward=True)}
    if not sliding:
        settings["buckets"] = ForwardSettings(share_prompts=False)
    results = {}
    for path, setting in settings.items():
        assert forward_path(model, packed, setting) == path
        for entropy_grad in (False, True):  # the entropy as a metric, and as a bonus with its gradient
            model.zero_grad()
            logp, entropy = logprobs(model, packed, setting, with_entropy=True, entropy_grad=entropy_grad)
            assert entropy.requires_grad == entropy_grad
            ((logp + (0.3 * entropy if entropy_grad else 0)) * packed.response_mask * weights).sum().backward()
            results[path, entropy_grad] = (logp * packed.response_mask, entropy * packed.response_mask,
                                           torch.cat([p.grad.flatten() for p in model.parameters()]))
    for path, entropy_grad in results:
        for full, other in zip(results["whole", entropy_grad], results[path, entropy_grad]):
            torch.testing.assert_close(other, full, rtol=1e-6, atol=1e-6 * full.abs().max().item(),
                                       msg=lambda m: f"{path}, entropy_grad={entropy_grad}: {m}")
    # The bonus moves the gradient; its entropies are the metric's.
    assert not torch.allclose(results["whole", True][2], results["whole", False][2])
    torch.testing.assert_close(results["whole", True][1], results["whole", False][1], rtol=0, atol=0)
    # Nothing to share: every row its own prompt (length groups), or one row (one forward).
    distinct = pack([g.samples[0] for g in scored_groups(tok, 4, 4, seed=5)], tok.pad_token_id, torch.device("cpu"))
    assert distinct_prompts(distinct) is None and forward_path(model, distinct) == "buckets"
    assert forward_path(model, pack(samples[:1], tok.pad_token_id, torch.device("cpu"))) == "whole"


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("masked", [True, False])
def test_attention_as_batched_products_equals_sdpa(kv_heads, masked):
    """The flat forward's attention (grouped-query heads, additive mask) against PyTorch's SDPA:
    outputs and gradients of queries, keys and values."""
    from dapo_rl.models.packed_forward import attention, score_mask

    g, heads, width, length, d = 3, 4, 5, 9, 8
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(g, heads, width, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(g, kv_heads, length, d, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(g, kv_heads, length, d, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = None
    if masked:  # left padding of 0-2 prompt tokens per row, then causal over the last `width` positions
        blocked = torch.zeros(g, 1, width, length, dtype=torch.bool)
        for row in range(g):
            blocked[row, :, :, :row] = True
        blocked[..., length - width:] |= torch.ones(width, width, dtype=torch.bool).triu(1)
        mask = torch.zeros(blocked.shape, dtype=torch.float64).masked_fill(blocked, float("-inf"))
    upstream = torch.randn(g, heads, width, d, generator=gen, dtype=torch.float64)
    results = []
    for fn in (lambda: attention(q, k, v, None if mask is None else score_mask(mask, heads, kv_heads), 0.3),
               lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3,
                                                                        enable_gqa=kv_heads != heads)):
        out = fn()
        results.append((out, *torch.autograd.grad(out, (q, k, v), upstream)))
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


def test_flat_layouts_by_hand():
    from dapo_rl.models.packed_forward import AttentionLayout, FlatPrompts, FlatResponses

    # rows 0..2 with responses of 2, 0 and 3 tokens, prompts of 4, 5 and 3; groups [2, 0] and [1]
    flat = FlatResponses.build([[2, 0], [1]], [4, 5, 3], [2, 0, 3], torch.device("cpu"))
    assert flat.row_of.tolist() == [2, 2, 2, 0, 0] and flat.step_of.tolist() == [0, 1, 2, 0, 1]
    assert flat.positions.tolist() == [3, 4, 5, 4, 5]
    (rows_a, width_a), (rows_b, width_b) = flat.groups
    assert rows_a.tolist() == [2, 0] and width_a == 3 and rows_b.tolist() == [1] and width_b == 1
    # One padded layout for all groups: group a's 2 × 3 slots (row 0 pads slot 5), then group b's 1 × 1.
    assert flat.sizes == [6, 1] and flat.slots.tolist() == [0, 1, 2, 3, 4]

    # Two distinct prompts, left-padded: [7, 8] and [5, 6, 9]; right-padded to width 3 inside.
    prompts = FlatPrompts.build(torch.tensor([[0, 7, 8], [5, 6, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert prompts.tokens.tolist() == [7, 8, 5, 6, 9] and prompts.positions.tolist() == [0, 1, 0, 1, 2]
    assert prompts.slots.tolist() == [0, 1, 3, 4, 5] and prompts.lengths.tolist() == [2, 3] and prompts.last.tolist() == [1, 4]
    # Responses: row 0 (prompt 0) [a, b], row 1 (prompt 1) [c]; one group of width 2.
    responses = FlatResponses.build([[0, 1]], [2, 3], [2, 1], torch.device("cpu"))
    layout = AttentionLayout.build(prompts, responses, torch.tensor([0, 1]))
    # Flat order: prompt tokens 0-4, then responses a=5, b=6, c=7; padding slots read token 0.
    assert layout.blocks == [(2, 3, 3), (2, 2, 5)]
    assert layout.query_map.tolist() == [0, 1, 0, 2, 3, 4] + [5, 6, 7, 0]
    assert layout.key_map.tolist() == [0, 1, 0, 2, 3, 4] + [0, 1, 0, 5, 6] + [2, 3, 4, 7, 0]
    assert layout.query_sizes == [6, 4] and layout.key_sizes == [6, 10]
    assert layout.token_slots.tolist() == [0, 1, 3, 4, 5, 6, 7, 8]
    assert torch.equal(layout.query_map[layout.token_slots], torch.arange(8))


def test_update_with_shared_prompts_matches_micro_batch_of_one(tiny, trainer_factory, scored_groups):
    """The default update path (prompts shared within a micro-batch) against one sample per micro-batch."""
    model, tok = tiny
    params = {}
    for micro, share in ((1, False), (16, True)):
        trainer = trainer_factory(model.double(), tok, ["optim.lr=1e-3", f"micro_batch_size={micro}", "optim.beta1=0", "optim.beta2=0"],
                                  share_prompts=share)
        start = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        trainer.update(scored_groups(tok, 4, 4, seed=5))
        params[micro] = torch.cat([p.detach().flatten() for p in trainer.model.parameters()]) - start
    torch.testing.assert_close(params[16], params[1], rtol=1e-5, atol=1e-7)


def test_kl_term_uses_frozen_reference(tiny, trainer_factory, scored_groups):
    model, tok = tiny
    trainer = trainer_factory(model.double(), tok, ["loss.kl_coef=0.1", "ppo_epochs=2"])
    reference = [p.detach().clone() for p in trainer.reference.parameters()]
    metrics = trainer.update(scored_groups(tok, 4, 4, seed=8))
    assert all(torch.equal(a, b) for a, b in zip(reference, trainer.reference.parameters()))
    assert metrics["train/kl"] >= 0


# ----------------------------------------------------------------------------- end to end

REQUIRED_METRICS = [
    "train/reward_mean", "train/accuracy", "train/entropy", "train/response_length_mean", "train/response_length_max",
    "train/truncated_frac", "train/clip_frac_low", "train/clip_frac_high", "train/informative_group_frac",
    "train/generation_rounds", "train/samples_generated", "perf/generation_tokens_per_s", "time/generation_s",
    "time/scoring_s", "time/update_s", "time/step_s",
]


def test_short_training_run_learns_and_saves_a_loadable_policy(tmp_path, quickstart_cache):
    config = load_config(overrides=[
        f"output_dir={tmp_path / 'run'}", f"quickstart.cache_dir={quickstart_cache}", "steps=20", "eval.interval=10",
        "data.builtin_eval_size=128", "logging.progress=false", "optim.lr=3e-4",
    ])
    result = run_training(config)
    assert 0.1 <= result.accuracy_before <= 0.7
    assert result.accuracy_after >= result.accuracy_before + 0.15, (result.accuracy_before, result.accuracy_after)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == list(range(1, 21))
    for key in REQUIRED_METRICS:
        assert all(key in r for r in steps), key
    assert any("eval/accuracy" in r for r in steps)
    final = tmp_path / "run" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert (final / "model.safetensors").is_file()
    ids = torch.tensor([tokenizer("12=")["input_ids"]])
    assert model(ids).logits.shape[-1] == len(tokenizer)


def test_cli_refuses_to_overwrite_a_run(tmp_path, quickstart_cache, capsys):
    from dapo_rl.cli import main

    args = ["train", f"output_dir={tmp_path}", f"quickstart.cache_dir={quickstart_cache}", "steps=1",
            "data.eval=null", "logging.progress=false"]
    assert main(args) == 0
    before = (tmp_path / "metrics.jsonl").read_text()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output_dir" in err[0] and "resume=true" in err[0]
    assert (tmp_path / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_default_quickstart_meets_its_promise(tmp_path, quickstart_cache):
    """The README's promise: start between 10% and 70%, end at least 30 points higher."""
    config = load_config(overrides=[f"output_dir={tmp_path}", f"quickstart.cache_dir={quickstart_cache}", "logging.progress=false"])
    result = run_training(config)
    assert 0.1 <= result.accuracy_before <= 0.7
    assert result.accuracy_after >= result.accuracy_before + 0.30


def test_hf_engine_greedy_with_several_samples_repeats_the_greedy_response(tiny):
    model, tok = tiny
    engine = HFGenerateEngine(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    groups = engine.generate([tok("12=")["input_ids"], tok("345=")["input_ids"]], 3, greedy)
    single = engine.generate([tok("345=")["input_ids"]], 1, greedy)[0][0].response_ids
    assert [len(g) for g in groups] == [3, 3]
    assert all(s.response_ids == single for s in groups[1])
