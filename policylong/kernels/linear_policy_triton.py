"""Triton kernels of the fused linear policy head: the local tile math of :mod:`.linear_policy`.

Forward: per-row partials over this rank's vocab shard, student ``(m, s, t)``, the target
logit and, with a teacher, ``w = Σ e·(z − zT)`` (rescaled like ``s``) and ``(mT, sT)``, from
``[BLOCK_M × BLOCK_N]`` logit tiles made with ``tl.dot`` (a K loop over ``d``, another over
``d_T``); nothing ``[n × vocab]`` is stored. Backward: two kernels recompute each tile, form
``G = dL/dz / T`` from the saved per-row statistics and accumulate ``dhidden = G @ W`` (one
program per row block, looping over the vocabulary) and ``dweight = Gᵀ @ hidden`` (one program
per vocab block, looping over the rows): every output element has one owner, so there are no
atomics and the result is deterministic. :mod:`.linear_policy` keeps the collectives (the
partials' combination over ``tp_group`` and the all-reduce of ``dhidden``) and the checks.

Accumulation is float32 for every input dtype; float64 inputs stay on the PyTorch path
(``tl.dot`` has no float64). Compiled on CUDA; under the Triton interpreter on CPU (tests).
"""

from __future__ import annotations

import torch

from . import dispatch, linear_entropy_triton
from .dispatch import HAS_TRITON, interpreting, require_triton
from .linear_entropy_triton import num_splits

