"""Per-token entropy from logits, or straight from hidden states and the LM-head weight.

Screening needs ``H(x_i | x_<i) = -Σ_v p_v log p_v`` at every position, and the NLL of the
actual token for the guard. At the Qwen2.5 vocabulary (151,936) one 2K-token document has 311M
logits (1.2 GB in float32), so nothing here builds ``[tokens × vocab]`` at once: logits exist one
``[row_chunk × vocab_chunk]`` tile at a time and fold into three running partials per row,

    m = max_v l_v,   s = Σ_v exp(l_v - m),   t = Σ_v exp(l_v - m) · l_v,
    H = m + log s - t / s,            logsumexp = m + log s,

which also combine across tensor-parallel vocab shards (max, then rescaled sums; the
formulation of verl's ``_VocabParallelEntropy``). The collectives sit in
:func:`combine_partials`, which takes an explicit ``tp_group``.

Backends: the chunked PyTorch path below runs everywhere (CPU, CI); fused Triton kernels slot
in behind :func:`fused_linear_entropy` / :func:`logits_entropy` on CUDA (separate issue).
"""

from __future__ import annotations

import torch

ROW_CHUNK = 1024
"""Rows per tile: 1024 × 8192 float32 logits is a 32 MB tile."""

VOCAB_CHUNK = 8192
"""Vocabulary entries per tile (151,936 = 18.5 tiles)."""


# -- references (float64, full logits: tests and benchmarks only) -----------------------------


def logits_entropy_ref(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of ``logits [n, v]`` in float64 (``-(softmax · log_softmax).sum``)."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    p = lp.exp()
    return -(torch.where(p > 0, p * lp, torch.zeros_like(lp))).sum(-1)


def linear_entropy_ref(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None = None
):
    """Float64 entropy (and NLL of ``targets``) of ``hidden [n, d] @ weight [v, d]ᵀ``."""
    logits = hidden.double() @ weight.double().T
    h = logits_entropy_ref(logits)
    if targets is None:
        return h
    nll = torch.logsumexp(logits, -1) - logits.gather(1, targets.long()[:, None])[:, 0]
    return h, nll


# -- partials ----------------------------------------------------------------------------------


def _tile_partials(logits: torch.Tensor):
    """(m, s, t) of a float32 tile ``[rows, cols]``; -inf entries contribute nothing."""
    m = logits.amax(-1)
    safe_m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(logits - safe_m[:, None])
    s = e.sum(-1)
    t = torch.where(e > 0, e * logits, torch.zeros_like(e)).sum(-1)
    return m, s, t


def merge_partials(a, b):
    """Merge the partials of two disjoint vocabulary ranges."""
    m1, s1, t1 = a
    m2, s2, t2 = b
    m = torch.maximum(m1, m2)
    safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    c1 = torch.where(torch.isfinite(m1), torch.exp(m1 - safe), torch.zeros_like(m1))
    c2 = torch.where(torch.isfinite(m2), torch.exp(m2 - safe), torch.zeros_like(m2))
    return m, s1 * c1 + s2 * c2, t1 * c1 + t2 * c2


def finalize_partials(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor):
    """(entropy, logsumexp) from the partials."""
    lse = m + torch.log(s)
    return lse - t / s, lse


def combine_partials(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, tp_group=None):
    """Combine per-shard partials across the vocab-parallel group (identity without one).

    Each rank holds (m, s, t) over its vocab shard; after an all-reduce MAX of m the rescaled
    sums are all-reduced: two collectives of [n] floats, never a vocab-sized one.
    """
    if tp_group is None or _group_size(tp_group) == 1:
        return m, s, t
    import torch.distributed as dist

    gm = m.clone()
    dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=tp_group)
    c = torch.where(torch.isfinite(m), torch.exp(m - gm), torch.zeros_like(m))
    st = torch.stack([s * c, t * c])
    dist.all_reduce(st, op=dist.ReduceOp.SUM, group=tp_group)
    return gm, st[0], st[1]


def _group_size(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group=group)


def vocab_shard_offset(v_local: int, d: int, tp_group=None) -> int:
    """First vocabulary id of this rank's shard; checks that every shard has the same ``d``."""
    if tp_group is None or _group_size(tp_group) == 1:
        return 0
    import torch.distributed as dist

    size = _group_size(tp_group)
    mine = torch.tensor([v_local, d], dtype=torch.long)
    allv = [torch.zeros_like(mine) for _ in range(size)]
    dist.all_gather(allv, mine, group=tp_group)
    dims = {int(x[1]) for x in allv}
    if len(dims) != 1:
        raise ValueError(
            f"vocab-parallel entropy: the tp_group's weight shards disagree on the "
            f"hidden dim ({sorted(dims)})"
        )
    rank = dist.get_rank(group=tp_group)
    return int(sum(int(x[0]) for x in allv[:rank]))


