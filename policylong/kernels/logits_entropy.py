"""Logits entropy: per-row entropy of ``logits [n, v]`` (any float dtype) as float32 [n].

Two implementations (:mod:`.dispatch`): the chunked PyTorch path (partials of
``[n, vocab_chunk]`` tiles, :mod:`.partials`) and one Triton kernel, a single streaming pass
over each row, autotuned over the configs that won a shape on an H200 (benchmarks/KERNELS.md).
"""

from __future__ import annotations

import torch

from . import dispatch
from .dispatch import FLOATS, HAS_TRITON, autotune_enabled, pick_backend, require_triton
from .partials import finalize_partials, merge_partials, tile_partials

VOCAB_CHUNK = 8192
"""Vocabulary entries per tile of the PyTorch path."""


def logits_entropy_ref(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of ``logits [n, v]`` in float64 (``-(softmax · log_softmax).sum``)."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    p = lp.exp()
    return -(torch.where(p > 0, p * lp, torch.zeros_like(lp))).sum(-1)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _fold(x, m_i, s_v, t_v):
        """Fold a float32 tile ``x [BLOCK_R, BLOCK_V]`` into per-lane sums ``s_v``, ``t_v``
        (same shape, reduced once at the end: one cross-warp reduction per tile, the max,
        instead of three) and the row max ``m_i [BLOCK_R]``."""
        tmax = tl.max(x, 1)
        # rescale only in tiles that raise some row's max: after the first tiles of a row
        # that is rare (tile k of iid logits holds a new max with probability 1/k)
        if tl.sum((tmax > m_i).to(tl.int32), 0) > 0:
            m_new = tl.maximum(m_i, tmax)
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.where(m_i == float("-inf"), 0.0, tl.exp(m_i - safe))
            s_v = s_v * alpha[:, None]
            t_v = t_v * alpha[:, None]
            m_i = m_new
        p = tl.exp(x - tl.where(m_i == float("-inf"), 0.0, m_i)[:, None])
        s_v += p
        # -inf logits have p = 0; clamping them to -FLT_MAX keeps p · x at 0 (not NaN) with
        # one max instead of a compare and a select
        t_v += p * tl.maximum(x, -3.4e38)
        return m_i, s_v, t_v

    @triton.jit
    def _logits_entropy_kernel(
        X,
        OUT_M,
        OUT_S,
        OUT_T,
        n,
        v,
        stride_x,
        size_class,
        BLOCK_R: tl.constexpr,
        BLOCK_V: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        """Partials of rows [pid*BLOCK_R, +BLOCK_R) of ``logits [n, v]``, one pass over v.

        Whole tiles load without a mask (rows past n read row n-1, dropped by the store) and
        only the last, ragged tile is masked: a compare and a select per element cost
        bandwidth in a kernel this light. ``STAGES`` > 1 pipelines the loads (cp.async
        through shared memory, STAGES - 1 tiles in flight). ``size_class`` only keys the
        autotuner.
        """
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_V)
        base = X + tl.minimum(rows, n - 1).to(tl.int64)[:, None] * stride_x
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        s_v = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
        t_v = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
        v_main = (v // BLOCK_V) * BLOCK_V
        for vs in tl.range(0, v_main, BLOCK_V, num_stages=STAGES):
            x = tl.load(base + (vs + cols)[None, :]).to(tl.float32)
            m_i, s_v, t_v = _fold(x, m_i, s_v, t_v)
        for vs in tl.range(v_main, v, BLOCK_V, num_stages=STAGES):
            c = vs + cols
            x = tl.load(base + c[None, :], mask=(c < v)[None, :], other=float("-inf"))
            m_i, s_v, t_v = _fold(x.to(tl.float32), m_i, s_v, t_v)
        rmask = rows < n
        tl.store(OUT_M + rows, m_i, mask=rmask)
        tl.store(OUT_S + rows, tl.sum(s_v, 1), mask=rmask)
        tl.store(OUT_T + rows, tl.sum(t_v, 1), mask=rmask)

    def _config(block_v: int, stages: int):
        return triton.Config({"BLOCK_R": 1, "BLOCK_V": block_v, "STAGES": stages}, num_warps=1)

    # The configs that won a shape of the autotuned H200 grid (bf16, n = 2K/8K/32K, v =
    # 151,936/128,256; bytes read over a device copy's, benchmarks/KERNELS.md)
    LOGITS_CONFIGS = [
        _config(1024, 2),  # n = 2K/8K: 0.724/0.810 (v = 151,936), 0.704/0.777 (v = 128,256)
        _config(512, 2),  # n = 32K, v = 151,936: 0.844
        _config(1024, 1),  # n = 32K, v = 128,256: 0.788
    ]
    _logits_entropy_tuned = triton.autotune(LOGITS_CONFIGS, key=["v", "size_class"])(
        _logits_entropy_kernel
    )


def logits_entropy_partials_triton(
    logits: torch.Tensor,
    block_r: int | None = None,
    block_v: int | None = None,
    stages: int = 2,
    num_warps: int = 1,
):
    """Partials (m, s, t) float32 [n] of ``logits [n, v]`` (rows contiguous) in one pass.

    On CUDA without explicit block sizes the launch is autotuned per (v, size class of n);
    otherwise one config (default: 1 row × 1024, the most frequent winner).
    """
    require_triton(logits)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n, v = logits.shape
    m, s, t = (dispatch.alloc((n,), logits.device) for _ in range(3))
    # tuned apart: up to 4K rows, up to 16K, more (the best tile width differs)
    size_class = 0 if n <= 4096 else (1 if n <= 16384 else 2)
    args = (logits, m, s, t, n, v, logits.stride(0), size_class)
    if logits.is_cuda and block_r is None and block_v is None and autotune_enabled():
        _logits_entropy_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_R"]),)](*args)
    else:
        block_r, block_v = block_r or 1, block_v or 1024
        _logits_entropy_kernel[(triton.cdiv(n, block_r),)](
            *args, BLOCK_R=block_r, BLOCK_V=block_v, STAGES=stages, num_warps=num_warps
        )
    return m, s, t


def logits_entropy(
    logits: torch.Tensor, vocab_chunk: int = VOCAB_CHUNK, backend: str = "auto"
) -> torch.Tensor:
    """Entropy of each row of ``logits [n, v]`` (any float dtype) as float32 [n]."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [n, v], got shape {tuple(logits.shape)}")
    if logits.dtype not in FLOATS:
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits_entropy: empty input, shape {tuple(logits.shape)}")
    if pick_backend(logits, backend) == "triton":
        return finalize_partials(*logits_entropy_partials_triton(logits))[0]
    n = logits.shape[0]
    m = torch.full((n,), float("-inf"), dtype=torch.float32, device=logits.device)
    s = torch.zeros(n, dtype=torch.float32, device=logits.device)
    t = torch.zeros(n, dtype=torch.float32, device=logits.device)
    for vs in range(0, logits.shape[1], vocab_chunk):
        m, s, t = merge_partials((m, s, t), tile_partials(logits[:, vs : vs + vocab_chunk].float()))
    return finalize_partials(m, s, t)[0]
