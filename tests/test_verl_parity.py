"""Our policy losses against verl 0.9.1's own functions (``verl.trainer.ppo.core_algos``): value and
gradient on random inputs, in every aggregation mode verl's function supports.

verl is not a dependency: it runs in its own virtualenv, because its wheel ships a top-level
``tests`` package that would shadow ours. ``.ci/verl`` builds it (``pip install --no-deps
verl==0.9.1 tensordict codetiming orjson pyvers`` on top of this environment) and runs
``pytest -m verl tests/test_verl_parity.py``. Without verl the module is skipped; the default test
command deselects it (``-m 'not slow and not vllm and not verl'``).

verl imports ``ray`` at module level (``verl.protocol``) but no loss uses it: where ray is not
installed a stub module stands in for it, with only what verl's imports touch.

verl's loss is ``agg_loss(per_token, mask, mode)`` of its per-token losses; ours is
:func:`~dapo_rl.algorithm.aggregation.aggregate_loss` of ours. Both get the same random state, so
Clip-Cov draws the same tokens. Deliberate differences, checked here rather than hidden:

- ``geo_mean``: verl divides by every row, a fully masked (overlong-filtered) one included; we
  count the responses in the loss, as every mode does (test_geo_mean_counts_only_responses_in_the_loss).
- ``gspo`` caps the log sequence ratio at 20, verl at 10; ``geo_mean`` caps its mean clipped
  log-ratio at 20, verl leaves it open: the random inputs stay far below both.
- ``geo_mean`` and ``sapo``: verl's functions ignore ``loss_agg_mode`` (``seq-mean-token-mean``
  always); ours follow ``loss.agg_mode``, so they are compared in that mode only.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

if importlib.util.find_spec("verl") is None:
    pytest.skip("verl is not installed (it needs its own venv: .ci/verl builds one and runs these)", allow_module_level=True)

if importlib.util.find_spec("ray") is None:  # verl.protocol imports ray; the losses never call it
    ray = types.ModuleType("ray")
    ray.ObjectRef = type("ObjectRef", (), {})  # only named in annotations
    sys.modules["ray"] = ray

from verl.trainer.ppo import core_algos  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

from dapo_rl.algorithm import POLICY_LOSSES, LossSettings, aggregate_loss  # noqa: E402

pytestmark = pytest.mark.verl

ALL_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
NORM_CONSTANT = 11.0  # C of seq-mean-token-sum-norm (verl: global_batch_info["loss_scale_factor"])

# Our name → (verl's registered name, the aggregation modes its function honours).
LOSSES = {
    "decoupled_clip": ("vanilla", ALL_MODES),
    "gspo": ("gspo", ALL_MODES),
    "cispo": ("cispo", ALL_MODES),
    "clip_cov": ("clip_cov", ALL_MODES),
    "kl_cov": ("kl_cov", ALL_MODES),
    "geo_mean": ("geo_mean", ["seq-mean-token-mean"]),
    "sapo": ("sapo", ["seq-mean-token-mean"]),
    "dppo_tv": ("dppo_tv", ALL_MODES),
    "dppo_kl": ("dppo_kl", ALL_MODES),
}

# (eps_low, eps_high, dual_clip_c): DAPO's clip (with a dual clip that binds at 1.1); GSPO's
# sequence ε; GMPO's log-space ε; DPPO's thresholds, with a null dual_clip_c (DPPO reads it as
# verl's fallback truncation 20) and a truncation at 1.1 that binds.
CLIPS = {
    "decoupled_clip": [(0.2, 0.28, 3.0), (0.2, 0.28, 1.1)],
    "gspo": [(3e-3, 4e-3, None), (0.2, 0.28, None)],
    "geo_mean": [(0.4, 0.4, None), (0.1, 0.15, None)],
    "dppo_tv": [(0.2, 0.28, 3.0), (0.1, 0.15, None), (0.5, 0.5, 1.1)],
    "dppo_kl": [(0.2, 0.28, 3.0), (0.02, 0.03, None)],
}
# Loss hyper-parameters: verl's defaults, and settings under which the covariance methods act on
# many tokens of the small random batch.
HYPER = [dict(), dict(clip_cov_ratio=0.2, clip_cov_lb=0.05, clip_cov_ub=3.0, kl_cov_ratio=0.1, ppo_kl_coef=1.0,
                      tau_pos=1.3, tau_neg=2.0)]


def _inputs(seed: int, batch: int = 8, length: int = 13, empty_row: bool = False):
    """Random log-probs of sampled tokens (probabilities in (0.02, 1)), π_old near them (log-ratio
    spread 0.3, clipping on both sides), one advantage per response, right-padded responses with
    arbitrary values under the padding."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 4.0
    old = (logp + 0.3 * torch.randn(batch, length, generator=gen, dtype=torch.float64)).clamp(max=-1e-3)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.float64)
    if empty_row:
        mask[2] = 0
    advantages = torch.randn(batch, 1, generator=gen, dtype=torch.float64).expand(batch, length).clone()
    return logp, old, advantages, mask


