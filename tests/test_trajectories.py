"""Multi-turn trajectories in the update: the environment's tokens (tool results, observations,
template glue) are context only. They get exactly zero gradient and never count in the loss
normaliser, the importance weights, the mismatch metrics or the token statistics; a sample with
no ``model_mask`` (one turn) is trained as before."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from dapo_rl.data.synthetic import VOCAB
from dapo_rl.models.tiny import build_char_tokenizer, build_tiny_llama
from dapo_rl.rollout import Sample

ENV = [7, 8, 9]  # an "observation" of three tokens between two model turns


def _multi_turn(groups, env_logprob: float, seed: int = 0):
    """Each sample becomes model turn → ENV → model turn; the sampler's log-probs are given for
    every token (``env_logprob`` on the environment's, which must not matter)."""
    rng = random.Random(seed)
    out = copy.deepcopy(groups)
    for group in out:
        for k, s in enumerate(group.samples):
            second = [rng.randint(3, 12) for _ in range(rng.randint(1, 4))]
            s.response_ids = list(s.response_ids) + ENV + second
            s.model_mask = [1] * (len(s.response_ids) - len(ENV) - len(second)) + [0] * len(ENV) + [1] * len(second)
            s.logprobs = [env_logprob if m == 0 else -1.0 - 0.1 * ((k + t) % 5) for t, m in enumerate(s.model_mask)]
    return out


def _updated(tiny, trainer_factory, groups, overrides):
    model, tok = tiny
    trainer = trainer_factory(model.double(), tok, overrides)
    metrics = trainer.update(groups)
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()]), metrics, trainer


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_char_tokenizer(VOCAB)
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=3)
    return model.eval(), tokenizer


CORRECTED = ["rollout_correction.mode=token_truncate", "rollout_correction.cap=1.5"]


@pytest.mark.parametrize("overrides", [CORRECTED, [*CORRECTED, "ppo_epochs=2"], ["rollout_correction.mode=sequence_mask"]])
def test_environment_tokens_get_exactly_zero_gradient(tiny, trainer_factory, scored_groups, overrides):
    """The sampler's log-probs on environment tokens (anything at all) change neither the update nor
    a single mismatch metric: they never reach a weight, a normaliser or a statistic."""
    model, tok = tiny
    groups = scored_groups(tok, 4, 4, seed=5)
    base, metrics, _ = _updated(tiny, trainer_factory, _multi_turn(groups, env_logprob=0.0), overrides)
    moved, moved_metrics, _ = _updated(tiny, trainer_factory, _multi_turn(groups, env_logprob=-9.0), overrides)
    assert torch.equal(base, moved)
    assert {k: v for k, v in metrics.items() if not k.startswith(("time/", "perf/"))} == \
           {k: v for k, v in moved_metrics.items() if not k.startswith(("time/", "perf/"))}


@pytest.mark.parametrize("overrides", [["ppo_epochs=2"], ["ppo_epochs=2", "loss.agg_mode=seq-mean-token-mean"],
                                       ["ppo_epochs=2", "loss.policy_loss=gspo", "loss.agg_mode=seq-mean-token-mean"]])
def test_perturbing_pi_old_on_environment_tokens_changes_nothing(tiny, trainer_factory, scored_groups, overrides):
    """Without a correction: π_old on the environment's tokens (the PPO anchor) can be anything."""
    model, tok = tiny
    groups = _multi_turn(scored_groups(tok, 4, 4, seed=5), env_logprob=0.0)
    updated = []
    for shift in (0.0, 3.0):
        trainer = trainer_factory(model.double(), tok, overrides)
        batch = trainer.prepare(groups)
        assert batch.old_logp is not None  # two epochs: π_old is computed
        for i, logp in batch.old_logp.items():
            env = torch.tensor(batch.samples[i].model_mask) == 0
            logp[env] += shift
        trainer.prepare = lambda _groups, batch=batch: batch
        trainer.update(groups)
        updated.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    assert torch.equal(updated[0], updated[1])


@pytest.mark.parametrize("overrides", [[], CORRECTED])
def test_the_normaliser_counts_model_tokens_only(tiny, trainer_factory, scored_groups, overrides):
    model, tok = tiny
    groups = _multi_turn(scored_groups(tok, 4, 4, seed=5), env_logprob=0.0)
    trainer = trainer_factory(model.double(), tok, overrides)
    batch = trainer.prepare(groups)
    everyone = list(range(len(batch.samples)))
    expected = sum(s.model_tokens for s in batch.samples if not s.truncated)  # overlong filtering drops truncated ones
    assert expected < sum(len(s.response_ids) for s in batch.samples if not s.truncated)
    mask = batch.loss_mask(everyone)
    assert mask.sum().item() == expected
    for row, s in enumerate(batch.samples):  # never on an environment token
        env = [t for t, m in enumerate(s.model_mask) if m == 0]
        assert mask[row, env].sum().item() == 0


def test_importance_weights_and_mismatch_use_model_tokens_only(tiny, trainer_factory, scored_groups):
    model, tok = tiny
    groups = _multi_turn(scored_groups(tok, 4, 4, seed=5), env_logprob=0.0)
    trainer = trainer_factory(model.double(), tok, CORRECTED)
    batch = trainer.prepare(groups)
    assert [row.numel() for row in batch.mismatch] == [batch.samples[i].model_tokens for i in sorted(batch.old_logp)]
    for i, weights in batch.weights.items():
        s = batch.samples[i]
        env = torch.tensor(s.model_mask) == 0
        assert torch.all(weights[env] == 0) and torch.all(batch.kept[i][env] == 0)  # no weight on the environment
    metrics = trainer.update(groups)
    # Every rejected token is a model token: the masked fraction is over model tokens.
    assert 0.0 <= metrics["rollout/masked_frac"] < 1.0 and "rollout/ess_frac" in metrics


def test_single_turn_samples_carry_no_mask_and_train_as_before(tiny, trainer_factory, scored_groups):
    """A one-turn sample (``model_mask`` None) and the same sample with an all-ones mask give the
    same update to the last bit."""
    model, tok = tiny
    groups = scored_groups(tok, 4, 4, seed=5)
    assert all(s.model_mask is None for g in groups for s in g.samples)
    ones = copy.deepcopy(groups)
    for g in ones:
        for s in g.samples:
            s.model_mask = [1] * len(s.response_ids)
    plain, _, _ = _updated(tiny, trainer_factory, groups, [])
    masked, _, _ = _updated(tiny, trainer_factory, ones, [])
    assert torch.equal(plain, masked)


def test_sample_counts_and_selects_model_tokens():
    s = Sample([1], [5, 6, 7, 8, 9], "stop", model_mask=[1, 1, 0, 0, 1])
    assert s.model_tokens == 3
    assert s.at_model_tokens(torch.arange(5.0)).tolist() == [0.0, 1.0, 4.0]
    one_turn = Sample([1], [5, 6], "stop")
    assert one_turn.model_tokens == 2 and one_turn.at_model_tokens(torch.arange(2.0)).tolist() == [0.0, 1.0]