if HAS_TRITON:
    import triton
    import triton.language as tl

    _dot_acc = linear_entropy_triton._dot_acc  # acc + x @ wᵀ, with the interpreter's bf16 fix

    @triton.jit
    def _logit_tile(
        x_base,
        w_base,
        d,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        IEEE: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        """float32 ``x @ wᵀ`` [BLOCK_M, BLOCK_N] from row pointers ``x_base [BLOCK_M, 1]`` and
        ``w_base [BLOCK_N, 1]`` (rows already clamped to valid addresses)."""
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for ks in range(0, d, BLOCK_K):
            k = ks + tl.arange(0, BLOCK_K)
            if EVEN_K:
                x = tl.load(x_base + k[None, :])
                w = tl.load(w_base + k[None, :])
            else:
                kmask = (k < d)[None, :]
                x = tl.load(x_base + k[None, :], mask=kmask, other=0.0)
                w = tl.load(w_base + k[None, :], mask=kmask, other=0.0)
            acc = _dot_acc(x, w, acc, IEEE, DOT_F32)
        return acc

    @triton.jit
    def _policy_fwd_kernel(
        H,
        W,
        TH,
        TW,
        TGT,
        P,
        n,
        v,
        d,
        dt,
        stride_h,
        stride_w,
        stride_th,
        stride_tw,
        vocab_start,
        inv_t,
        v_per_split,
        n_splits,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        TEACHER: tl.constexpr,
        IEEE: tl.constexpr,
        DOT_F32: tl.constexpr,
        IEEE_T: tl.constexpr,
        DOT_F32_T: tl.constexpr,
        EVEN_K: tl.constexpr,
        EVEN_KT: tl.constexpr,
    ):
        """Rows [pid_m·BLOCK_M, +BLOCK_M) × vocab split pid_s into ``P [7, n_splits, n]``:
        m, s, t, w, mT, sT and the target logit (0 where the target is outside the split).

        The vocabulary is split over programs and the splits merged by a second launch (as
        in the entropy kernel) rather than atomics: a short n leaves too few row blocks to
        fill the GPU (n = 2K is 16 blocks of 128 on 132 SMs), and partials of disjoint ranges
        merge exactly (max, then rescaled sums)."""
        # grouped 1D grid: the programs resident at one time share GROUP_M hidden blocks and
        # all splits, so both operands stay in L2 (the entropy kernel's layout and reasoning)
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
        # rows past n and columns past the split are clamped to valid addresses, not masked:
        # their logits are finite, the column mask drops them from every sum, and the stores
        # are row-masked
        rows_ld = tl.minimum(rows, n - 1).to(tl.int64)
        h_base = H + rows_ld[:, None] * stride_h
        th_base = TH + rows_ld[:, None] * stride_th
        tgt = tl.load(TGT + rows_ld).to(tl.int64) - vocab_start
        v0 = pid_s * v_per_split
        v1 = tl.minimum(v0 + v_per_split, v)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s_i = tl.zeros([BLOCK_M], tl.float32)
        t_i = tl.zeros([BLOCK_M], tl.float32)
        w_i = tl.zeros([BLOCK_M], tl.float32)
        mt_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        st_i = tl.zeros([BLOCK_M], tl.float32)
        z_tgt = tl.zeros([BLOCK_M], tl.float32)
        for vs in range(v0, v1, BLOCK_N):
            cols = vs + tl.arange(0, BLOCK_N)
            cmask = cols < v1
            cols_ld = tl.minimum(cols, v - 1).to(tl.int64)
            w_base = W + cols_ld[:, None] * stride_w
            z = _logit_tile(h_base, w_base, d, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, IEEE, DOT_F32)
            z = z * inv_t
            zm = tl.where(cmask[None, :], z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(zm, 1))
            alpha = tl.exp(m_i - m_new)  # m_i = -inf on the first tile: alpha = 0
            e = tl.exp(zm - m_new[:, None])  # 0 on masked columns, where z is finite
            s_i = s_i * alpha + tl.sum(e, 1)
            t_i = t_i * alpha + tl.sum(e * z, 1)
            hit = (cols[None, :] == tgt[:, None]) & cmask[None, :]
            z_tgt += tl.sum(tl.where(hit, z, 0.0), 1)
            if TEACHER:
                tw_base = TW + cols_ld[:, None] * stride_tw
                zt = _logit_tile(
                    th_base, tw_base, dt, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_KT, IEEE_T, DOT_F32_T
                )
                zt = zt * inv_t
                w_i = w_i * alpha + tl.sum(e * (z - zt), 1)
                ztm = tl.where(cmask[None, :], zt, float("-inf"))
                mt_new = tl.maximum(mt_i, tl.max(ztm, 1))
                st_i = st_i * tl.exp(mt_i - mt_new) + tl.sum(tl.exp(ztm - mt_new[:, None]), 1)
                mt_i = mt_new
            m_i = m_new
        off = pid_s * n + rows
        plane = n_splits * n
        tl.store(P + off, m_i, mask=rmask)
        tl.store(P + plane + off, s_i, mask=rmask)
        tl.store(P + 2 * plane + off, t_i, mask=rmask)
        if TEACHER:
            tl.store(P + 3 * plane + off, w_i, mask=rmask)
            tl.store(P + 4 * plane + off, mt_i, mask=rmask)
            tl.store(P + 5 * plane + off, st_i, mask=rmask)
        tl.store(P + 6 * plane + off, z_tgt, mask=rmask)

    @triton.jit
    def _policy_merge_kernel(P, OUT, n, n_splits, TEACHER: tl.constexpr, BLOCK: tl.constexpr):
        """Merge ``P [7, n_splits, n]`` of disjoint vocabulary ranges into ``OUT [7, n]``; every
        split holds at least one column, so no split's max is -inf."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        rmask = rows < n
        plane = n_splits * n
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        mt = tl.full([BLOCK], float("-inf"), tl.float32)
        for sp in range(0, n_splits):
            m = tl.maximum(m, tl.load(P + sp * n + rows, mask=rmask, other=0.0))
            if TEACHER:
                mt = tl.maximum(mt, tl.load(P + 4 * plane + sp * n + rows, mask=rmask, other=0.0))
        s = tl.zeros([BLOCK], tl.float32)
        t = tl.zeros([BLOCK], tl.float32)
        w = tl.zeros([BLOCK], tl.float32)
        st = tl.zeros([BLOCK], tl.float32)
        z_tgt = tl.zeros([BLOCK], tl.float32)
        for sp in range(0, n_splits):
            off = sp * n + rows
            c = tl.exp(tl.load(P + off, mask=rmask, other=0.0) - m)
            s += tl.load(P + plane + off, mask=rmask, other=0.0) * c
            t += tl.load(P + 2 * plane + off, mask=rmask, other=0.0) * c
            z_tgt += tl.load(P + 6 * plane + off, mask=rmask, other=0.0)
            if TEACHER:
                w += tl.load(P + 3 * plane + off, mask=rmask, other=0.0) * c
                ct = tl.exp(tl.load(P + 4 * plane + off, mask=rmask, other=0.0) - mt)
                st += tl.load(P + 5 * plane + off, mask=rmask, other=0.0) * ct
        tl.store(OUT + rows, m, mask=rmask)
        tl.store(OUT + n + rows, s, mask=rmask)
        tl.store(OUT + 2 * n + rows, t, mask=rmask)
        if TEACHER:
            tl.store(OUT + 3 * n + rows, w, mask=rmask)
            tl.store(OUT + 4 * n + rows, mt, mask=rmask)
            tl.store(OUT + 5 * n + rows, st, mask=rmask)
        tl.store(OUT + 6 * n + rows, z_tgt, mask=rmask)

    @triton.jit
    def _grad_tile(
        h_base,
        w_base,
        th_base,
        tw_base,
        d,
        dt,
        cols,
        valid,
        tgt,
        lse,
        gl,
        a,
        b,
        gk,
        lse_t,
        inv_t,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        KL: tl.constexpr,
        IEEE: tl.constexpr,
        DOT_F32: tl.constexpr,
        IEEE_T: tl.constexpr,
        DOT_F32_T: tl.constexpr,
        EVEN_K: tl.constexpr,
        EVEN_KT: tl.constexpr,
    ):
        """``G = dL/dz / T`` of one tile, float32 [BLOCK_M, BLOCK_N], 0 outside ``valid``:
        ``G = (p·(a + b·log p − gk·log q) + gl·onehot) / T``, the regrouped formula of
        :func:`.linear_policy.policy_grads` (per-row ``a, b, gk``)."""
        z = _logit_tile(h_base, w_base, d, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, IEEE, DOT_F32)
        lp = z * inv_t - lse[:, None]  # log p
        g = a[:, None] + b[:, None] * lp
        if KL:
            zt = _logit_tile(
                th_base, tw_base, dt, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_KT, IEEE_T, DOT_F32_T
            )
            g -= gk[:, None] * (zt * inv_t - lse_t[:, None])
        g = g * tl.exp(lp)
        g += tl.where(cols[None, :] == tgt[:, None], gl[:, None], 0.0)
        # clamped rows/columns hold finite logits of real entries: zero them, so they add
        # nothing to dhidden or dweight
        return tl.where(valid, g * inv_t, 0.0)

    @triton.jit
    def _policy_dh_kernel(
        H,
        W,
        TH,
        TW,
        TGT,
        LSE,
        LSE_T,
        GL,
        A,
        B,
        GK,
        DH,
        n,
        v,
        d,
        dt,
        stride_h,
        stride_w,
        stride_th,
        stride_tw,
        stride_dh,
        vocab_start,
        inv_t,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        KL: tl.constexpr,
        IEEE: tl.constexpr,
        DOT_F32: tl.constexpr,
        IEEE_T: tl.constexpr,
        DOT_F32_T: tl.constexpr,
        EVEN_K: tl.constexpr,
        EVEN_KT: tl.constexpr,
    ):
        """``DH [n, d]`` float32 ``= Σ_vocab G @ W`` for rows [pid·BLOCK_M, +BLOCK_M).

        The program owns its rows over the whole vocabulary, so it accumulates into DH by
        load-add-store, [BLOCK_M, BLOCK_K] at a time (a [BLOCK_M, d] accumulator does not fit
        in registers: 64 × 4096 float32 is 1 MB); the first vocab tile stores without loading,
        so DH needs no zeroing. Untimed cost: per 128-wide vocab tile at d = 4096 that is 2 MB
        of DH traffic against 4 · 64 · 128 · 4096 = 134 MFLOP (recompute + gradient), 64
        flop/byte, below an H200's ~100-200 at which HBM and tensor cores balance when the
        132 programs' DH rows (132 MB) miss L2: the first thing a GPU run should time."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n
        rows_ld = tl.minimum(rows, n - 1).to(tl.int64)
        h_base = H + rows_ld[:, None] * stride_h
        th_base = TH + rows_ld[:, None] * stride_th
        tgt = tl.load(TGT + rows_ld).to(tl.int64) - vocab_start
        lse = tl.load(LSE + rows_ld)
        gl = tl.load(GL + rows_ld)
        a = tl.load(A + rows_ld)
        b = tl.load(B + rows_ld)
        if KL:
            gk = tl.load(GK + rows_ld)
            lse_t = tl.load(LSE_T + rows_ld)
        else:
            gk = b  # unused: KL is a constexpr
            lse_t = lse
        dh_base = DH + rows.to(tl.int64)[:, None] * stride_dh
        for vs in range(0, v, BLOCK_N):
            cols = vs + tl.arange(0, BLOCK_N)
            cols_ld = tl.minimum(cols, v - 1).to(tl.int64)
            w_base = W + cols_ld[:, None] * stride_w
            tw_base = TW + cols_ld[:, None] * stride_tw
            valid = rmask[:, None] & (cols < v)[None, :]
            g = _grad_tile(
                h_base,
                w_base,
                th_base,
                tw_base,
                d,
                dt,
                cols,
                valid,
                tgt,
                lse,
                gl,
                a,
                b,
                gk,
                lse_t,
                inv_t,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                KL,
                IEEE,
                DOT_F32,
                IEEE_T,
                DOT_F32_T,
                EVEN_K,
                EVEN_KT,
            )
            for ks in range(0, d, BLOCK_K):
                k = ks + tl.arange(0, BLOCK_K)
                kmask = (k < d)[None, :]
                # G stays float32 (bf16 would cost ~2e-3 relative, the whole bf16 budget)
                wk = tl.load(w_base + k[None, :], mask=kmask, other=0.0).to(tl.float32)
                ptr = dh_base + k[None, :]
                old = tl.load(ptr, mask=rmask[:, None] & kmask & (vs > 0), other=0.0)
                if IEEE:
                    new = tl.dot(g, wk, old, input_precision="ieee")
                else:
                    new = tl.dot(g, wk, old)
                tl.store(ptr, new, mask=rmask[:, None] & kmask)
            # the next vocab tile reloads these DH blocks, maybe in another thread's layout:
            # a CTA barrier orders the stores before those loads
            tl.debug_barrier()

    @triton.jit
    def _policy_dw_kernel(
        H,
        W,
        TH,
        TW,
        TGT,
        LSE,
        LSE_T,
        GL,
        A,
        B,
        GK,
        DW32,
        DW,
        n,
        v,
        d,
        dt,
        stride_h,
        stride_w,
        stride_th,
        stride_tw,
        stride_dw32,
        stride_dw,
        vocab_start,
        inv_t,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        KL: tl.constexpr,
        IEEE: tl.constexpr,
        DOT_F32: tl.constexpr,
        IEEE_T: tl.constexpr,
        DOT_F32_T: tl.constexpr,
        EVEN_K: tl.constexpr,
        EVEN_KT: tl.constexpr,
        CAST: tl.constexpr,
    ):
        """``DW32 [v, d]`` float32 ``= Σ_rows Gᵀ @ hidden`` for vocab rows [pid·BLOCK_N,
        +BLOCK_N), accumulated by load-add-store like ``DH`` in the dhidden kernel; with
        ``CAST`` the finished rows are then written to ``DW`` in its dtype."""
        pid = tl.program_id(0)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < v
        cols_ld = tl.minimum(cols, v - 1).to(tl.int64)
        w_base = W + cols_ld[:, None] * stride_w
        tw_base = TW + cols_ld[:, None] * stride_tw
        dw_base = DW32 + cols.to(tl.int64)[:, None] * stride_dw32
        for rs in range(0, n, BLOCK_M):
            rows = rs + tl.arange(0, BLOCK_M)
            rows_ld = tl.minimum(rows, n - 1).to(tl.int64)
            h_base = H + rows_ld[:, None] * stride_h
            th_base = TH + rows_ld[:, None] * stride_th
            tgt = tl.load(TGT + rows_ld).to(tl.int64) - vocab_start
            lse = tl.load(LSE + rows_ld)
            gl = tl.load(GL + rows_ld)
            a = tl.load(A + rows_ld)
            b = tl.load(B + rows_ld)
            if KL:
                gk = tl.load(GK + rows_ld)
                lse_t = tl.load(LSE_T + rows_ld)
            else:
                gk = b  # unused: KL is a constexpr
                lse_t = lse
            valid = (rows < n)[:, None] & cmask[None, :]
            g = _grad_tile(
                h_base,
                w_base,
                th_base,
                tw_base,
                d,
                dt,
                cols,
                valid,
                tgt,
                lse,
                gl,
                a,
                b,
                gk,
                lse_t,
                inv_t,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                KL,
                IEEE,
                DOT_F32,
                IEEE_T,
                DOT_F32_T,
                EVEN_K,
                EVEN_KT,
            )
            gt = tl.trans(g)
            for ks in range(0, d, BLOCK_K):
                k = ks + tl.arange(0, BLOCK_K)
                kmask = (k < d)[None, :]
                hk = tl.load(h_base + k[None, :], mask=kmask, other=0.0).to(tl.float32)
                ptr = dw_base + k[None, :]
                old = tl.load(ptr, mask=cmask[:, None] & kmask & (rs > 0), other=0.0)
                if IEEE:
                    new = tl.dot(gt, hk, old, input_precision="ieee")
                else:
                    new = tl.dot(gt, hk, old)
                tl.store(ptr, new, mask=cmask[:, None] & kmask)
            tl.debug_barrier()  # as in the dhidden kernel
        if CAST:
            out_base = DW + cols.to(tl.int64)[:, None] * stride_dw
            for ks in range(0, d, BLOCK_K):
                k = ks + tl.arange(0, BLOCK_K)
                mask = cmask[:, None] & (k < d)[None, :]
                x = tl.load(dw_base + k[None, :], mask=mask)
                tl.store(out_base + k[None, :], x.to(DW.dtype.element_ty), mask=mask)


# One config per kernel, UNTIMED (no GPU has run these kernels yet): tiles in the range that won
# the entropy kernel's H200 sweep (benchmarks/KERNELS.md). Forward: the student and teacher
# [128, 128] float32 tiles are 64 registers a thread each at 8 warps. Backward: BLOCK_M 64, so
# G [64, 128] float32 (32 registers) sits beside the [64, 64] gradient accumulator (16).
# Sweep before adding variants (an autotuner of untimed configs only adds compile time).
FWD_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
BWD_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=1)
"""Under the interpreter (tests) every op costs a fixed overhead per program, so fewer, wider
tiles run faster: forward + backward at n = 37, d = 24, v = 301 (3 row blocks, 5 vocab
tiles) takes 0.5-0.9 s on the 2-core CPU, 2.4-4.4 s with 16 × 16 × 16 tiles."""

