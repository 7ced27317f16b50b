"""Entropy kernels for screening and evaluation, the policy head for alignment (installed as
``policylong.kernels``).

``logits_entropy``, ``fused_linear_entropy``, ``entropy_reduction`` and ``fused_linear_policy``
are the contract of docs/design.md; every path builds logits one tile at a time, never
``[tokens × vocab]`` at once. One op per module, its float64 reference beside it:
:mod:`.partials` (softmax partials and their tensor-parallel combination),
:mod:`.linear_entropy` (+ its Triton kernel, :mod:`.linear_entropy_triton`),
:mod:`.logits_entropy`, :mod:`.entropy_reduction`,
:mod:`.linear_policy` (log-prob, entropy and exact KL to a teacher, with its backward; + its
Triton kernels, :mod:`.linear_policy_triton`);
:mod:`.dispatch` picks the backend (``backend=`` or ``POLICYLONG_ENTROPY_BACKEND``).
"""

from .dispatch import BACKENDS, HAS_TRITON, pick_backend
from .entropy_reduction import entropy_reduction, entropy_reduction_ref
from .linear_entropy import (
    fused_linear_entropy,
    fused_linear_entropy_nll,
    fused_linear_stats,
    linear_entropy_partials,
    linear_entropy_ref,
)
from .linear_policy import fused_linear_policy, linear_policy_ref
from .logits_entropy import logits_entropy, logits_entropy_ref
from .partials import combine_partials, finalize_partials, vocab_shard_offset

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "combine_partials",
    "entropy_reduction",
    "entropy_reduction_ref",
    "finalize_partials",
    "fused_linear_entropy",
    "fused_linear_entropy_nll",
    "fused_linear_policy",
    "fused_linear_stats",
    "linear_entropy_partials",
    "linear_entropy_ref",
    "linear_policy_ref",
    "logits_entropy",
    "logits_entropy_ref",
    "pick_backend",
    "vocab_shard_offset",
]
