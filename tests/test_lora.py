"""LoRA adapters (issue 19): what trains, what every forward and engine computes, the KL
reference, the weight-sync check, outputs (PEFT folder, merged export, eval, resume) and bad input.

The update laws (micro-batch invariance, the reference gradient of the decoupled-clip loss with
its token-level normaliser) run on a LoRA model in tests/test_training.py; the two-process update
in tests/test_distributed.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers as tf

from dapo_rl.cli import main
from dapo_rl.data.synthetic import VOCAB
from dapo_rl.models.lora import (
    adapter_layers,
    adapters_disabled,
    effective_weight,
    merged_parameters,
    save_merged,
    save_servable,
)
from dapo_rl.models.tiny import build_char_tokenizer, build_tiny_llama
from dapo_rl.rollout import SamplingParams
from dapo_rl.rollout.decoder_engine import DecoderEngine
from dapo_rl.training.batching import pack
from dapo_rl.training.logprobs import ForwardSettings, forward_path, logprobs
from dapo_rl.training.weight_sync import SyncCheck, WeightSyncError

TOK = build_char_tokenizer(VOCAB)
SMALL = ["prompts_per_step=4", "group_size=4", "mini_batch_size=4", "micro_batch_size=16", "data.builtin_eval_size=16",
         "data.builtin_train_size=256", "logging.progress=false", "eval.interval=0", "model.lora.r=4",
         "model.lora.alpha=8", "optim.lr=5e-3"]


def _llama():
    return build_tiny_llama(TOK, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=3).eval()


def _phi3():
    """A tiny Phi-3: fused qkv_proj and gate_up_proj, partial rotary (its own LoRA targets)."""
    config = tf.Phi3Config(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, max_position_embeddings=64, partial_rotary_factor=0.5, pad_token_id=TOK.pad_token_id,
                           bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(7)
    return tf.Phi3ForCausalLM(config).float().eval()


def _packed(scored_groups, prompt_cut: bool = True):
    samples = [s for g in scored_groups(TOK, 4, 4, seed=5) for s in g.samples]
    if prompt_cut:
        for sample in samples[4:8]:  # left padding in the prompt forward
            sample.prompt_ids = sample.prompt_ids[:-2]
    return pack(samples, TOK.pad_token_id, torch.device("cpu"))


PATHS = {"flat": ForwardSettings(), "shared": ForwardSettings(flat=False), "buckets": ForwardSettings(share_prompts=False),
         "whole": ForwardSettings(one_forward=True)}


# ----------------------------------------------------------------------------- what the adapters compute


def test_fresh_adapters_compute_exactly_the_base_model(adapters, scored_groups):
    """PEFT starts B at 0: each adapted projection's output is bit-identical to its base layer's,
    and so are the log-probs of a whole forward. The cached paths (flat, shared) agree to float32
    rounding: their last-position product runs on a strided slice, whose rounding in the BLAS
    depends on where the allocator placed the buffer (measured: 6e-8 in a logit, identical
    when both models allocate alike)."""
    base = _llama()
    model = adapters(base, b_scale=0.0)
    layers = adapter_layers(model)
    assert len(layers) == 2 * 7  # all-linear: q, k, v, o, gate, up, down in each of the 2 layers
    x = torch.randn(5, 32)
    for _, module in layers:
        if module.in_features == 32:
            assert torch.equal(module(x), module.base_layer(x))
        assert torch.equal(effective_weight(module), module.base_layer.weight)
    packed = _packed(scored_groups)
    with torch.no_grad():
        for path, settings in PATHS.items():
            assert forward_path(model, packed, settings) == path
            mine, ref = logprobs(model, packed, settings)[0], logprobs(base, packed, settings)[0]
            if path in ("whole", "buckets"):
                assert torch.equal(mine, ref), path
            else:
                torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("builder", [_llama, _phi3], ids=["llama", "phi3-fused"])
@pytest.mark.parametrize("complex_rotary", [True, False])
def test_every_forward_path_includes_the_adapters(adapters, scored_groups, builder, complex_rotary, monkeypatch):
    """With B ≠ 0, in float64: the flat forward (q/k/v products on the frozen base plus the
    adapters' terms, query/key columns permuted when rotary is a complex product), the shared-prompt and bucketed
    forwards give the log-probs and adapter gradients of the whole padded forward, and that
    forward equals the merged model (W + α/r·B·A as plain weights, loaded into the base)."""
    import dapo_rl.models.rotary as rotary

    if not complex_rotary:
        monkeypatch.setattr(rotary, "complex_rotary_applies", lambda *args: False)
    base = builder()
    model = adapters(base.double(), b_scale=0.3)
    packed = _packed(scored_groups)
    weights = torch.randn(packed.response_mask.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = {}
    for path, settings in PATHS.items():
        assert forward_path(model, packed, settings) == path
        model.zero_grad()
        logp, _ = logprobs(model, packed, settings)
        (logp * packed.response_mask * weights).sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None for g in grads) and all(p.grad is None for p in model.parameters() if not p.requires_grad)
        results[path] = (logp * packed.response_mask, torch.cat([g.flatten() for g in grads]))
    for path in PATHS:
        for full, other in zip(results["whole"], results[path]):
            torch.testing.assert_close(other, full, rtol=1e-6, atol=1e-6 * full.abs().max().item(), msg=lambda m: f"{path}: {m}")
    merged = copy.deepcopy(base).double()
    merged.load_state_dict(merged_parameters(model), strict=False)
    with torch.no_grad():
        plain = logprobs(merged, packed, PATHS["whole"])[0] * packed.response_mask
        assert (plain - logprobs(base, packed, PATHS["whole"])[0] * packed.response_mask).abs().max() > 1e-3  # the adapters matter
    torch.testing.assert_close(results["whole"][0].detach(), plain, rtol=0, atol=1e-10)


def test_the_flat_forward_keeps_no_fused_copy_of_the_frozen_base(adapters, scored_groups):
    # A fused [W_q; W_k; W_v] would be a copy of the base per forward, kept for the backward pass.
    model = adapters(_llama())
    packed = _packed(scored_groups)
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    attn = model.model.layers[0].self_attn
    fused_shape = (sum(m.weight.shape[0] for m in (attn.q_proj, attn.k_proj, attn.v_proj)), attn.q_proj.weight.shape[1])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logp, _ = logprobs(model, packed, PATHS["flat"])
    assert forward_path(model, packed, PATHS["flat"]) == "flat" and int(packed.response_mask.sum()) != fused_shape[0]
    weights = [t for t in saved if t.ndim == 2 and t.untyped_storage().data_ptr() in own]
    assert {tuple(t.shape) for t in weights} >= {tuple(attn.q_proj.weight.shape[::-1]), tuple(attn.k_proj.weight.shape[::-1])}  # read in place
    assert not [t for t in saved if tuple(t.shape) in (fused_shape, fused_shape[::-1]) and t.untyped_storage().data_ptr() not in own]


def test_only_adapters_train_and_the_base_stays_bit_identical(adapters, trainer_factory, scored_groups):
    model = adapters(_llama())
    trainer = trainer_factory(model, TOK, ["optim.lr=1e-2"])
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert set(frozen) and not any(".lora_" in n for n in frozen)
    trainer.update(scored_groups(TOK, 4, 4, seed=5))
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in frozen.items())
    assert all(not torch.equal(after[n], t) for n, t in trained.items())  # A and B of every projection moved
    # Optimiser state only for the adapters: two moments per adapter tensor.
    state = trainer.optimizer.state
    assert {id(p) for p in state} == {id(after[n]) for n in trained}
    state_bytes = sum(t.numel() * t.element_size() for s in state.values() for t in s.values() if torch.is_tensor(t) and t.ndim)
    assert state_bytes == 2 * sum(t.numel() * t.element_size() for t in trained.values())


def test_kl_reference_is_the_base_with_adapters_disabled(adapters, trainer_factory, scored_groups):
    """No second copy: the reference is the policy itself, scored with adapters off; afterwards
    the adapters are on and trainable again. The KL term then pulls towards the base."""
    base = _llama().double()
    model = adapters(base, b_scale=0.3)
    trainer = trainer_factory(model, TOK, ["loss.kl_coef=0.1"])
    assert trainer.reference is trainer.model
    packed = _packed(scored_groups, prompt_cut=False)
    with torch.no_grad(), adapters_disabled(trainer.model):
        off = logprobs(trainer.model, packed)[0]
    with torch.no_grad():
        torch.testing.assert_close(off, logprobs(base, packed)[0], rtol=0, atol=1e-12)
        assert (logprobs(trainer.model, packed)[0] - off).abs().max() > 1e-3  # on again
    assert all(p.requires_grad for n, p in trainer.model.named_parameters() if ".lora_" in n)
    metrics = trainer.update(scored_groups(TOK, 4, 4, seed=8))
    assert metrics["train/kl"] > 0  # the policy (B ≠ 0) differs from the base
    assert all(p.requires_grad for n, p in trainer.model.named_parameters() if ".lora_" in n)


# ----------------------------------------------------------------------------- engines see the adapters


def _probe(trainer, engine):
    """Greedy probe of the first training prompt: the engine's log-probs and the trainer's, fp32."""
    prompt = list(trainer.rollouts.stream.prompts[0].ids) if hasattr(trainer.rollouts.stream, "prompts") else None
    sample = engine.generate([prompt or TOK("3527..=")["input_ids"]], 1, SamplingParams(temperature=0.0, max_new_tokens=8))[0][0]
    batch = pack([sample], TOK.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        trainer.model.eval()
        ours = logprobs(trainer.model, batch)[0][0, : len(sample.response_ids)]
    return torch.tensor(sample.logprobs), ours


def test_fast_engine_samples_from_the_updated_adapters(adapters, trainer_factory, scored_groups):
    """After one update the fast engine's (direct decoder, adapters merged into its own per-call
    buffers) greedy log-probs of a probe equal the trainer's to 1e-5 in float32; the weight-sync
    check passes and saw the probe move."""
    trainer = trainer_factory(adapters(_llama()), TOK, ["optim.lr=5e-2"], engine="fast")
    assert trainer.sync_check is not None and trainer.sync_check.tolerance is not None
    trainer.sync_check.before()
    before = trainer.sync_check.previous.trainer_logp.clone()
    trainer.update(scored_groups(TOK, 4, 4, seed=5))
    trainer.engine.sync_weights(trainer.model)
    metrics = trainer.sync_check.after()
    assert (trainer.sync_check.previous.trainer_logp - before).abs().max() > 1e-4  # the update moved the probe
    assert metrics["rollout/sync_logp_abs_diff"] <= 1e-5
    engine_logp, trainer_logp = _probe(trainer, trainer.engine)
    torch.testing.assert_close(engine_logp.double(), trainer_logp.double(), rtol=0, atol=1e-5)


def test_a_sync_that_never_lands_is_caught(adapters, trainer_factory, scored_groups, monkeypatch):
    """Two ways the sampler can miss the adapters: an engine holding a stale copy of the policy,
    and a decoder that reads the base weights only (ignores the adapters). Both are caught by the
    weight-sync check after the first update."""
    import dapo_rl.models.decode as decode

    # 1. an engine on a copy that is never updated
    trainer = trainer_factory(adapters(_llama()), TOK, ["optim.lr=5e-2"], engine="fast")
    stale = DecoderEngine(copy.deepcopy(trainer.model), pad_token_id=TOK.pad_token_id, eos_token_id=TOK.eos_token_id)
    check = SyncCheck(stale, TOK("3527..=")["input_ids"], trainer.sync_check.score, tolerance=1e-3)
    check.before()
    trainer.update(scored_groups(TOK, 4, 4, seed=5))
    with pytest.raises(WeightSyncError, match="previous weights"):
        check.after()
    # 2. a decoder that reads the base and leaves the adapters' terms out
    monkeypatch.setattr(decode, "low_rank_factors", lambda module: [])
    trainer = trainer_factory(adapters(_llama()), TOK, ["optim.lr=5e-2"], engine="fast")
    trainer.sync_check.before()
    trainer.update(scored_groups(TOK, 4, 4, seed=5))
    with pytest.raises(WeightSyncError):
        trainer.sync_check.after()


def test_merged_parameters_carry_the_base_names_and_save_as_an_ordinary_model(adapters, tmp_path):
    """What the vLLM engines are given (the in-process one's weight pushes, the launched server's
    model folder): the merged weights under exactly the base model's parameter names, and a folder
    ``from_pretrained`` loads with the adapted model's logits; a plain model saves as itself."""
    base = _llama()
    model = adapters(base, b_scale=0.3)
    merged = merged_parameters(model)
    assert list(merged) == [n for n, _ in base.named_parameters()]
    save_merged(model, tmp_path / "merged")
    save_servable(model, tmp_path / "servable")
    save_servable(base, tmp_path / "plain")
    ids = torch.tensor([TOK("3527..=38")["input_ids"]])
    with torch.no_grad():
        for folder, reference in (("merged", model), ("servable", model), ("plain", base)):
            loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / folder, dtype=torch.float32).eval()
            torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
        assert (model(ids).logits - base(ids).logits).abs().max() > 1e-3


