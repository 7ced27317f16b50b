"""Alignment (``policylong align``): dGRPO and its baselines on the live Megatron policy.

``objective``: the loss, configured by ``policylong.config.AlignConfig``; ``rollout``: prompts,
KV-cached rollouts, rewards, teacher and reference scorers; ``loop``: ``run_align(cfg)``, what
``policylong align`` runs (``plan_align(cfg)`` checks every input first, building nothing).
"""

from policylong.align.loop import plan_align, run_align
from policylong.align.objective import (
    aggregate,
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
    "clipped_policy_loss",
    "dgrpo_loss",
    "group_advantages",
    "kl_estimate",
    "plan_align",
    "run_align",
    "rollout_advantages",
    "teacher_advantage",
    "truncated_is_weight",
]