DW_CHUNK = 16_384
"""Vocab rows per dweight launch for bf16/fp16 weights: the float32 accumulator is [DW_CHUNK,
d] (256 MB at d = 4096) instead of [vocab/tp, d] (2.5 GB at 151,936 × 4096); 128 programs of
128 rows, about one wave on 132 SMs. Float32 weights accumulate into dweight itself."""


def _blocks(x: torch.Tensor, base: dict, over: dict) -> dict:
    cfg = dict(base if x.is_cuda else INTERPRET_CONFIG)
    cfg.update({k: val for k, val in over.items() if val is not None})
    return cfg


def _rowmajor(x):
    """``x`` with unit stride along d (the kernels read rows through a row stride); a
    column-major head is copied, once per forward and once per backward."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _dot_flags(x: torch.Tensor) -> tuple[bool, bool]:
    """(IEEE, DOT_F32): float32 operands take full-precision dots (no TF32: the 1e-5
    contract); bf16 is upcast under the interpreter, whose bf16 dot is wrong."""
    return x.dtype == torch.float32, interpreting() and x.dtype == torch.bfloat16


def _teacher_args(hidden, weight, th, tw):
    """(TH, TW, d_T, their row strides, IEEE_T, DOT_F32_T); the student's tensors as unused
    stand-ins without a teacher."""
    if th is None:
        return hidden, weight, hidden.shape[1], hidden.stride(0), weight.stride(0), False, False
    ieee, f32 = _dot_flags(th)
    return th, tw, th.shape[1], th.stride(0), tw.stride(0), ieee, f32


def policy_partials_triton(
    hidden, weight, targets, th, tw, inv_t, vocab_start, splits=None, **blocks
):
    """``((m, s, t, w, mT, sT), target logit)`` over this shard, float32 [n] each (``w, mT, sT``
    None without a teacher; the target logit 0 where another shard owns the target): what
    :func:`.linear_policy.policy_partials` and :func:`.linear_policy.target_logit` return.

    ``hidden [n, d]``, ``weight [vocab/tp, d]``, ``targets [n]`` (global ids), ``th [n, d_T]``,
    ``tw [vocab/tp, d_T]``. The vocabulary is cut into ``splits`` ranges (default: enough to
    fill the GPU, 1 on CPU) merged in a second launch; ``blocks`` overrides BLOCK_M/N/K,
    num_warps, num_stages (tests)."""
    require_triton(hidden)
    hidden, weight, th, tw = map(_rowmajor, (hidden, weight, th, tw))
    n, d = hidden.shape
    v = weight.shape[0]
    cfg = _blocks(hidden, FWD_CONFIG, blocks)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    want = splits or num_splits(n, bm, v, hidden.device)
    # whole BLOCK_N tiles per split, so only the last split has a ragged tile
    v_per_split = triton.cdiv(triton.cdiv(v, want), bn) * bn
    S = triton.cdiv(v, v_per_split)
    teacher = th is not None
    TH, TW, dt, sth, stw, ieee_t, f32_t = _teacher_args(hidden, weight, th, tw)
    ieee, f32 = _dot_flags(hidden)
    P = dispatch.alloc((7, S, n), hidden.device)
    grid = (triton.cdiv(n, bm) * S,)
    _policy_fwd_kernel[grid](
        hidden,
        weight,
        TH,
        TW,
        targets.contiguous(),
        P,
        n,
        v,
        d,
        dt,
        hidden.stride(0),
        weight.stride(0),
        sth,
        stw,
        vocab_start,
        inv_t,
        v_per_split,
        S,
        GROUP_M=8,
        TEACHER=teacher,
        IEEE=ieee,
        DOT_F32=f32,
        IEEE_T=ieee_t,
        DOT_F32_T=f32_t,
        EVEN_K=d % cfg["BLOCK_K"] == 0,
        EVEN_KT=dt % cfg["BLOCK_K"] == 0,
        **cfg,
    )
    if S == 1:
        out = P[:, 0]
    else:
        out = dispatch.alloc((7, n), hidden.device)
        block = 1024 if hidden.is_cuda else 64
        _policy_merge_kernel[(triton.cdiv(n, block),)](P, out, n, S, TEACHER=teacher, BLOCK=block)
    parts = tuple(out[i] if (i < 3 or teacher) else None for i in range(6))
    return parts, out[6]


def policy_grads_triton(saved, coefs, inv_t, vocab_start, want_dw, dw_chunk=None, **blocks):
    """(dhidden [n, d] float32 of this shard's vocabulary, to be summed over the group;
    dweight [vocab/tp, d] of this shard in ``weight``'s dtype, or None): what
    :func:`.linear_policy.policy_grads` returns, from the same ``saved`` tensors and
    ``coefs = (gl, a, b, gk)`` [n] (``gk`` None when no KL gradient flows). Two launches, no
    atomics: dhidden over row blocks, dweight over vocab blocks (in ``dw_chunk``-row launches
    for bf16/fp16 weights, default :data:`DW_CHUNK`); both recompute the tiles."""
    hidden, weight, targets, th, tw, lse, _, lse_t, _ = saved
    require_triton(hidden)
    hidden, weight, th, tw = map(_rowmajor, (hidden, weight, th, tw))
    gl, a, b, gk = coefs
    kl = gk is not None
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    cfg = _blocks(hidden, BWD_CONFIG, blocks)
    TH, TW, dt, sth, stw, ieee_t, f32_t = _teacher_args(hidden, weight, th, tw)
    ieee, f32 = _dot_flags(hidden)
    # upstream grads may be expanded views (stride 0, from ``out.sum()``): the kernels index
    # them by row
    per_row = (targets, lse, lse_t if kl else lse, gl, a, b, gk if kl else gl)
    rows = tuple(x.contiguous() for x in per_row)
    flags = dict(
        KL=kl,
        IEEE=ieee,
        DOT_F32=f32,
        IEEE_T=ieee_t,
        DOT_F32_T=f32_t,
        EVEN_K=d % cfg["BLOCK_K"] == 0,
        EVEN_KT=dt % cfg["BLOCK_K"] == 0,
        **cfg,
    )
    dh = dispatch.alloc((n, d), dev)
    _policy_dh_kernel[(triton.cdiv(n, cfg["BLOCK_M"]),)](
        hidden,
        weight,
        TH,
        TW,
        *rows,
        dh,
        n,
        v,
        d,
        dt,
        hidden.stride(0),
        weight.stride(0),
        sth,
        stw,
        dh.stride(0),
        vocab_start,
        inv_t,
        **flags,
    )
    if not want_dw:
        return dh, None
    dw = dispatch.alloc(weight.shape, dev, weight.dtype)
    cast = weight.dtype != torch.float32
    chunk = (dw_chunk or DW_CHUNK) if cast else v
    acc = dispatch.alloc((min(chunk, v), d), dev) if cast else dw
    # the interpreter truncates float32 -> bf16 (Triton 3.9's cast drops the rounding mode:
    # dweight 3.5e-3 from float64 where round-to-nearest-even, compiled Triton's cast, gives
    # 1.6e-3 at n = 37, d = 24, v = 301), so there PyTorch casts the finished rows
    host_cast = cast and interpreting() and weight.dtype == torch.bfloat16
    for c0 in range(0, v, chunk):
        c1 = min(c0 + chunk, v)
        tw_c = TW[c0:c1] if th is not None else weight[c0:c1]
        _policy_dw_kernel[(triton.cdiv(c1 - c0, cfg["BLOCK_N"]),)](
            hidden,
            weight[c0:c1],
            TH,
            tw_c,
            *rows,
            acc if cast else dw[c0:c1],
            dw[c0:c1],
            n,
            c1 - c0,
            d,
            dt,
            hidden.stride(0),
            weight.stride(0),
            sth,
            stw,
            acc.stride(0),
            dw.stride(0),
            vocab_start + c0,
            inv_t,
            CAST=cast and not host_cast,
            **flags,
        )
        if host_cast:
            dw[c0:c1] = acc[: c1 - c0]
    return dh, dw
