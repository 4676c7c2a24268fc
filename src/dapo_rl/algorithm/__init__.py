"""Pure DAPO / GRPO-family math on tensors: no models, no files, no processes.

The plug points are registries selected by name in the configuration: :data:`POLICY_LOSSES`
(``loss.policy_loss``), :data:`ADVANTAGE_ESTIMATORS` (``advantage.estimator``),
:data:`KL_ESTIMATORS` (``loss.kl_estimator``), :data:`LOSS_AGG_MODES` (``loss.agg_mode``),
:data:`GROUP_CRITERIA` (``dynamic_sampling.criterion``) and :data:`ROLLOUT_CORRECTIONS`
(``rollout_correction.mode``). Each also takes an import path ``package.module:function`` to a
user's own (a loss aggregation mode: an :class:`~dapo_rl.algorithm.aggregation.Aggregation`).
"""

from dapo_rl.algorithm.advantages import (
    ADVANTAGE_ESTIMATORS,
    broadcast_to_tokens,
    drgrpo_advantages,
    grpo_advantages,
)
from dapo_rl.algorithm.aggregation import LOSS_AGG_MODES, Aggregation, aggregate_loss, loss_normalizer
from dapo_rl.algorithm.dynamic_sampling import (
    GROUP_CRITERIA,
    DynamicSampler,
    DynamicSamplingExhausted,
    GroupFilter,
    SampledBatch,
    informative_groups,
)
from dapo_rl.algorithm.kl import KL_ESTIMATORS
from dapo_rl.algorithm.overlong import overlong_filter_mask, soft_overlong_penalty
from dapo_rl.algorithm.policy_loss import (
    POLICY_LOSSES,
    ClipRange,
    LossSettings,
    PolicyLossResult,
    batch_coupled,
    cispo_loss,
    decoupled_clip_loss,
    gspo_loss,
    is_batch_coupled,
    masked,
    ratio_metrics,
    token_log_ratio,
)
# Imported for their registrations: the entropy controls and the other trust regions.
from dapo_rl.algorithm.entropy_losses import clip_cov_loss, kl_cov_loss
from dapo_rl.algorithm.trust_region_losses import dppo_kl_loss, dppo_tv_loss, geo_mean_loss, sapo_loss
from dapo_rl.algorithm.registry import Registry
from dapo_rl.algorithm.rollout_correction import ROLLOUT_CORRECTIONS, Correction, mismatch_metrics
from dapo_rl.algorithm.token_stats import token_entropy, token_logprobs

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "GROUP_CRITERIA",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "ROLLOUT_CORRECTIONS",
    "Aggregation",
    "ClipRange",
    "Correction",
    "DynamicSampler",
    "DynamicSamplingExhausted",
    "GroupFilter",
    "LossSettings",
    "PolicyLossResult",
    "Registry",
    "SampledBatch",
    "aggregate_loss",
    "batch_coupled",
    "broadcast_to_tokens",
    "cispo_loss",
    "clip_cov_loss",
    "decoupled_clip_loss",
    "dppo_kl_loss",
    "dppo_tv_loss",
    "drgrpo_advantages",
    "geo_mean_loss",
    "grpo_advantages",
    "gspo_loss",
    "informative_groups",
    "is_batch_coupled",
    "kl_cov_loss",
    "loss_normalizer",
    "masked",
    "mismatch_metrics",
    "overlong_filter_mask",
    "ratio_metrics",
    "sapo_loss",
    "soft_overlong_penalty",
    "token_entropy",
    "token_log_ratio",
    "token_logprobs",
]
