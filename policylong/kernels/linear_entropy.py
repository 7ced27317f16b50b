"""Fused linear entropy: per-token entropy (and NLL, max logit) of ``hidden @ weightᵀ``.

Screening needs ``H(x_i | x_<i)`` at every position and the NLL of the actual token; at the
Qwen2.5 vocabulary (151,936) one 2K-token document has 311M logits (1.2 GB in float32), so
nothing here builds ``[tokens × vocab]``: logits exist one tile at a time and fold into the
partials of :mod:`.partials`. Two implementations (:mod:`.dispatch`): the chunked PyTorch path
below, and the Triton kernel of :mod:`.linear_entropy_triton`. With a ``tp_group`` the weight is
this rank's vocab shard and every rank gets the statistics over the full vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .dispatch import FLOATS, pick_backend
from .linear_entropy_triton import linear_entropy_partials_triton
from .logits_entropy import logits_entropy_ref
from .partials import (
    combine_partials,
    finalize_partials,
    merge_partials,
    sum_over,
    target_logits,
    tile_partials,
    vocab_shard_offset,
)

ROW_CHUNK = 1024
"""Rows per tile of the PyTorch path: 1024 × 8192 float32 logits is a 32 MB tile."""

VOCAB_CHUNK = 8192
"""Vocabulary entries per tile of the PyTorch path (151,936 = 18.5 tiles)."""


def linear_entropy_ref(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None = None
):
    """Float64 entropy (and NLL of ``targets``) of ``hidden [n, d] @ weight [v, d]ᵀ`` with
    full logits (tests and benchmarks only)."""
    logits = hidden.double() @ weight.double().T
    h = logits_entropy_ref(logits)
    if targets is None:
        return h
    nll = torch.logsumexp(logits, -1) - logits.gather(1, targets.long()[:, None])[:, 0]
    return h, nll


def linear_entropy_partials(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    row_chunk: int = ROW_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
):
    """Partials (m, s, t) of ``hidden [n, d] @ weight [v, d]ᵀ`` over this shard, float32 [n],
    by the chunked PyTorch path. Peak extra memory: one ``[row_chunk, vocab_chunk]`` tile."""
    n = hidden.shape[0]
    dev = hidden.device
    m = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
    s = torch.zeros(n, dtype=torch.float32, device=dev)
    t = torch.zeros(n, dtype=torch.float32, device=dev)
    with torch.no_grad():
        for vs in range(0, weight.shape[0], vocab_chunk):
            wb = weight[vs : vs + vocab_chunk].float()  # cast once per vocab block
            for rs in range(0, n, row_chunk):
                tile = hidden[rs : rs + row_chunk].float() @ wb.T
                rows = slice(rs, rs + row_chunk)
                m[rows], s[rows], t[rows] = merge_partials(
                    (m[rows], s[rows], t[rows]), tile_partials(tile)
                )
    return m, s, t


def _check_linear(hidden: torch.Tensor, weight: torch.Tensor, targets) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [n, d], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [v_local, d], got shape {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden dim {hidden.shape[1]} != weight dim {weight.shape[1]} "
            f"(hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)})"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has no vocabulary rows")
    for name, x in (("hidden", hidden), ("weight", weight)):
        if x.dtype not in FLOATS:
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast one so "
            "they match (accumulation is float32 either way)"
        )
    if weight.stride(-1) != 1 or (weight.shape[0] > 1 and weight.stride(0) != weight.shape[1]):
        raise ValueError(
            f"weight must be contiguous (strides {tuple(weight.stride())}); pass "
            "weight.contiguous(): a strided head would be re-read per tile"
        )
    if hidden.device != weight.device:
        raise ValueError(f"hidden on {hidden.device} but weight on {weight.device}")
    if targets is not None and targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be [n] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if hidden.shape[0] == 0:
        raise ValueError("fused_linear_entropy: empty input (hidden has 0 rows)")


def _linear_stats(hidden, weight, targets, tp_group, row_chunk, vocab_chunk, backend):
    """(entropy, logsumexp, max logit, target logit or None), float32 [n] each, over the
    full vocabulary of the group: the one implementation behind the public functions."""
    _check_linear(hidden, weight, targets)
    vocab_start = vocab_shard_offset(weight.shape[0], weight.shape[1], tp_group)
    if pick_backend(hidden, backend) == "triton":
        m, s, t = linear_entropy_partials_triton(hidden, weight)
    else:
        m, s, t = linear_entropy_partials(hidden, weight, row_chunk, vocab_chunk)
    m, s, t = combine_partials(m, s, t, tp_group)
    h, lse = finalize_partials(m, s, t)
    if targets is None:
        return h, lse, m, None
    tl = sum_over(target_logits(hidden, weight, targets, vocab_start), tp_group)
    return h, lse, m, tl


def fused_linear_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tp_group=None,
    row_chunk: int = ROW_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
    backend: str = "auto",
) -> torch.Tensor:
    """Entropy of ``softmax(hidden [n, d] @ weight [v_local, d]ᵀ)`` as float32 [n]."""
    return _linear_stats(hidden, weight, None, tp_group, row_chunk, vocab_chunk, backend)[0]


def fused_linear_entropy_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None,
    tp_group=None,
    row_chunk: int = ROW_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
    backend: str = "auto",
):
    """(entropy float32 [n], NLL of ``targets [n]`` float32 [n] or None), one pass over vocab.

    ``targets`` are global vocabulary ids; with a ``tp_group`` the owning shard contributes
    the target logit.
    """
    h, lse, _, tl = _linear_stats(
        hidden, weight, targets, tp_group, row_chunk, vocab_chunk, backend
    )
    return h, (None if tl is None else lse - tl)


class LinearStats(NamedTuple):
    """Per-row statistics of ``softmax(hidden @ weight.T)`` over the full vocabulary, float32 [n]
    each."""

    entropy: torch.Tensor
    nll: torch.Tensor
    """NLL of the row's target token."""
    max_logit: torch.Tensor
    target_logit: torch.Tensor
    """The target's logit: the target is the top-1 token when it equals ``max_logit`` (up to
    the rounding of two float32 dot products; ``logsumexp - nll`` would add a subtraction's)."""


def fused_linear_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    tp_group=None,
    backend: str = "auto",
) -> LinearStats:
    """Entropy, target NLL, max logit and target logit of ``hidden [n, d] @ weight [v_local,
    d]ᵀ`` over the full vocabulary (after the tensor-parallel combination), in one pass."""
    if targets is None:
        raise ValueError("fused_linear_stats needs targets (fused_linear_entropy does not)")
    h, lse, m, tl = _linear_stats(
        hidden, weight, targets, tp_group, ROW_CHUNK, VOCAB_CHUNK, backend
    )
    return LinearStats(h, lse - tl, m, tl)
