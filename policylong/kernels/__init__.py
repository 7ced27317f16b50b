"""Entropy kernels for screening (installed as ``policylong.kernels``).

``logits_entropy``, ``fused_linear_entropy`` and ``entropy_reduction`` are the contract of
DESIGN.md; every path builds logits one tile at a time, never ``[tokens × vocab]`` at once.
"""

from .entropy import (
    fused_linear_entropy,
    fused_linear_entropy_nll,
    linear_entropy_ref,
    logits_entropy,
    logits_entropy_ref,
)
from .entropy_reduction import entropy_reduction, entropy_reduction_ref

__all__ = [
    "entropy_reduction",
    "entropy_reduction_ref",
    "fused_linear_entropy",
    "fused_linear_entropy_nll",
    "linear_entropy_ref",
    "logits_entropy",
    "logits_entropy_ref",
]
