"""Pure DAPO / GRPO-family math on tensors: no models, no files, no processes."""

from dapo_rl.algorithm.advantages import (
    ADVANTAGE_ESTIMATORS,
    broadcast_to_tokens,
    drgrpo_advantages,
    group_advantages,
    grpo_advantages,
    register_advantage_estimator,
)
from dapo_rl.algorithm.aggregation import LOSS_AGG_MODES, aggregate_loss, loss_normalizer
from dapo_rl.algorithm.dynamic_sampling import (
    DynamicSampler,
    DynamicSamplingExhausted,
    SampledBatch,
    informative_groups,
)
from dapo_rl.algorithm.kl import KL_ESTIMATORS, kl_penalty
from dapo_rl.algorithm.overlong import overlong_filter_mask, soft_overlong_penalty
from dapo_rl.algorithm.policy_loss import POLICY_LOSSES, PolicyLossOutput, decoupled_clip_loss, register_policy_loss
from dapo_rl.algorithm.token_stats import token_entropy, token_logprobs

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "DynamicSampler",
    "DynamicSamplingExhausted",
    "PolicyLossOutput",
    "SampledBatch",
    "aggregate_loss",
    "broadcast_to_tokens",
    "decoupled_clip_loss",
    "drgrpo_advantages",
    "group_advantages",
    "grpo_advantages",
    "informative_groups",
    "kl_penalty",
    "loss_normalizer",
    "overlong_filter_mask",
    "register_advantage_estimator",
    "register_policy_loss",
    "soft_overlong_penalty",
    "token_entropy",
    "token_logprobs",
]
