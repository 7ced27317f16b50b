"""The fused linear-entropy kernel: partials (m, s, t) of ``hidden @ weightᵀ`` in one pass.

Logits exist one ``[BLOCK_M, BLOCK_N]`` register tile at a time and fold into the running
partials of :mod:`.partials`, so the kernel returns what the chunked PyTorch path returns and
shares its tensor-parallel combination. Compiled on CUDA; under the Triton interpreter on CPU
(tests). Measurements behind the configs: ``benchmarks/KERNELS.md``.
"""

from __future__ import annotations

import torch

from . import dispatch
from .dispatch import HAS_TRITON, autotune_enabled, interpreting, require_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

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
        """Rows [pid_m*BLOCK_M, +BLOCK_M) × vocab split pid_s, written to row pid_s of
        ``OUT_* [n_splits, n]``; ``size_class`` only keys the autotuner.

        ``TMA``: operand tiles come through tensor descriptors made on the device (the copy
        engine zero-fills rows past n and columns past v, so the loads carry no masks), else
        through pointer loads. ``FLATTEN`` lets the compiler flatten the (vocab tile, k) loop
        nest so the software pipeline runs across vocab tiles instead of draining once per
        tile. ``EVEN_K``: d is a multiple of BLOCK_K (no k mask).
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

    @triton.jit
    def _merge_splits_kernel(PM, PS, PT, OUT_M, OUT_S, OUT_T, n, n_splits, BLOCK: tl.constexpr):
        """Merge the partials ``P* [n_splits, n]`` of disjoint vocabulary ranges into
        ``OUT_* [n]`` in one launch (the PyTorch form is six)."""
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

    def _config(bm: int, bn: int, stages: int, group_m: int, tma: bool, flatten: bool):
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": group_m}
        meta.update(TMA=tma, FLATTEN=flatten)
        return triton.Config(meta, num_warps=8, num_stages=stages)

    # The configs that won a shape of the autotuned H200 grid (bf16, n = 2K/8K/32K, d =
    # 2048/3584/4096, v = 151,936/128,256; Triton TFLOP/s over cuBLAS's, benchmarks/KERNELS.md).
    # BLOCK_M is 128 or 256 (the split count is sized for 128-row blocks before launch); a
    # 128 × 256 × 64 bf16 stage is 48 KB of shared memory, so 4 stages fit Hopper's 227 KB.
    LINEAR_CONFIGS = [
        _config(128, 256, 4, 16, True, True),  # 10 of 18 shapes: 0.932-1.018
        _config(128, 256, 3, 8, True, True),  # n = 32K: 0.944, 0.961, 0.972
        _config(128, 256, 4, 8, True, True),  # n = 32K, d = 4096, v = 151,936: 0.927
        _config(256, 128, 4, 16, True, True),  # d = 3584, v = 151,936: 1.037 (2K), 0.958 (8K)
        _config(256, 128, 3, 8, True, False),  # d = 2048, v = 151,936: 0.927 (2K), 0.926 (8K)
        # pointer loads, the only config for rows that are not 16-byte aligned (no tensor
        # descriptor): 0.855 (32K) / 0.885 (8K) in the sweep at d = 4096
        _config(128, 256, 3, 8, False, False),
    ]

    def _prune_linear(configs, named_args, **kwargs):
        """Tensor descriptors need 16-byte aligned rows: the TMA configs where they are, the
        pointer config where they are not. (Below sm_90 Triton lowers descriptors to pointer
        loads itself.)"""
        tma = tma_ok(named_args["H"], named_args["W"])
        return [c for c in configs if c.kwargs["TMA"] == tma]

    _linear_entropy_tuned = triton.autotune(
        LINEAR_CONFIGS,
        key=["d", "v", "size_class"],
        prune_configs_by={"early_config_prune": _prune_linear},
    )(triton.heuristics({"EVEN_K": lambda a: a["d"] % a["BLOCK_K"] == 0})(_linear_entropy_kernel))


def tma_ok(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
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


SPLIT_QUANTUM = 256
"""Vocab splits are whole multiples of this (the largest BLOCK_N of the autotune configs)."""


def num_splits(n: int, block_m: int, v: int, device: torch.device) -> int:
    """Vocab splits that fill the GPU with little wave-quantisation loss.

    Work is counted in 256-wide vocab tiles; with one 128-row program per SM at a time, a
    launch of ``p`` programs of ``k`` tiles takes ``ceil(p / SMs) · k`` tile-times. n = 2K rows
    is only 16 row blocks on an H100's 132 SMs: 8 splits of 75 tiles give 128 programs in one
    wave (96% busy), where a naive 2-per-SM target (17 splits, 272 programs) needs 3 waves for
    2.06 waves of work (69%). Fewer splits win ties (each split adds a [n] partial). With
    more than ``GROUP_M`` = 8 row blocks at least ceil(SMs / 8) splits are used, so that the
    resident programs of the grouped grid span 8 row blocks × the splits (L2 reuse).
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


