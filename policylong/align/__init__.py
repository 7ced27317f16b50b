"""Alignment (``policylong align``): dGRPO and its baselines on the live Megatron policy.

Built so far: the objective (``objective``), configured by ``policylong.config.AlignConfig``;
the rollout, teacher and training loop come later.
"""

from policylong.align.objective import (
    aggregate,
    aggregation_count,
    clipped_policy_loss,
    dgrpo_loss,
    group_advantages,
    kl_estimate,
    rollout_advantages,
    teacher_advantage,
    truncated_is_weight,
)

__all__ = [
    "aggregate",
    "aggregation_count",
    "clipped_policy_loss",
    "dgrpo_loss",
    "group_advantages",
    "kl_estimate",
    "rollout_advantages",
    "teacher_advantage",
    "truncated_is_weight",
]
