"""Softmax statistics of a row of logits as three running partials, and their combination.

Logits exist one ``[rows × vocab_chunk]`` tile at a time and fold into, per row,

    m = max_v l_v,   s = Σ_v exp(l_v - m),   t = Σ_v exp(l_v - m) · l_v,
    H = m + log s - t / s,            logsumexp = m + log s,

which merge across disjoint vocabulary ranges (max, then rescaled sums) and so across
tensor-parallel vocab shards (the formulation of verl's ``_VocabParallelEntropy``). The math
here is local; the collectives sit in the functions that take an explicit ``tp_group``.
"""

from __future__ import annotations

import torch


def partials_ref(logits: torch.Tensor):
    """Float64 (m, s, t) of each row of ``logits [n, v]`` (tests only: full logits)."""
    x = logits.double()
    m = x.amax(-1)
    e = torch.exp(x - torch.where(torch.isfinite(m), m, torch.zeros_like(m))[:, None])
    return m, e.sum(-1), torch.where(e > 0, e * x, torch.zeros_like(e)).sum(-1)


def tile_partials(logits: torch.Tensor):
    """(m, s, t) of a float32 tile ``[rows, cols]``; -inf entries contribute nothing."""
    m = logits.amax(-1)
    safe_m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(logits - safe_m[:, None])
    s = e.sum(-1)
    t = torch.where(e > 0, e * logits, torch.zeros_like(e)).sum(-1)
    return m, s, t


def _rescale(m_part: torch.Tensor, m_all: torch.Tensor) -> torch.Tensor:
    """exp(m_part - m_all), and 0 for a part that is empty (-inf) so far."""
    return torch.where(torch.isfinite(m_part), torch.exp(m_part - m_all), torch.zeros_like(m_part))


def merge_partials(a, b):
    """Merge the partials of two disjoint vocabulary ranges."""
    m1, s1, t1 = a
    m2, s2, t2 = b
    m = torch.maximum(m1, m2)
    c1, c2 = _rescale(m1, m), _rescale(m2, m)
    return m, s1 * c1 + s2 * c2, t1 * c1 + t2 * c2


def finalize_partials(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor):
    """(entropy, logsumexp) from the partials."""
    lse = m + torch.log(s)
    return lse - t / s, lse


def target_logits(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_start: int
) -> torch.Tensor:
    """Logit of each row's target (a global vocabulary id) on this shard, float32 [n]; rows
    whose target lives on another shard give 0 (summed over the group by :func:`sum_over`)."""
    v_local = weight.shape[0]
    local = targets.long() - vocab_start
    inside = (local >= 0) & (local < v_local)
    idx = torch.where(inside, local, torch.zeros_like(local))
    with torch.no_grad():
        tl = (hidden.float() * weight[idx].float()).sum(-1)
    return torch.where(inside, tl, torch.zeros_like(tl))


# -- collectives: an explicit tp_group, identity without one -----------------------------------


def _group_size(tp_group) -> int:
    if tp_group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group=tp_group)


def combine_partials(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, tp_group=None):
    """Combine per-shard partials across the vocab-parallel group.

    Each rank holds (m, s, t) over its vocab shard; after an all-reduce MAX of m the rescaled
    sums are all-reduced: two collectives of [n] floats, never a vocab-sized one.
    """
    if _group_size(tp_group) == 1:
        return m, s, t
    import torch.distributed as dist

    gm = m.clone()
    dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=tp_group)
    c = _rescale(m, gm)
    st = torch.stack([s * c, t * c])
    dist.all_reduce(st, op=dist.ReduceOp.SUM, group=tp_group)
    return gm, st[0], st[1]


def sum_over(x: torch.Tensor, tp_group=None) -> torch.Tensor:
    """All-reduce SUM of ``x`` (in place) over the group: shard contributions to full rows."""
    if _group_size(tp_group) > 1:
        import torch.distributed as dist

        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=tp_group)
    return x


def vocab_shard_offset(v_local: int, d: int, tp_group=None) -> int:
    """First vocabulary id of this rank's shard; checks that every shard has the same ``d``."""
    size = _group_size(tp_group)
    if size == 1:
        return 0
    import torch.distributed as dist

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