def _merge_splits(pm: torch.Tensor, ps: torch.Tensor, pt: torch.Tensor):
    """(m, s, t) [n] from per-split partials [S, n] (one Triton launch; S = 1 is a view)."""
    S, n = pm.shape
    if S == 1:
        return pm[0], ps[0], pt[0]
    m, s, t = (dispatch.alloc((n,), pm.device) for _ in range(3))
    block = 1024 if pm.is_cuda else 64
    _merge_splits_kernel[(triton.cdiv(n, block),)](pm, ps, pt, m, s, t, n, S, BLOCK=block)
    return m, s, t


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
    block sizes and no ``tma`` given the launch is autotuned per (d, v, size class of n);
    otherwise the keyword arguments pick one variant (tests, the benchmark's sweep).
    """
    require_triton(hidden)
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    n, d = hidden.shape
    v = weight.shape[0]
    tuned = hidden.is_cuda and block_n is None and block_k is None and tma is None
    if hidden.is_cuda:
        block_m, block_n, block_k = block_m or 128, block_n or 128, block_k or 64
    else:  # interpreter: small tiles keep numpy's work per program low
        block_m, block_n, block_k = block_m or 16, block_n or 64, block_k or 32
    tuned = tuned and block_m == 128 and autotune_enabled()
    if tma and not tma_ok(hidden, weight):
        raise ValueError(
            "tma=True needs 16-byte aligned hidden/weight rows (d · element size a multiple "
            f"of 16; d = {d}, {hidden.dtype})"
        )
    _set_tma_allocator(hidden.device)
    quantum = SPLIT_QUANTUM if tuned else block_n
    # whole quantum-wide tiles per split, so only the last split has a ragged one
    want = splits or num_splits(n, block_m, v, hidden.device)
    v_per_split = triton.cdiv(triton.cdiv(v, want), quantum) * quantum
    S = triton.cdiv(v, v_per_split)
    pm, ps, pt = (dispatch.alloc((S, n), hidden.device) for _ in range(3))
    # autotune key beside (d, v): a size class, not n itself (screening sees a new n in
    # nearly every call, and each new key re-benchmarks every config): up to 8 row blocks,
    # up to 64, more
    rb = triton.cdiv(n, 128)
    size_class = 0 if rb <= 8 else (1 if rb <= 64 else 2)
    args = (hidden, weight, pm, ps, pt, n, v, d, hidden.stride(0), weight.stride(0))
    args = args + (v_per_split, S, size_class)
    consts = dict(
        IEEE=hidden.dtype == torch.float32,
        DOT_F32=interpreting() and hidden.dtype == torch.bfloat16,
    )
    if tuned:  # BLOCK_M comes from the config; the splits were sized for 128-row blocks
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * S,)  # noqa: E731
        _linear_entropy_tuned[grid](*args, **consts)
    else:
        opts = {"num_stages": num_stages} if num_stages else {}
        _linear_entropy_kernel[(triton.cdiv(n, block_m) * S,)](
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
