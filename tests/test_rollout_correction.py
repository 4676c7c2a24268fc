"""π_rollout against π_old: the correction modes by hand, their no-op law, the mismatch metrics,
the trainer's use of them, and the weight-sync check that stops a run whose engine is stale."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dapo_rl.algorithm import ADVANTAGE_ESTIMATORS, ROLLOUT_CORRECTIONS, aggregate_loss, loss_normalizer, mismatch_metrics
from dapo_rl.config import load_config
from dapo_rl.data.synthetic import VOCAB
from dapo_rl.models.tiny import build_char_tokenizer, build_tiny_llama
from dapo_rl.rollout import Sample
from dapo_rl.rollout.decoder_engine import DecoderEngine
from dapo_rl.training.batching import pack
from dapo_rl.training.weight_sync import SyncCheck, WeightSyncError

LOG2 = math.log(2.0)
# Two responses: log(π_old/π_rollout) per token; the last column is padding (mask 0).
LOG_W = torch.tensor([[LOG2, -LOG2, 0.5 * LOG2, 9.0], [2 * LOG2, 0.0, 0.0, 9.0]], dtype=torch.float64)
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
OLD = torch.zeros(2, 4, dtype=torch.float64)  # so that log(π_old/π_rollout) is LOG_W exactly (w = 2 sits on the bound)
ROLLOUT = OLD - LOG_W


@pytest.mark.parametrize(
    "mode,weights,mask",
    [
        ("none", [[1, 1, 1, 1], [1, 1, 1, 1]], MASK.tolist()),
        # weights 2, 1/2, √2; 4 → capped at 2, 1
        ("token_truncate", [[2, 0.5, 2 ** 0.5, 1], [2, 1, 1, 1]], MASK.tolist()),
        # kept when 1/2 ≤ w ≤ 2: 4 is out
        ("token_mask", [[1, 1, 1, 1], [1, 1, 1, 1]], [[1, 1, 1, 0], [0, 1, 0, 0]]),
        # sequence weights: exp(mean(log 2, -log 2, ½ log 2)) = 2^(1/6); exp(mean(2 log 2, 0)) = 2
        ("sequence_truncate", [[2 ** (1 / 6)] * 3 + [1], [2, 2, 1, 1]], MASK.tolist()),
        ("sequence_mask", [[1, 1, 1, 1], [1, 1, 1, 1]], [[1, 1, 1, 0], [1, 1, 0, 0]]),
    ],
)
def test_correction_modes_by_hand(mode, weights, mask):
    out = ROLLOUT_CORRECTIONS.get(mode)(OLD, ROLLOUT, MASK, 2.0)
    torch.testing.assert_close(out.weights, torch.tensor(weights, dtype=torch.float64))
    torch.testing.assert_close(out.mask, torch.tensor(mask, dtype=torch.float64))


def test_sequence_mask_rejects_a_whole_sequence():
    out = ROLLOUT_CORRECTIONS.get("sequence_mask")(OLD, ROLLOUT, MASK, 1.5)  # 2^(1/6) ≈ 1.12 kept, 2 rejected
    assert out.mask[0].tolist() == [1, 1, 1, 0] and out.mask[1].sum() == 0
    assert loss_normalizer(out.mask, "seq-mean-token-mean") == 1 and loss_normalizer(out.mask, "token-mean") == 3


@pytest.mark.parametrize("mode", ROLLOUT_CORRECTIONS.names())
def test_identical_policies_leave_every_mode_inert(mode):
    logp = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float64)
    out = ROLLOUT_CORRECTIONS.get(mode)(logp, logp.clone(), mask, 1.01)
    assert torch.equal(out.weights, torch.ones_like(logp)) and torch.equal(out.mask, mask)


def test_mismatch_metrics_by_hand():
    rows = [torch.tensor([LOG2, -LOG2]), torch.tensor([0.0])]  # token weights 2, 1/2, 1
    m = mismatch_metrics(rows, sequence_level=False, masked_tokens=1.0)
    assert m["rollout/logp_abs_diff"] == pytest.approx(2 * LOG2 / 3)
    assert m["rollout/kl"] == pytest.approx(((2 - 1 - LOG2) + (0.5 - 1 + LOG2)) / 3)
    assert m["rollout/is_weight_mean"] == pytest.approx(3.5 / 3) and m["rollout/is_weight_max"] == pytest.approx(2.0)
    assert m["rollout/ess_frac"] == pytest.approx(3.5 ** 2 / (3 * 5.25))
    assert m["rollout/masked_frac"] == pytest.approx(1 / 3)
    per_sequence = mismatch_metrics(rows, sequence_level=True, masked_tokens=0.0)
    assert per_sequence["rollout/is_weight_mean"] == pytest.approx(1.0) and per_sequence["rollout/ess_frac"] == pytest.approx(1.0)
    assert mismatch_metrics([], sequence_level=False, masked_tokens=0.0) == {}


# ----------------------------------------------------------------------------- the trainer


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_update_with_correction_follows_the_reference_gradient(trainer_factory, scored_groups, mode):
    """With sampler log-probs off by up to ±0.6 nats, one update equals AdamW's first step on the
    reference gradient ``-A·w·∇log π`` over the kept tokens, normalised by the kept tokens."""
    tok = build_char_tokenizer(VOCAB)
    model = build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=3).double()
    groups = scored_groups(tok, 4, 4, seed=5)
    samples = [s for g in groups for s in g.samples]
    batch = pack(samples, tok.pad_token_id, torch.device("cpu"))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    p = batch.prompt_width
    logp = torch.log_softmax(logits[:, p - 1 : -1], -1).gather(-1, batch.response_ids[..., None])[..., 0]
    gen = torch.Generator().manual_seed(1)
    sampled = logp.detach() + (torch.rand(logp.shape, generator=gen, dtype=torch.float64) - 0.5) * 1.2
    for row, sample in enumerate(samples):
        sample.logprobs = sampled[row, : len(sample.response_ids)].tolist()
    truncated = torch.tensor([s.truncated for s in samples])
    mask = batch.response_mask.double() * (~truncated)[:, None]
    correction = ROLLOUT_CORRECTIONS.get(mode)(logp.detach(), torch.tensor(sampled.float().tolist(), dtype=torch.float64), mask, 1.5)
    assert correction.mask.sum() < mask.sum() or not torch.equal(correction.weights, torch.ones_like(logp))  # it acts
    advantages = ADVANTAGE_ESTIMATORS.get("grpo")(torch.tensor([g.scores for g in groups])).double().reshape(-1, 1)
    reference = aggregate_loss(-advantages * correction.weights * logp, correction.mask, "token-mean")
    model.zero_grad()
    reference.backward()
    g = torch.cat([q.grad.flatten() for q in model.parameters()])

    trainer = trainer_factory(model, tok, [f"rollout_correction.mode={mode}", "rollout_correction.cap=1.5", "optim.eps=1.0"])
    start = torch.cat([q.detach().flatten() for q in trainer.model.parameters()])
    metrics = trainer.update(groups)
    delta = torch.cat([q.detach().flatten() for q in trainer.model.parameters()]) - start
    torch.testing.assert_close(delta, -1e-2 * g / (g.abs() + 1.0), rtol=1e-5, atol=1e-7 * delta.abs().max().item())
    assert metrics["rollout/logp_abs_diff"] > 0.1 and metrics["rollout/is_weight_max"] > (1.05 if mode.startswith("sequence") else 1.5)
    assert (metrics["rollout/masked_frac"] > 0) == mode.endswith("mask")


def test_carried_groups_are_corrected_even_without_a_mode(trainer_factory, scored_groups):
    """Under ``rollout_correction.mode=none`` the groups sampled by an older policy (carried
    surplus) are reweighted by token_truncate; the fresh ones are not."""
    tok = build_char_tokenizer(VOCAB)
    model = build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=3).double()
    groups = scored_groups(tok, 4, 4, seed=5)
    groups[0].policy_version = groups[1].policy_version = -1  # sampled one update before the trainer's current weights
    samples = [s for g in groups for s in g.samples]
    batch = pack(samples, tok.pad_token_id, torch.device("cpu"))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    p = batch.prompt_width
    logp = torch.log_softmax(logits[:, p - 1 : -1], -1).gather(-1, batch.response_ids[..., None])[..., 0]
    sampled = logp.detach() + (torch.rand(logp.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) - 0.5) * 1.2
    for row, sample in enumerate(samples):
        sample.logprobs = sampled[row, : len(sample.response_ids)].tolist()
    mask = batch.response_mask.double() * (~torch.tensor([s.truncated for s in samples]))[:, None]
    weights = torch.exp(logp.detach() - torch.tensor(sampled.float().tolist(), dtype=torch.float64)).clamp(max=2.0)
    weights[8:] = 1.0  # groups 2 and 3 are fresh
    advantages = ADVANTAGE_ESTIMATORS.get("grpo")(torch.tensor([g.scores for g in groups])).double().reshape(-1, 1)
    model.zero_grad()
    aggregate_loss(-advantages * weights * logp, mask, "token-mean").backward()
    g = torch.cat([q.grad.flatten() for q in model.parameters()])
    trainer = trainer_factory(model, tok, ["optim.eps=1.0"])
    start = torch.cat([q.detach().flatten() for q in trainer.model.parameters()])
    trainer.update(groups)
    delta = torch.cat([q.detach().flatten() for q in trainer.model.parameters()]) - start
    torch.testing.assert_close(delta, -1e-2 * g / (g.abs() + 1.0), rtol=1e-5, atol=1e-7 * delta.abs().max().item())


def test_mismatch_is_measured_on_policy_without_a_correction(trainer_factory, scored_groups):
    tok = build_char_tokenizer(VOCAB)
    model = build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=3).double()
    groups = scored_groups(tok, 4, 4, seed=5)
    for g in groups:
        for s in g.samples:
            s.logprobs = [-1.0] * len(s.response_ids)
    metrics = trainer_factory(model, tok, []).update(groups)
    assert metrics["rollout/logp_abs_diff"] > 0 and metrics["rollout/masked_frac"] == 0.0


# ----------------------------------------------------------------------------- weight sync


def _engine_and_model():
    tok = build_char_tokenizer(VOCAB)
    model = build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=3).eval()
    return tok, model


def _score_with(model, tok):
    def score(sample):
        batch = pack([sample], tok.pad_token_id, torch.device("cpu"))
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
        p = batch.prompt_width
        return torch.log_softmax(logits[0, p - 1 : -1], -1).gather(-1, batch.response_ids[0, :, None])[:, 0]

    return score


def _perturb(model, scale: float) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))


def test_sync_check_passes_a_synced_engine_and_stops_a_stale_one():
    tok, model = _engine_and_model()
    prompt = tok("12345=")["input_ids"]
    synced = SyncCheck(DecoderEngine(model, tok.pad_token_id, tok.eos_token_id), prompt, _score_with(model, tok), tolerance=1e-3)
    stale_engine = DecoderEngine(copy.deepcopy(model), tok.pad_token_id, tok.eos_token_id)  # never receives a push
    stale = SyncCheck(stale_engine, prompt, _score_with(model, tok), tolerance=None)  # the bf16 setting: no absolute check
    synced.before()
    stale.before()
    _perturb(model, 1e-3)  # an update the probe notices
    assert synced.after()["rollout/sync_logp_abs_diff"] < 1e-5
    with pytest.raises(WeightSyncError, match="DecoderEngine engine still samples from the previous weights"):
        stale.after()


def test_sync_check_is_silent_when_an_update_does_not_move_the_probe():
    tok, model = _engine_and_model()
    stale = SyncCheck(DecoderEngine(copy.deepcopy(model), tok.pad_token_id, tok.eos_token_id), tok("12=")["input_ids"],
                      _score_with(model, tok), tolerance=None)
    stale.before()
    assert "rollout/sync_logp_abs_diff" in stale.after()  # nothing changed: nothing to judge


class _ScriptedEngine:
    """Reports the log-probs the test sets, for a fixed three-token greedy answer."""

    def __init__(self):
        self.logp = None

    def generate(self, prompts, n, params):
        return [[Sample(list(prompts[0]), [3, 4, 5], "length", self.logp.tolist())]]


def test_sync_check_tells_rounding_from_staleness_only_when_the_update_moved_more_than_the_rounding():
    """The failure seen in a bf16 SmolLM2 run: a synced engine whose rounding (5e-3) exceeds the
    update's move lands nearer the old scores by chance; it must pass. A stale engine with
    fp32-sized noise (not bit-identical between calls) must still be stopped."""
    t0 = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    trainer = {"logp": t0}
    score = lambda sample: trainer["logp"]  # noqa: E731

    engine = _ScriptedEngine()
    noisy = SyncCheck(engine, [1, 2], score, tolerance=None)
    engine.logp = t0 + torch.tensor([5e-3, -5e-3, 5e-3], dtype=torch.float64)  # bf16-sized rounding
    noisy.before()
    trainer["logp"] = t0 + 6e-3  # the update moved the probe by less than 4x the rounding
    engine.logp = t0 + 1e-4  # synced, its rounding now nearer the old scores: diff_old 1e-4, diff_new 5.9e-3
    assert noisy.after()["rollout/sync_logp_abs_diff"] == pytest.approx(5.9e-3)

    trainer["logp"] = t0
    stale_engine = _ScriptedEngine()
    stale = SyncCheck(stale_engine, [1, 2], score, tolerance=None)
    stale_engine.logp = t0 + 1e-6
    stale.before()
    trainer["logp"] = t0 + 1e-2  # a move far above the engine's rounding
    stale_engine.logp = t0 + 2e-6  # still the old weights, not bit-identical
    with pytest.raises(WeightSyncError, match="still samples from the previous weights"):
        stale.after()


def test_a_run_whose_engine_never_receives_the_weights_stops_with_one_line(tmp_path, capfd, quickstart_cache, monkeypatch):
    import dapo_rl.training.compose as compose
    from dapo_rl.cli import main

    def stale_engine(config, model, tokenizer):
        engine = DecoderEngine(copy.deepcopy(model), tokenizer.pad_token_id, tokenizer.eos_token_id)
        engine.sync_weights = lambda model: None  # a push that silently does nothing
        return engine

    monkeypatch.setattr(compose, "build_engine", stale_engine)
    out = tmp_path / "run"
    capfd.readouterr()
    rc = main(["train", f"output_dir={out}", f"quickstart.cache_dir={quickstart_cache}", "steps=3", "data.eval=null",
               "logging.progress=false", "optim.lr=1e-3"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "DecoderEngine" in err[0] and "previous weights" in err[0], err
    assert (out / "checkpoints" / "step_000001").is_dir()  # the finished step is saved


def test_correction_config_errors():
    from dapo_rl.config import ConfigError
    from dapo_rl.training.compose import check_config

    for overrides, needle in ((["rollout_correction.mode=token_clip"], "token_truncate"), (["rollout_correction.cap=1"], "> 1"),
                              (["rollout.engine=hf", "rollout_correction.mode=token_truncate"], "hf engine")):
        with pytest.raises(ConfigError, match=needle) as info:
            check_config(load_config(overrides=overrides))
        assert str(info.value).startswith("rollout_correction.")
    assert load_config(overrides=["rollout.engine=hf"]).rollout_correction.mode == "auto"  # auto resolves to none for hf
