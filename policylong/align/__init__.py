"""Alignment (``policylong align``): dGRPO and its baselines on the live Megatron policy.

Built so far: the objective (``objective``), configured by ``policylong.config.AlignConfig``;
the rollout, teacher and training loop come later.
"""

from policylong.align.objective import (
    aggregate,
    clipped_policy_loss,
    dgrpo_loss,
    group_advantages,
    kl_estimate,
    teacher_advantage,
    truncated_is_weight,
)

__all__ = [
    "aggregate",
    "clipped_policy_loss",
    "dgrpo_loss",
    "group_advantages",
    "kl_estimate",
    "teacher_advantage",
    "truncated_is_weight",
]
