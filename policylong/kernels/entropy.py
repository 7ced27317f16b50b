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

Backends (``backend=`` or ``POLICYLONG_ENTROPY_BACKEND``): ``torch``, the chunked PyTorch path,
runs everywhere; ``triton``, two fused kernels, is what ``auto`` picks on CUDA, and runs on CPU
under the Triton interpreter (``TRITON_INTERPRET=1``) for tests.
"""

from __future__ import annotations

import os

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


# -- Triton kernels ----------------------------------------------------------------------------
#
# Both kernels fold vocabulary tiles into the running (m, s, t) partials of the chunked path,
# so they return exactly what ``linear_entropy_partials`` / the chunked logits path return and
# share ``combine_partials`` for tensor parallelism. On CUDA they are compiled; on CPU they run
# under the Triton interpreter (``TRITON_INTERPRET=1``, tests only: it is slow).

try:  # triton is optional: CPU installs without it keep the chunked PyTorch path
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None
    HAS_TRITON = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if HAS_TRITON:
    LOG2E = tl.constexpr(1.4426950408889634)

    @triton.jit
    def _ex2_ftz(x):
        """2^x with one MUFU.EX2 (``ex2.approx.ftz.f32``). ``tl.exp`` lowers to the non-ftz
        ``ex2.approx.f32``, which sm_90 SASS wraps in a range test and two predicated
        multiplies (per element: FSETP + 2 FMUL + MUFU, counted with cuobjdump); flushing
        results below 2^-126 to 0 changes nothing here (they are < 1e-38 of a sum ≥ 1).
        CUDA only: the interpreter has no inline PTX."""
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )

    @triton.jit
    def _exp_shifted(x, ref, FAST_EXP: tl.constexpr):
        """exp(x - ref), ``ref`` broadcast to x's rank; with FAST_EXP one ex2.approx.ftz per
        element ((x - m) · log2(e) is exactly 0 at the max, so p = 1 there exactly)."""
        if FAST_EXP:
            return _ex2_ftz((x - ref) * LOG2E)
        return tl.exp(x - ref)

    @triton.jit
    def _raise_max(m_i, tmax, s, t):
        """Raise the row max ``m_i [BLOCK_R]`` to include ``tmax`` and rescale the sums
        ``s``, ``t [BLOCK_R, k]`` to it (a row that is -inf so far has empty sums: alpha 0)."""
        m_new = tl.maximum(m_i, tmax)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.where(m_i == float("-inf"), 0.0, tl.exp(m_i - safe))
        return m_new, s * alpha[:, None], t * alpha[:, None]

    @triton.jit
    def _fold_lane(x, m_i, s_v, t_v, LAZY: tl.constexpr, FAST_EXP: tl.constexpr):
        """Fold a float32 tile ``x [BLOCK_R, BLOCK_V]`` into per-lane sums ``s_v``, ``t_v``
        (same shape) and the row max ``m_i [BLOCK_R]``."""
        tmax = tl.max(x, 1)
        if LAZY:
            # rescale only in tiles that raise some row's max: after the first tiles of a
            # row that is rare (tile k of iid logits holds a new max with probability 1/k)
            if tl.sum((tmax > m_i).to(tl.int32), 0) > 0:
                m_i, s_v, t_v = _raise_max(m_i, tmax, s_v, t_v)
        else:
            m_i, s_v, t_v = _raise_max(m_i, tmax, s_v, t_v)
        p = _exp_shifted(x, tl.where(m_i == float("-inf"), 0.0, m_i)[:, None], FAST_EXP)
        s_v += p
        # -inf logits have p = 0; clamping them to -FLT_MAX keeps p · x at 0 (not NaN) with
        # one max instead of a compare and a select
        t_v += p * tl.maximum(x, -3.4e38)
        return m_i, s_v, t_v

    @triton.jit
    def _fold_group_exact(x, m_i, s_g, t_g, FAST_EXP: tl.constexpr):
        """:func:`_fold_lane` (lazy) for a tile ``x [BLOCK_R, BLOCK_V / G, G]`` whose last axis
        is G neighbouring elements that one thread holds: the sums ``s_g``, ``t_g``
        ``[BLOCK_R, BLOCK_V / G]`` add the G elements in registers first, so each accumulator
        takes G times fewer registers than per-element sums."""
        tmax = tl.max(tl.max(x, 2), 1)
        if tl.sum((tmax > m_i).to(tl.int32), 0) > 0:
            m_i, s_g, t_g = _raise_max(m_i, tmax, s_g, t_g)
        p = _exp_shifted(x, tl.where(m_i == float("-inf"), 0.0, m_i)[:, None, None], FAST_EXP)
        s_g += tl.sum(p, 2)
        t_g += tl.sum(p * tl.maximum(x, -3.4e38), 2)
        return m_i, s_g, t_g

    @triton.jit
    def _deferred_sums(x, m_i, FAST_EXP: tl.constexpr):
        """Group sums of p = exp(x - m) and of p · x (unclamped) over the last axis of x."""
        # x·log2(e) − m·log2(e) is one FFMA (vs FADD + FMUL): p at x = m is 2^r with r the
        # rounding of m·log2(e), |r| ≤ 4e-6 for |m| < 64, the same factor for every logit
        # of the tile; exactness cases (one-hot: the hot logit sets m in the exact path)
        # are unaffected
        mc = (m_i * LOG2E)[:, None, None]
        if FAST_EXP:
            p = _ex2_ftz(x * LOG2E - mc)
        else:
            p = tl.exp2(x * LOG2E - mc)
        # no -inf clamp: a -inf logit makes its group's p · x NaN (0 · -inf), caught by the
        # caller
        return tl.sum(p, 2), tl.sum(p * x, 2)

    @triton.jit
    def _fold_group_deferred(x, x2, m_i, s_g, t_g, FAST_EXP: tl.constexpr, PAIRS: tl.constexpr):
        """:func:`_fold_group_exact` without the tile max; returns ``redo`` > 0 (and the sums
        untouched) when the tile must be folded the exact way instead. With ``PAIRS`` the
        tile comes as its even (``x``) and odd (``x2``) bf16 logits, ``[BLOCK_R, BLOCK_V / G,
        G / 2]`` each; otherwise ``x2`` is unused.

        ``m_i`` is a reference here, not the running max: the exact max of the first tile(s),
        raised only when a tile's group sums of exp(x - m_i) pass 2^20 (a logit more than ~14
        above it) or are NaN. s = Σ exp(x - m), t = Σ exp(x - m)·x and m + log s - t/s are the
        same for any reference m; one below the max by < 14.6 costs no float32 range (sums ≤
        2^20 · v) and, m being a logit of the row, nothing that matters underflows. Rows
        whose reference is still -inf (the first tile, an all -inf prefix) always redo, and
        so do tiles with a -inf logit: p · x is left unclamped here and their t sum is NaN.
        Saves the tile max (31 FMNMX + 5 shuffle-max per 32 elements on one warp) and the
        clamp (32 FMNMX) for 8 compares and one reduction of flags, and the shift and scale
        of the exponent fuse into one FFMA: 203 SASS instructions per 32 logits in this path
        (185 with PAIRS) against ~310 in the exact one (sm_90, Triton 3.6), in 64 registers."""
        redo = tl.sum((m_i == float("-inf")).to(tl.int32), 0)
        if redo == 0:
            gs, gt = _deferred_sums(x, m_i, FAST_EXP)
            if PAIRS:
                gs2, gt2 = _deferred_sums(x2, m_i, FAST_EXP)
                gs += gs2
                gt += gt2
            redo = tl.sum(tl.sum(tl.where((gs <= 1048576.0) & (gt == gt), 0, 1), 1), 0)
            if redo == 0:
                s_g += gs
                t_g += gt
        return m_i, s_g, t_g, redo

    @triton.jit
    def _logits_entropy_kernel(
        X,
        OUT_M,
        OUT_S,
        OUT_T,
        n,
        v,
        stride_x,
        v_per_split,
        n_splits,
        size_class,
        BLOCK_R: tl.constexpr,
        BLOCK_V: tl.constexpr,
        LANE: tl.constexpr,
        LAZY: tl.constexpr,
        STAGES: tl.constexpr,
        PROBE: tl.constexpr,
        TAIL: tl.constexpr,
        FAST_EXP: tl.constexpr = False,
        GROUP: tl.constexpr = False,
        DEFER: tl.constexpr = False,
        PAIRS: tl.constexpr = False,
    ):
        """Rows [pid*BLOCK_R, +BLOCK_R) of logits [n, v]: one streaming pass over v.

        ``LANE``: sums stay per lane ([BLOCK_R, BLOCK_V]) and reduce once at the end, one
        cross-warp reduction (the max) per tile instead of three. ``LAZY`` (with ``LANE``):
        the per-lane sums are rescaled only in tiles that raise some row's max. ``TAIL`` (with
        ``LANE``): whole tiles load without a mask (rows past n clamped to row n-1, discarded
        by the store) and only the last, ragged tile is masked (a compare and a select per
        element matter: a sum-only pass reads at copy speed on an H200, this one does not).
        ``GROUP`` (lazy, unmasked whole tiles): the tile is loaded as ``[BLOCK_R, BLOCK_V / G,
        G]``, G the elements of one thread's 16-byte load, and each group is added in
        registers before it reaches the per-lane sums ``[BLOCK_R, BLOCK_V / G]`` — per-element
        sums hold 64 of the 118 registers of the BLOCK_V = 1024 one-warp kernel, which caps an
        SM at 17 resident warps and so at 34 KB of loads in flight (sm_90 SASS). ``DEFER``
        (with ``GROUP``): whole tiles skip the tile max and the -inf clamp, taking exp against
        a checked reference (:func:`_fold_group_deferred`); ``PAIRS`` (with ``DEFER``, bf16
        rows 4-byte aligned) reads those tiles as int32 words of two logits.
        ``STAGES`` > 1 software-pipelines the loads (cp.async through shared memory: STAGES - 1
        tiles in flight per program, no registers). ``PROBE`` = 1 is a bandwidth
        probe for benchmarks only (sums x, no exp; its partials are not an entropy).

        The vocabulary can be cut into ``n_splits`` ranges of ``v_per_split`` (grid axis 1),
        each writing its partials to row ``pid_s`` of ``OUT_* [n_splits, n]``. ``size_class``
        only keys the autotuner.
        """
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        pid_s = tl.program_id(1)
        v0 = pid_s * v_per_split
        v1 = tl.minimum(v0 + v_per_split, v)
        rmask = rows < n
        base = X + rows.to(tl.int64)[:, None] * stride_x
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        s_i = tl.zeros([BLOCK_R], tl.float32)
        t_i = tl.zeros([BLOCK_R], tl.float32)
        if PROBE == 1:
            s_v = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
            for vs in tl.range(v0, v1, BLOCK_V, num_stages=STAGES):
                cols = vs + tl.arange(0, BLOCK_V)
                mask = rmask[:, None] & (cols < v1)[None, :]
                s_v += tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s_i = tl.sum(s_v, 1)
        elif GROUP:
            # one 16-byte load per thread: 8 bf16/fp16 or 4 fp32 (8 fp32 would split a group
            # over two threads: 44 more shuffles per tile in the sm_90 SASS)
            G: tl.constexpr = 128 // X.dtype.element_ty.primitive_bitwidth
            s_v = tl.zeros([BLOCK_R, BLOCK_V // G], tl.float32)
            t_v = tl.zeros([BLOCK_R, BLOCK_V // G], tl.float32)
            offs = (tl.arange(0, BLOCK_V // G)[:, None] * G + tl.arange(0, G)[None, :])[None]
            v_main = v0 + ((v1 - v0) // BLOCK_V) * BLOCK_V
            rows3 = rows[:, None, None]
            base_ld = X + tl.minimum(rows3, n - 1).to(tl.int64) * stride_x
            if PAIRS:
                # bf16 logits as int32 words of two: even logit = w << 16, odd = w & 0xFFFF0000
                offs_w = (tl.arange(0, BLOCK_V // G)[:, None] * (G // 2))[None]
                offs_w = offs_w + tl.arange(0, G // 2)[None, None, :]
                base_w = X.to(tl.pointer_type(tl.int32), bitcast=True) + tl.minimum(
                    rows3, n - 1
                ).to(tl.int64) * (stride_x // 2)
            for vs in tl.range(v0, v_main, BLOCK_V, num_stages=STAGES):
                if DEFER:
                    if PAIRS:
                        w = tl.load(base_w + (vs // 2 + offs_w))
                        lo = (w << 16).to(tl.float32, bitcast=True)
                        hi = (w & -65536).to(tl.float32, bitcast=True)
                    else:
                        lo = tl.load(base_ld + (vs + offs)).to(tl.float32)
                        hi = lo
                    m_i, s_v, t_v, redo = _fold_group_deferred(
                        lo, hi, m_i, s_v, t_v, FAST_EXP, PAIRS
                    )
                    if redo > 0:
                        # load the tile again (from cache) rather than keep it live through the
                        # deferred fold: that took 93 registers instead of 64 (sm_90 SASS)
                        x = tl.load(base_ld + (vs + offs)).to(tl.float32)
                        m_i, s_v, t_v = _fold_group_exact(x, m_i, s_v, t_v, FAST_EXP)
                else:
                    x = tl.load(base_ld + (vs + offs)).to(tl.float32)
                    m_i, s_v, t_v = _fold_group_exact(x, m_i, s_v, t_v, FAST_EXP)
            for vs in tl.range(v_main, v1, BLOCK_V, num_stages=STAGES):
                cols = vs + offs
                mask = (rows3 < n) & (cols < v1)
                x = tl.load(base_ld + cols, mask=mask, other=float("-inf")).to(tl.float32)
                # one ragged tile: always the exact way
                m_i, s_v, t_v = _fold_group_exact(x, m_i, s_v, t_v, FAST_EXP)
            s_i = tl.sum(s_v, 1)
            t_i = tl.sum(t_v, 1)
        elif LANE:
            s_v = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
            t_v = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
            v_main = v0
            if TAIL:
                v_main = v0 + ((v1 - v0) // BLOCK_V) * BLOCK_V
                base_ld = X + tl.minimum(rows, n - 1).to(tl.int64)[:, None] * stride_x
                for vs in tl.range(v0, v_main, BLOCK_V, num_stages=STAGES):
                    cols = vs + tl.arange(0, BLOCK_V)
                    x = tl.load(base_ld + cols[None, :]).to(tl.float32)
                    m_i, s_v, t_v = _fold_lane(x, m_i, s_v, t_v, LAZY, FAST_EXP)
            for vs in tl.range(v_main, v1, BLOCK_V, num_stages=STAGES):
                cols = vs + tl.arange(0, BLOCK_V)
                mask = rmask[:, None] & (cols < v1)[None, :]
                x = tl.load(base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
                m_i, s_v, t_v = _fold_lane(x, m_i, s_v, t_v, LAZY, FAST_EXP)
            s_i = tl.sum(s_v, 1)
            t_i = tl.sum(t_v, 1)
        else:
            for vs in tl.range(v0, v1, BLOCK_V, num_stages=STAGES):
                cols = vs + tl.arange(0, BLOCK_V)
                mask = rmask[:, None] & (cols < v1)[None, :]
                x = tl.load(base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m_i, tl.max(x, 1))
                # -inf logits (masked vocab) contribute nothing; a row that is -inf so far
                # keeps m = -inf without producing NaN
                safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.where(m_i == float("-inf"), 0.0, tl.exp(m_i - safe))
                p = tl.exp(x - safe[:, None])
                xs = tl.where(p > 0, x, 0.0)
                s_i = s_i * alpha + tl.sum(p, 1)
                t_i = t_i * alpha + tl.sum(p * xs, 1)
                m_i = m_new
        off = pid_s * n + rows
        tl.store(OUT_M + off, m_i, mask=rmask)
        tl.store(OUT_S + off, s_i, mask=rmask)
        tl.store(OUT_T + off, t_i, mask=rmask)

    @triton.jit
    def _merge_splits_kernel(PM, PS, PT, OUT_M, OUT_S, OUT_T, n, n_splits, BLOCK: tl.constexpr):
        """Merge the partials ``P* [n_splits, n]`` of disjoint vocabulary ranges into
        ``OUT_* [n]`` (the local form of :func:`combine_partials`), one launch: the PyTorch
        form is six, ~25 µs, a tenth of the logits kernel at n = 2K."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        rmask = rows < n
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        for sp in range(0, n_splits):
            m = tl.maximum(m, tl.load(PM + sp * n + rows, mask=rmask, other=float("-inf")))
        safe = tl.where(m == float("-inf"), 0.0, m)
        s = tl.zeros([BLOCK], tl.float32)
        t = tl.zeros([BLOCK], tl.float32)
        for sp in range(0, n_splits):
            pm = tl.load(PM + sp * n + rows, mask=rmask, other=float("-inf"))
            c = tl.where(pm == float("-inf"), 0.0, tl.exp(pm - safe))
            s += tl.load(PS + sp * n + rows, mask=rmask, other=0.0) * c
            t += tl.load(PT + sp * n + rows, mask=rmask, other=0.0) * c
        tl.store(OUT_M + rows, m, mask=rmask)
        tl.store(OUT_S + rows, s, mask=rmask)
        tl.store(OUT_T + rows, t, mask=rmask)

    @triton.jit
    def _fold_tile(acc, cmask, m_i, s_i, t_i):
        """Fold one float32 logit tile ``acc [BLOCK_M, BLOCK_N]`` (valid columns ``cmask``)
        into the running partials; every tile holds at least one valid column."""
        logits = tl.where(cmask[None, :], acc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        alpha = tl.exp(m_i - m_new)  # m_i = -inf on the first tile: alpha = 0
        p = tl.exp(logits - m_new[:, None])
        # masked columns have p = 0 and a finite acc (zero padding, or a logit of the next
        # split), so p * acc needs no second mask
        s_i = s_i * alpha + tl.sum(p, 1)
        t_i = t_i * alpha + tl.sum(p * acc, 1)
        return m_new, s_i, t_i

    @triton.jit
    def _dot_acc(h, w, acc, IEEE: tl.constexpr, DOT_F32: tl.constexpr):
        """acc + h @ wᵀ for operand tiles h [BLOCK_M, BLOCK_K], w [BLOCK_N, BLOCK_K]."""
        if DOT_F32:  # the interpreter's bf16 dot is wrong (numpy has no bf16)
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:  # float32 inputs: no TF32, the 1e-5 contract needs full precision
            return tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        return tl.dot(h, tl.trans(w), acc)

    @triton.jit
    def _linear_entropy_kernel(
        H,
        W,
        OUT_M,
        OUT_S,
        OUT_T,
        n,
        v,
        d,
        stride_h,
        stride_w,
        v_per_split,
        n_splits,
        size_class,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr,
        DOT_F32: tl.constexpr,
        GROUP_M: tl.constexpr,
        TMA: tl.constexpr,
        FLATTEN: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):
        """Rows [pid_m*BLOCK_M, +BLOCK_M) × vocab split pid_s: logits exist one
        [BLOCK_M, BLOCK_N] register tile at a time and fold into (m, s, t).

        ``TMA``: operand tiles come through tensor descriptors made on the device (Hopper's
        bulk tensor copy; out-of-range rows and columns are zero-filled by the copy engine),
        else through pointer loads. ``FLATTEN`` lets the compiler flatten the (vocab tile, k)
        loop nest so the software pipeline runs across vocab tiles instead of draining and
        refilling once per tile. ``EVEN_K``: d is a multiple of BLOCK_K (no k mask).
        """
        # 1D grid in groups of GROUP_M row blocks × all splits: the programs resident at one
        # time share GROUP_M hidden blocks (8 × 128 × 4096 bf16 = 8 MB) and read ~132/GROUP_M
        # weight tiles, which both stay in L2; with one row block per resident program the
        # 132 hidden blocks (132 MB at d = 4096) would be re-read from HBM for every vocab tile
        pid = tl.program_id(0)
        row_blocks = tl.cdiv(n, BLOCK_M)
        per_group = GROUP_M * n_splits
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(row_blocks - first_m, GROUP_M)
        local = pid % per_group
        pid_m = first_m + local % group_rows
        pid_s = local // group_rows
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n
        v0 = pid_s * v_per_split
        v1 = tl.minimum(v0 + v_per_split, v)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s_i = tl.zeros([BLOCK_M], tl.float32)
        t_i = tl.zeros([BLOCK_M], tl.float32)
        if TMA:
            h_desc = tl.make_tensor_descriptor(
                H, shape=[n, d], strides=[stride_h, 1], block_shape=[BLOCK_M, BLOCK_K]
            )
            w_desc = tl.make_tensor_descriptor(
                W, shape=[v, d], strides=[stride_w, 1], block_shape=[BLOCK_N, BLOCK_K]
            )
            for vs in tl.range(v0, v1, BLOCK_N, flatten=FLATTEN):
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for ks in range(0, d, BLOCK_K):
                    h = h_desc.load([pid_m * BLOCK_M, ks])
                    w = w_desc.load([vs, ks])
                    acc = _dot_acc(h, w, acc, IEEE, DOT_F32)
                cols = vs + tl.arange(0, BLOCK_N)
                m_i, s_i, t_i = _fold_tile(acc, cols < v1, m_i, s_i, t_i)
        else:
            # rows past n and columns past v are clamped to valid addresses rather than masked
            # (their logits are discarded by the column mask and the row-masked store), so
            # with EVEN_K the operand loads carry no predicate
            rows_ld = tl.minimum(rows, n - 1)
            h_base = H + rows_ld.to(tl.int64)[:, None] * stride_h
            for vs in tl.range(v0, v1, BLOCK_N, flatten=FLATTEN):
                cols = vs + tl.arange(0, BLOCK_N)
                w_base = W + tl.minimum(cols, v - 1).to(tl.int64)[:, None] * stride_w
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for ks in range(0, d, BLOCK_K):
                    k = ks + tl.arange(0, BLOCK_K)
                    if EVEN_K:
                        h = tl.load(h_base + k[None, :])
                        w = tl.load(w_base + k[None, :])
                    else:
                        kmask = (k < d)[None, :]
                        h = tl.load(h_base + k[None, :], mask=kmask, other=0.0)
                        w = tl.load(w_base + k[None, :], mask=kmask, other=0.0)
                    acc = _dot_acc(h, w, acc, IEEE, DOT_F32)
                m_i, s_i, t_i = _fold_tile(acc, cols < v1, m_i, s_i, t_i)
        off = pid_s * n + rows
        tl.store(OUT_M + off, m_i, mask=rmask)
        tl.store(OUT_S + off, s_i, mask=rmask)
        tl.store(OUT_T + off, t_i, mask=rmask)

    def _even_k(args) -> bool:
        return args["d"] % args["BLOCK_K"] == 0

    def _prune_linear(configs, named_args, **kwargs):
        """TMA configs need 16-byte aligned bases and row strides (d·bytes % 16 == 0)."""
        if _tma_ok(named_args["H"], named_args["W"]):
            return configs
        return [c for c in configs if not c.kwargs.get("TMA")]

    # Autotuned launches for CUDA (the interpreter and explicit block sizes use the raw
    # kernel). BLOCK_M is fixed at 128 so the vocab-split count can be chosen before launch;
    # 128 × 256 × 64 bf16 tiles are 48 KB of shared memory per pipeline stage, so 3-4 stages
    # fit Hopper's 227 KB; configs that do not fit are skipped by the autotuner.
    _LINEAR_CONFIGS = [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": g, "TMA": tma, "FLATTEN": fl},
            num_warps=8,
            num_stages=st,
        )
        # H200 sweep, 2026-11-27 (n = 32K / 8K, d = 4096, v = 151,936; fraction of cuBLAS):
        for tma, fl, bm, bn, st, g in [
            (False, False, 128, 256, 3, 8),  # 0.855 / 0.885: the pointer path (unaligned rows)
            (True, False, 128, 256, 3, 8),  # 0.944 / 0.948
            (True, False, 128, 256, 4, 8),  # 0.929 / 0.952
            (True, True, 128, 256, 3, 8),  # 0.953 / 0.927
            (True, True, 128, 256, 4, 8),  # 0.943 / 0.938
            (True, True, 128, 256, 4, 16),  # 0.954 / 1.009
            (True, False, 256, 128, 3, 8),  # 0.948 / 0.949
            (True, True, 256, 128, 4, 8),  # 0.967 / 0.986
            (True, True, 256, 128, 4, 16),
        ]
    ]
    _linear_entropy_tuned = triton.autotune(
        _LINEAR_CONFIGS,
        key=["d", "v", "size_class"],
        prune_configs_by={"early_config_prune": _prune_linear},
    )(triton.heuristics({"EVEN_K": _even_k})(_linear_entropy_kernel))
    _LOGITS_CONFIGS = [
        triton.Config(
            {
                "BLOCK_R": r,
                "BLOCK_V": bv,
                "LANE": True,
                "LAZY": lazy,
                "STAGES": st,
                "PROBE": 0,
                "TAIL": tail,
            },
            num_warps=w,
        )
        # H200, 2026-11-27, n = 32K / 8K, v = 151,936, no splits (fraction of copy bandwidth)
        for r, bv, w, lazy, tail, st in [
            (1, 1024, 1, True, True, 1),  # 0.850 / 0.801
            (1, 1024, 2, True, True, 1),  # 0.856 / 0.795
            (1, 1024, 1, True, True, 2),  # 0.871 / 0.809
            (1, 1024, 2, True, True, 2),
            (1, 512, 1, True, True, 1),  # 0.895 / 0.755
            (1, 512, 1, True, True, 2),
            (1, 2048, 4, True, True, 1),  # 0.819 / 0.751
            (1, 2048, 4, True, True, 2),
        ]
    ]
    _LOGITS_CANDIDATES = [
        triton.Config(
            {
                "BLOCK_R": 1,
                "BLOCK_V": bv,
                "LANE": True,
                "LAZY": True,
                "STAGES": st,
                "PROBE": 0,
                "TAIL": True,
                "GROUP": True,
                "FAST_EXP": fe,
                "DEFER": defer,
            },
            num_warps=w,
        )
        # not yet timed on a GPU; tried by the autotuner only with POLICYLONG_LOGITS_CONFIGS=all.
        # Registers (sm_90, Triton 3.6, bf16; examples/sass_logits.py): grouped 63-64 at
        # v1024 w1, 56-64 at v2048 w2, 39 at v2048 w4; deferred 63-64 at v1024 w1, 40 at
        # v1024 w2 and v2048 w4, 63 at v512 w1. STAGES = s keeps s - 1 tiles in flight
        # through shared memory (cp.async) at no register cost: 3 stages at v1024 w1 are 4 KB
        # per program, 128 KB per SM at 32 resident warps
        for bv, w, st, fe, defer in [
            (1024, 1, 1, False, False),
            (1024, 1, 2, False, False),
            (1024, 1, 1, True, False),
            (1024, 1, 2, True, False),
            (2048, 2, 1, False, False),
            (2048, 2, 2, True, False),
            (2048, 4, 1, True, False),
            (1024, 1, 1, True, True),
            (1024, 2, 1, True, True),
            (2048, 4, 1, True, True),
            (512, 1, 2, True, True),
            (1024, 1, 3, True, True),
            (1024, 2, 2, True, True),
            (2048, 4, 3, True, True),
        ]
    ]

    def _logits_tuner(configs):
        """The logits kernel autotuned over ``configs`` per (v, size class of n, dtype); a
        deferred config reads aligned bf16 rows as int32 pairs (``PAIRS``, decided per
        launch from the tensor)."""
        pairs = triton.heuristics(
            {"PAIRS": lambda args: bool(args.get("DEFER")) and _pairs_ok(args["X"])}
        )
        return triton.autotune(configs, key=["v", "size_class"])(pairs(_logits_entropy_kernel))

    _logits_entropy_tuned = _logits_tuner(_LOGITS_CONFIGS)
    _logits_entropy_tuned_all = _logits_tuner(_LOGITS_CONFIGS + _LOGITS_CANDIDATES)