# ----------------------------------------------------------------------------- outputs


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, quickstart_cache) -> Path:
    """A 3-step LoRA run of the built-in task, checkpointing every step."""
    out = tmp_path_factory.mktemp("lora-run") / "run"
    assert main(["train", *SMALL, "steps=3", "checkpoint.interval=1", "checkpoint.keep_last=0",
                 f"quickstart.cache_dir={quickstart_cache}", f"output_dir={out}"]) == 0
    return out


def test_final_folder_is_a_peft_adapter_and_exports_merged(lora_run, tmp_path, capsys):
    from peft import PeftModel

    final = lora_run / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not list(final.glob("model*.safetensors"))
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and Path(config["base_model_name_or_path"]).is_dir()
    base = tf.AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32).eval()
    ids = torch.tensor([TOK("3527..=38")["input_ids"]])
    with torch.no_grad():
        base_logits = base(ids).logits.clone()
        peft_logits = PeftModel.from_pretrained(base, str(final)).eval()(ids).logits
    assert (peft_logits - base_logits).abs().max() > 1e-4  # the adapter learned something
    capsys.readouterr()
    assert main(["export-merged", str(lora_run), str(tmp_path / "merged")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs_logit_diff"] < 1e-4
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_logits, rtol=0, atol=1e-4)
    # Checkpoints hold the adapters (and the optimiser state of the adapters) only.
    for checkpoint in sorted((lora_run / "checkpoints").glob("step_*")):
        policy = checkpoint / "policy"
        assert sorted(p.name for p in policy.glob("*.safetensors")) == ["adapter_model.safetensors"]
        blob = torch.load(checkpoint / "trainer.pt", weights_only=False)
        assert all(".lora_" in name for name in blob["optimizer"]["state"])


def test_eval_accepts_an_adapter_folder(lora_run, tmp_path, capfd):
    final = lora_run / "final"
    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    common = ["builtin:chain", "k=2", "greedy=true", "builtin_eval_size=16", "progress=false", "max_response_length=16"]
    assert main(["eval", str(final), *common, f"output={tmp_path / 'a.json'}"]) == 0
    assert main(["eval", str(final), *common, f"base={base}", f"output={tmp_path / 'b.json'}"]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["greedy_accuracy"] == b["greedy_accuracy"]
    capfd.readouterr()
    assert main(["eval", str(final), *common, f"base={tmp_path / 'nowhere'}", f"output={tmp_path / 'c.json'}"]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "base" in err and "nowhere" in err


def test_resume_continues_a_lora_run_exactly(lora_run, tmp_path, quickstart_cache):
    """Resuming step 1's checkpoint (adapters + optimiser) reproduces steps 2-3 of the
    uninterrupted run: identical metrics and a bit-identical final adapter."""
    import shutil

    from safetensors.torch import load_file

    from dapo_rl.telemetry import read_metrics

    out = tmp_path / "resumed"
    shutil.copytree(lora_run, out, ignore=shutil.ignore_patterns("final", "step_000002", "step_000003", "summary.json"))
    (out / "config.yaml").write_text((lora_run / "config.yaml").read_text().replace(str(lora_run), str(out)))
    assert main(["train", *SMALL, "steps=3", "checkpoint.interval=1", "checkpoint.keep_last=0", "resume=true",
                 f"quickstart.cache_dir={quickstart_cache}", f"output_dir={out}"]) == 0
    first, second = (load_file(str(run / "final" / "adapter_model.safetensors")) for run in (lora_run, out))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    def stable(run):
        return [{k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))} for row in read_metrics(run / "metrics.jsonl")]

    assert stable(out) == stable(lora_run)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def other_base_adapter(tmp_path_factory) -> Path:
    """An adapter folder trained for another base (hidden size 48, not the quickstart's 64)."""
    folder = tmp_path_factory.mktemp("other-adapter")
    model = build_tiny_llama(TOK, hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96, seed=1)
    from dapo_rl.models.lora import add_adapters

    add_adapters(model, r=4, alpha=8.0, dropout=0.0, target_modules=["all-linear"], base_path="elsewhere")
    model.save_pretrained(folder)
    return folder


BAD = [
    ("negative-rank", ["model.lora.r=-1"], ["model.lora.r", ">= 0"]),
    ("dropout-1", ["model.lora.dropout=1.0"], ["model.lora.dropout", "[0, 1)"]),
    ("adapter-folder-as-model", ["model.path={other}"], ["model.path", "is an adapter folder", "model.lora.init_from={other}"]),
    ("init-from-without-rank", ["model.lora.r=0", "model.lora.init_from=somewhere"], ["model.lora.init_from", "r=0"]),
    ("unknown-target", ["model.lora.target_modules=[q_proj,query_key_value]"],
     ["model.lora.target_modules", "'query_key_value'", "matches no module", "q_proj", "down_proj"]),
    ("head-target", ["model.lora.target_modules=[lm_head]"], ["model.lora.target_modules", "'lm_head'", "attention or MLP"]),
    ("init-from-other-base", ["model.lora.init_from={other}"], ["model.lora.init_from", "different base", "{other}"]),
    ("init-from-other-rank", ["model.lora.r=8", "model.lora.alpha=16", "model.lora.init_from={other}"],
     ["model.lora.init_from", "r=4", "model.lora.r=4"]),
]


@pytest.mark.parametrize("overrides, needles", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_lora_input_is_one_line_naming_the_key(tmp_path, capfd, quickstart_cache, other_base_adapter, overrides, needles):
    out = tmp_path / "run"
    capfd.readouterr()
    rc = main(["train", *SMALL, "steps=1", f"quickstart.cache_dir={quickstart_cache}", f"output_dir={out}",
               *(o.format(other=other_base_adapter) for o in overrides)])
    err = capfd.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle.format(other=other_base_adapter) in err, err
    assert not out.exists()