def _ours(name: str, logp, old, advantages, mask, mode: str, clip, hyper, seed: int):
    logp = logp.clone().requires_grad_(True)
    settings = LossSettings(*clip, **hyper, generator=torch.Generator().manual_seed(seed))
    out = POLICY_LOSSES.get(name)(logp, old, advantages, mask, settings)
    loss = aggregate_loss(out.per_token_loss, mask, mode, norm_constant=NORM_CONSTANT)
    loss.backward()
    return loss.detach(), logp.grad


def _verl(name: str, logp, old, advantages, mask, mode: str, clip, hyper, seed: int):
    eps_low, eps_high, dual_clip_c = clip
    config = ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
        clip_ratio_low=eps_low, clip_ratio_high=eps_high,
        clip_ratio_c=dual_clip_c if dual_clip_c is not None else 20.0,
        tau_pos=hyper.get("tau_pos", 1.0), tau_neg=hyper.get("tau_neg", 1.05),
        policy_loss=PolicyLossConfig(loss_mode=LOSSES[name][0], **{k: v for k, v in hyper.items() if not k.startswith("tau")}),
        global_batch_info={"loss_scale_factor": NORM_CONSTANT},
    )
    logp = logp.clone().requires_grad_(True)
    torch.manual_seed(seed)  # verl's Clip-Cov draws from the global generator
    loss, _ = core_algos.get_policy_loss_fn(LOSSES[name][0])(old, logp, advantages, mask, loss_agg_mode=mode, config=config)
    loss.backward()
    return loss.detach(), logp.grad


CASES = [(name, mode, clip, i) for name, (_, modes) in LOSSES.items() for mode in modes
         for clip in CLIPS.get(name, [(0.2, 0.28, None)]) for i in range(len(HYPER))]


@pytest.mark.parametrize("name,mode,clip,hyper_index", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_value_and_gradient_equal_verl(name, mode, clip, hyper_index, seed):
    logp, old, advantages, mask = _inputs(seed)
    hyper = HYPER[hyper_index]
    ours, our_grad = _ours(name, logp, old, advantages, mask, mode, clip, hyper, seed)
    theirs, their_grad = _verl(name, logp, old, advantages, mask, mode, clip, hyper, seed)
    # verl adds 1e-8 to its token and sequence counts: agreement to ~1e-9, not to the last bit.
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(our_grad, their_grad * mask, rtol=1e-7, atol=1e-10)
    assert our_grad.abs().sum() > 0


def test_the_random_inputs_exercise_what_the_losses_do():
    """The parity above would be weak if no token were clipped, masked, drawn or penalised: under
    one of its clips, each loss that clips clips on both sides of the random batch."""
    logp, old, advantages, mask = _inputs(0)
    for name in ("decoupled_clip", "gspo", "clip_cov", "geo_mean", "dppo_tv", "dppo_kl"):
        both_sides = False
        for clip in CLIPS.get(name, [(0.2, 0.28, None)]):
            metrics = POLICY_LOSSES.get(name)(logp, old, advantages, mask, LossSettings(*clip, generator=torch.Generator().manual_seed(0))).metrics
            both_sides |= bool(metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0)
        assert both_sides, name
    busy = LossSettings(0.2, 0.28, **HYPER[1], generator=torch.Generator().manual_seed(0))
    assert POLICY_LOSSES.get("clip_cov")(logp, old, advantages, mask, busy).metrics["cov_clip_frac"] > 1
    assert POLICY_LOSSES.get("kl_cov")(logp, old, advantages, mask, busy).metrics["kl_cov_frac"] > 1
    default = LossSettings(0.2, 0.28, generator=torch.Generator().manual_seed(0))  # verl's 2e-4: one token
    assert POLICY_LOSSES.get("clip_cov")(logp, old, advantages, mask, default).metrics["cov_clip_frac"] == 1
    truncated = POLICY_LOSSES.get("dppo_tv")(logp, old, advantages, mask, LossSettings(0.5, 0.5, 1.1)).metrics
    assert truncated["weight_truncated_frac"] > 0  # ...DPPO's truncation at c = 1.1, and the dual clip at 1.1:
    assert POLICY_LOSSES.get("decoupled_clip")(logp, old, advantages, mask, LossSettings(0.2, 0.28, 1.1)).metrics["dual_clip_frac"] > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_geo_mean_counts_only_responses_in_the_loss(seed):
    """Deliberate difference: with a fully masked response in the batch, verl's ``torch.mean`` over
    rows counts it (its loss is 0), ours does not. So verl's value and gradient are ours times
    (responses in the loss) / (rows)."""
    logp, old, advantages, mask = _inputs(seed, empty_row=True)
    ours, our_grad = _ours("geo_mean", logp, old, advantages, mask, "seq-mean-token-mean", (0.4, 0.4, None), {}, seed)
    theirs, their_grad = _verl("geo_mean", logp, old, advantages, mask, "seq-mean-token-mean", (0.4, 0.4, None), {}, seed)
    scale = (mask.sum(-1) > 0).sum().item() / mask.shape[0]
    assert scale < 1
    torch.testing.assert_close(ours * scale, theirs, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(our_grad * scale, their_grad * mask, rtol=1e-7, atol=1e-10)