# -- input checks ------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_linear(hidden: torch.Tensor, weight: torch.Tensor) -> None:
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
        if x.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden on {hidden.device} but weight on {weight.device}")


# -- chunked PyTorch path ----------------------------------------------------------------------


def linear_entropy_partials(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    row_chunk: int = ROW_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
):
    """Partials (m, s, t) of ``hidden [n, d] @ weight [v, d]ᵀ`` over this shard, float32 [n].

    Peak extra memory: one ``[row_chunk, vocab_chunk]`` tile plus 3n floats.
    """
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
                part = _tile_partials(tile)
                cur = (m[rs : rs + row_chunk], s[rs : rs + row_chunk], t[rs : rs + row_chunk])
                mm, ss, tt = merge_partials(cur, part)
                m[rs : rs + row_chunk], s[rs : rs + row_chunk], t[rs : rs + row_chunk] = mm, ss, tt
    return m, s, t


def _target_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    tp_group=None,
) -> torch.Tensor:
    """Logit of each row's target token; rows whose target lives on another shard give 0
    locally, and the all-reduce SUM over ``tp_group`` completes them."""
    v_local = weight.shape[0]
    local = targets.long() - vocab_start
    inside = (local >= 0) & (local < v_local)
    idx = torch.where(inside, local, torch.zeros_like(local))
    with torch.no_grad():
        tl = (hidden.float() * weight[idx].float()).sum(-1)
    tl = torch.where(inside, tl, torch.zeros_like(tl))
    if tp_group is not None and _group_size(tp_group) > 1:
        import torch.distributed as dist

        dist.all_reduce(tl, op=dist.ReduceOp.SUM, group=tp_group)
    return tl


def logits_entropy(logits: torch.Tensor, vocab_chunk: int = VOCAB_CHUNK) -> torch.Tensor:
    """Entropy of each row of ``logits [n, v]`` (any float dtype) as float32 [n]."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [n, v], got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOATS:
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits_entropy: empty input, shape {tuple(logits.shape)}")
    n = logits.shape[0]
    m = torch.full((n,), float("-inf"), dtype=torch.float32, device=logits.device)
    s = torch.zeros(n, dtype=torch.float32, device=logits.device)
    t = torch.zeros(n, dtype=torch.float32, device=logits.device)
    for vs in range(0, logits.shape[1], vocab_chunk):
        m, s, t = merge_partials(
            (m, s, t), _tile_partials(logits[:, vs : vs + vocab_chunk].float())
        )
    h, _ = finalize_partials(m, s, t)
    return h


def fused_linear_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tp_group=None,
    row_chunk: int = ROW_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
) -> torch.Tensor:
    """Entropy of ``softmax(hidden [n, d] @ weight [v_local, d]ᵀ)`` as float32 [n].

    ``weight`` is this rank's vocab shard; with a ``tp_group`` the partials combine across the
    group so every rank returns the entropy over the full vocabulary.
    """
    h, _ = fused_linear_entropy_nll(hidden, weight, None, tp_group, row_chunk, vocab_chunk)
    return h


def fused_linear_entropy_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None,
    tp_group=None,
    row_chunk: int = ROW_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
):
    """(entropy float32 [n], NLL of ``targets [n]`` float32 [n] or None), one pass over vocab.

    ``targets`` are global vocabulary ids; with a ``tp_group`` the owning shard contributes
    the target logit.
    """
    _check_linear(hidden, weight)
    if targets is not None and targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be [n] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if hidden.shape[0] == 0:
        raise ValueError("fused_linear_entropy: empty input (hidden has 0 rows)")
    vocab_start = vocab_shard_offset(weight.shape[0], weight.shape[1], tp_group)
    m, s, t = linear_entropy_partials(hidden, weight, row_chunk, vocab_chunk)
    m, s, t = combine_partials(m, s, t, tp_group)
    h, lse = finalize_partials(m, s, t)
    if targets is None:
        return h, None
    tl = _target_logits(hidden, weight, targets, vocab_start, tp_group)
    return h, lse - tl