def logits_autotuner():
    """The autotuned logits kernel in use: its configs timed on a GPU, or with
    ``POLICYLONG_LOGITS_CONFIGS=all`` those and the untimed candidates (grouped sums, fast
    exp), so one benchmark run can compare both sets."""
    which = os.environ.get("POLICYLONG_LOGITS_CONFIGS", "timed")
    if which not in ("timed", "all"):
        raise ValueError(f"POLICYLONG_LOGITS_CONFIGS must be 'timed' or 'all', not {which!r}")
    return _logits_entropy_tuned_all if which == "all" else _logits_entropy_tuned


def _tma_ok(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Tensor descriptors need 16-byte aligned base addresses and row strides."""
    return all(
        x.data_ptr() % 16 == 0 and (x.stride(0) * x.element_size()) % 16 == 0
        for x in (hidden, weight)
    )


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _set_tma_allocator(device: torch.device) -> None:
    """Device-side tensor descriptors need a small global scratch (128 bytes per program),
    which Triton takes from its allocator: PyTorch's caching allocator here. Set on every
    launch: Triton keeps it in a context variable, so a launch from another thread (a data
    loader, a screening worker) would otherwise find none."""
    if device.type == "cuda":
        triton.set_allocator(_tma_scratch)


def _autotune() -> bool:
    """``POLICYLONG_TRITON_AUTOTUNE=0`` launches one fixed config instead (fast compiles for
    tests on a GPU: the autotuner compiles every config for every new specialisation)."""
    return os.environ.get("POLICYLONG_TRITON_AUTOTUNE", "1") != "0"


def _require_triton(x: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    if x.dtype == torch.float64:
        raise TypeError("backend='triton' takes float32/bfloat16/float16 inputs, not float64")
    if not x.is_cuda and not _interpreting():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (the "
            "Triton interpreter, for tests); use backend='torch' on CPU"
        )


def _alloc(shape, device) -> torch.Tensor:
    """Output buffers of the Triton launchers (tests poison them with NaN through this)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _pairs_ok(x: torch.Tensor) -> bool:
    """bf16 rows readable as int32 words: 4-byte aligned start and an even row stride."""
    return x.dtype == torch.bfloat16 and x.data_ptr() % 4 == 0 and x.stride(0) % 2 == 0


def _split_partials(v: int, n: int, splits: int, quantum: int, device: torch.device):
    """``v_per_split`` (whole ``quantum``-wide tiles, so only the last split has a ragged
    one) for up to ``splits`` vocabulary ranges, and the partial buffers ``P* [S, n]`` of the
    S ranges that are left (fewer than asked when v is small)."""
    v_per_split = triton.cdiv(triton.cdiv(v, splits), quantum) * quantum
    S = triton.cdiv(v, v_per_split)
    return v_per_split, tuple(_alloc((S, n), device) for _ in range(3))


def _merge_splits(pm: torch.Tensor, ps: torch.Tensor, pt: torch.Tensor):
    """(m, s, t) [n] from per-split partials [S, n] (one Triton launch; S = 1 is a view)."""
    S, n = pm.shape
    if S == 1:
        return pm[0], ps[0], pt[0]
    m, s, t = (_alloc((n,), pm.device) for _ in range(3))
    block = 1024 if pm.is_cuda else 64
    _merge_splits_kernel[(triton.cdiv(n, block),)](pm, ps, pt, m, s, t, n, S, BLOCK=block)
    return m, s, t


def logits_entropy_partials_triton(
    logits: torch.Tensor,
    block_r: int | None = None,
    block_v: int | None = None,
    lane: bool = False,
    lazy: bool = False,
    stages: int = 1,
    num_warps: int | None = None,
    probe: int = 0,
    tail: bool = False,
    splits: int | None = None,
    fast_exp: bool = False,
    group: bool = False,
    defer: bool = False,
    pairs: bool | None = None,
):
    """Partials (m, s, t) float32 [n] of ``logits [n, v]`` (rows contiguous) in one pass.

    On CUDA without explicit block sizes the launch is autotuned per (vocabulary size, size
    class of n); the keyword arguments pick one variant of the kernel (tests, the benchmark's
    sweep). ``splits`` vocabulary ranges run as separate programs and merge in one more
    launch (default 1: on an H200 splitting 2K rows 8 ways read 0.69 of copy bandwidth
    against 0.72 unsplit, 2026-11-27).

    Not yet timed on a GPU, so only the candidate configs (``POLICYLONG_LOGITS_CONFIGS=all``,
    see :func:`logits_autotuner`) use them:

    - ``fast_exp`` (CUDA only, per-lane sums): one ``ex2.approx.ftz`` per element instead of
      ``tl.exp``'s range-tested form.
    - ``group`` (implies ``lazy`` and ``tail``): each thread adds the elements of its 16-byte
      load in registers before they reach the per-lane sums, so the sums take 8× (bf16/fp16)
      or 4× (fp32) fewer registers: 63 instead of 119 per thread at BLOCK_V = 1024 on one
      warp (sm_90 SASS, Triton 3.9), which doubles the warps an SM holds (65,536 registers:
      17 → 32) and so the loads in flight.
    - ``defer`` (implies ``group``): no per-tile max; exp is taken against a reference that
      is corrected only when a tile's sums reveal a logit far above it (see the kernel's
      ``_fold_group_deferred``).
    - ``pairs`` (with ``defer``; default: whenever the logits are bf16 with 4-byte aligned
      rows): the common path loads two bf16 logits per int32 word and widens them with one
      shift or one mask each (185 instead of 201 SASS instructions per 32 logits).
    """
    if pairs and not (defer and _pairs_ok(logits)):
        raise ValueError(
            "pairs=True needs defer=True and bf16 logits with 4-byte aligned rows, got "
            f"{logits.dtype}, row stride {logits.stride(0)}, address {logits.data_ptr()}"
        )
    _require_triton(logits)
    if fast_exp and not logits.is_cuda:
        raise ValueError("fast_exp=True is inline PTX: CUDA only (the interpreter has none)")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n, v = logits.shape
    splits = splits or 1
    tuned = logits.is_cuda and block_r is None and block_v is None and _autotune()
    # whole tiles per split (2048: the largest BLOCK_V of the configs), so only the last
    # split has a ragged tile
    quantum = 2048 if tuned else (block_v or 2048)
    v_per_split, (pm, ps, pt) = _split_partials(v, n, splits, quantum, logits.device)
    S = pm.shape[0]
    # tuned apart: up to 4K rows, up to 16K, more (the best tile width differs, see configs)
    size_class = 0 if n <= 4096 else (1 if n <= 16384 else 2)
    args = (logits, pm, ps, pt, n, v, logits.stride(0), v_per_split, S, size_class)
    if tuned:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_R"]), S)  # noqa: E731
        logits_autotuner()[grid](*args)
        return _merge_splits(pm, ps, pt)
    meta = logits_kernel_meta(
        block_r or 4,
        block_v or 2048,
        lane=lane,
        lazy=lazy,
        stages=stages,
        probe=probe,
        tail=tail,
        fast_exp=fast_exp,
        group=group,
        defer=defer,
        pairs=_pairs_ok(logits) if pairs is None and defer else bool(pairs),
    )
    grid = (triton.cdiv(n, meta["BLOCK_R"]), S)
    _logits_entropy_kernel[grid](*args, **meta, num_warps=num_warps or 4)
    return _merge_splits(pm, ps, pt)


def logits_kernel_meta(
    block_r: int,
    block_v: int,
    lane: bool = False,
    lazy: bool = False,
    stages: int = 1,
    probe: int = 0,
    tail: bool = False,
    fast_exp: bool = False,
    group: bool = False,
    defer: bool = False,
    pairs: bool = False,
) -> dict:
    """The logits kernel's constexprs for the keyword options of
    :func:`logits_entropy_partials_triton` (``pairs`` already decided): what the launcher
    passes, and what ``examples/sass_logits.py`` compiles."""
    return dict(
        BLOCK_R=block_r,
        BLOCK_V=block_v,
        LANE=lane or lazy or tail or fast_exp or group or defer,
        LAZY=lazy,
        STAGES=stages,
        PROBE=probe,
        TAIL=tail,
        FAST_EXP=fast_exp,
        GROUP=group or defer,
        DEFER=defer,
        PAIRS=pairs,
    )


SPLIT_QUANTUM = 256
"""Vocab splits are whole multiples of this (the largest BLOCK_N of the autotune configs)."""


def _num_splits(n: int, block_m: int, v: int, device: torch.device) -> int:
    """Vocab splits that fill the GPU with little wave-quantisation loss.

    Work is counted in 256-wide vocab tiles; with one 128-row program per SM at a time, a
    launch of ``p`` programs of ``k`` tiles takes ``ceil(p / SMs) · k`` tile-times. n = 2K rows
    is only 16 row blocks on an H100's 132 SMs: 8 splits of 75 tiles give 128 programs in one
    wave (96% busy), where a naive 2-per-SM target (17 splits, 272 programs) needs 3 waves for
    2.06 waves of work (69%). Fewer splits win ties (each split adds a [n] partial). With
    more than ``GROUP_M`` = 8 row blocks at least ceil(SMs / 8) splits are used, so that the
    resident programs of the grouped grid span 8 row blocks × the splits (L2 reuse, see the
    kernel).
    """
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    rb = triton.cdiv(n, block_m)
    tiles = triton.cdiv(v, SPLIT_QUANTUM)
    best, best_eff = 1, -1.0
    lo = min(triton.cdiv(sms, 8), max(1, tiles // 4)) if rb > 8 else 1
    for cand in range(lo, max(1, tiles // 4) + 1):
        per = triton.cdiv(tiles, cand)  # tiles per split
        real = triton.cdiv(tiles, per)
        progs = rb * real
        eff = rb * tiles / (triton.cdiv(progs, sms) * sms * per)
        if eff > best_eff + 0.01:
            best, best_eff = real, eff
    return best


def linear_entropy_partials_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    splits: int | None = None,
    tma: bool | None = None,
    flatten: bool = False,
    group_m: int = 8,
    num_warps: int | None = None,
    num_stages: int | None = None,
):
    """Partials (m, s, t) float32 [n] of ``hidden @ weightᵀ`` through the fused kernel.

    The vocabulary is cut into ``splits`` ranges run by separate programs; their partials are
    merged here (a [splits, n] reduction: nothing vocab-sized is ever stored). On CUDA with no
    block sizes and no ``tma`` given the launch is autotuned per (d, v, size class); otherwise
    the keyword arguments pick one variant (``tma``: operands through tensor descriptors;
    ``flatten``: the (vocab tile, k) loop nest flattened by the compiler).
    """
    _require_triton(hidden)
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    n, d = hidden.shape
    v = weight.shape[0]
    tuned = hidden.is_cuda and block_n is None and block_k is None and tma is None
    if hidden.is_cuda:
        block_m, block_n, block_k = block_m or 128, block_n or 128, block_k or 64
    else:  # interpreter: small tiles keep numpy's work per program low
        block_m, block_n, block_k = block_m or 16, block_n or 64, block_k or 32
    tuned = tuned and block_m == 128 and _autotune()
    if tma and not _tma_ok(hidden, weight):
        raise ValueError(
            "tma=True needs 16-byte aligned hidden/weight rows (d · element size a multiple "
            f"of 16; d = {d}, {hidden.dtype})"
        )
    if hidden.is_cuda:
        _set_tma_allocator(hidden.device)
    quantum = SPLIT_QUANTUM if tuned else block_n
    S = splits or _num_splits(n, block_m, v, hidden.device)
    v_per_split, (pm, ps, pt) = _split_partials(v, n, S, quantum, hidden.device)
    S = pm.shape[0]
    # autotune key beside (d, v): a size class, not n itself (screening sees a new n in
    # nearly every call, and each new key re-benchmarks every config)
    # (up to 8 row blocks, up to 64, more: 32K rows tune apart from 2K-8K ones)
    rb = triton.cdiv(n, 128)
    size_class = 0 if rb <= 8 else (1 if rb <= 64 else 2)
    args = (hidden, weight, pm, ps, pt, n, v, d, hidden.stride(0), weight.stride(0))
    args = args + (v_per_split, S, size_class)
    grid = (triton.cdiv(n, block_m) * S,)
    consts = dict(
        IEEE=hidden.dtype == torch.float32,
        DOT_F32=_interpreting() and hidden.dtype == torch.bfloat16,
    )
    if tuned:  # BLOCK_M comes from the config; the splits were sized for 128-row blocks
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * S,)  # noqa: E731
        _linear_entropy_tuned[grid](*args, **consts)
    else:
        opts = {"num_stages": num_stages} if num_stages else {}
        _linear_entropy_kernel[grid](
            *args,
            GROUP_M=group_m,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            TMA=bool(tma),
            FLATTEN=flatten,
            EVEN_K=d % block_k == 0,
            num_warps=num_warps or (8 if hidden.is_cuda else 4),
            **opts,
            **consts,
        )
    return _merge_splits(pm, ps, pt)


BACKENDS = ("auto", "torch", "triton")


def pick_backend(x: torch.Tensor, backend: str = "auto") -> str:
    """``auto``: Triton on CUDA when installed, else the chunked PyTorch path. The environment
    variable ``POLICYLONG_ENTROPY_BACKEND`` overrides ``auto`` (e.g. ``triton`` in tests)."""
    if backend not in BACKENDS:
        raise ValueError(f"entropy backend {backend!r}: must be one of {BACKENDS}")
    if backend == "auto":
        backend = os.environ.get("POLICYLONG_ENTROPY_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"POLICYLONG_ENTROPY_BACKEND={backend!r}: must be one of {BACKENDS}")
    if backend == "auto":
        return "triton" if (HAS_TRITON and x.is_cuda and x.dtype != torch.float64) else "torch"
    return backend


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


def logits_entropy(
    logits: torch.Tensor, vocab_chunk: int = VOCAB_CHUNK, backend: str = "auto"
) -> torch.Tensor:
    """Entropy of each row of ``logits [n, v]`` (any float dtype) as float32 [n]."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [n, v], got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOATS:
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits_entropy: empty input, shape {tuple(logits.shape)}")
    if pick_backend(logits, backend) == "triton":
        h, _ = finalize_partials(*logits_entropy_partials_triton(logits))
        return h
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
    backend: str = "auto",
) -> torch.Tensor:
    """Entropy of ``softmax(hidden [n, d] @ weight [v_local, d]ᵀ)`` as float32 [n].

    ``weight`` is this rank's vocab shard; with a ``tp_group`` the partials combine across the
    group so every rank returns the entropy over the full vocabulary.
    """
    h, _ = fused_linear_entropy_nll(hidden, weight, None, tp_group, row_chunk, vocab_chunk, backend)
    return h


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
    _check_linear(hidden, weight)
    if targets is not None and targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be [n] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if hidden.shape[0] == 0:
        raise ValueError("fused_linear_entropy: empty input (hidden has 0 rows)")
    vocab_start = vocab_shard_offset(weight.shape[0], weight.shape[1], tp_group)
    if pick_backend(hidden, backend) == "triton":
        m, s, t = linear_entropy_partials_triton(hidden, weight)
    else:
        m, s, t = linear_entropy_partials(hidden, weight, row_chunk, vocab_chunk)
    m, s, t = combine_partials(m, s, t, tp_group)
    h, lse = finalize_partials(m, s, t)
    if targets is None:
        return h, None
    tl = _target_logits(hidden, weight, targets, vocab_start, tp_group)
    return h, lse - tl
