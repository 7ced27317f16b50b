"""Entropy kernels (chunked PyTorch and Triton) against a float64 reference.

Fresh random inputs, shapes that are not powers of two, fp32/bf16/fp16; errors reported as
‖out−ref‖/‖ref‖. Triton runs under the interpreter on CPU (``TRITON_INTERPRET=1``, set by
conftest) and compiled on CUDA; outputs are poisoned with NaN before every Triton launch.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from policylong.kernels import (
    HAS_TRITON,
    dispatch,
    entropy_reduction,
    entropy_reduction_ref,
    fused_linear_entropy,
    fused_linear_entropy_nll,
    fused_linear_stats,
    linear_entropy_partials,
    linear_entropy_ref,
    logits_entropy,
    logits_entropy_ref,
    partials,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]

if HAS_TRITON:
    from policylong.kernels import linear_entropy_triton as LT

    # the package exports the function of the same name
    LE = importlib.import_module("policylong.kernels.logits_entropy")


def rel(out, ref):
    return float((out.double().cpu() - ref).norm() / ref.norm())


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every Triton output buffer starts as NaN: a row the kernel forgets stays NaN."""
    real = dispatch.alloc
    monkeypatch.setattr(dispatch, "alloc", lambda *a, **k: real(*a, **k).fill_(math.nan))


def _exact_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows 0, 1, 2, 4, 5, 6 of ``x [7, v ≥ 700]`` (in place): uniform (entropy log v);
    one-hot among -inf (exactly 0); a -inf prefix; -inf logits in a middle tile; a new max in
    every tile; a spike of 45 in a late tile."""
    x[0] = 0.0
    x[1] = float("-inf")
    x[1, 700] = 3.0
    x[2, :400] = float("-inf")
    x[4, 500:520] = float("-inf")
    x[5] = torch.linspace(-20, 20, x.shape[1])
    x[6, 650] = 45.0
    return x


# -- partials ----------------------------------------------------------------------------------


def test_merged_tile_partials_match_float64():
    """Tiles merged in any order give the float64 partials of the whole row, -inf rows and
    -inf tiles included (a tile of only -inf contributes nothing)."""
    x = _exact_rows(torch.randn(7, 777) * 3)
    x[3, 300:] = float("-inf")
    ref_m, ref_s, ref_t = partials.partials_ref(x)
    acc = partials.tile_partials(x[:, 600:])
    for lo, hi in [(0, 100), (400, 600), (100, 400)]:
        acc = partials.merge_partials(acc, partials.tile_partials(x[:, lo:hi]))
    m, s, t = acc
    assert torch.equal(m.double(), ref_m)
    assert rel(s, ref_s) < 1e-6 and rel(t, ref_t) < 1e-6
    h, lse = partials.finalize_partials(m, s, t)
    assert rel(h, logits_entropy_ref(x)) < 1e-6
    assert rel(lse, torch.logsumexp(x.double(), -1)) < 1e-6


# -- fused linear entropy ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,v", [(37, 24, 1001), (5, 64, 3), (130, 40, 5003)])
def test_fused_linear_entropy_matches_float64(n, d, v, dtype, backend):
    g = torch.Generator().manual_seed(n * v + d)
    h = (torch.randn(n, d, generator=g) * 0.5).to(dtype)
    w = (torch.randn(v, d, generator=g) * 0.5).to(dtype)
    tgt = torch.randint(0, v, (n,), generator=g)
    ref_h, ref_nll = linear_entropy_ref(h, w, tgt)
    h, w, tgt = h.to(DEV), w.to(DEV), tgt.to(DEV)
    # small torch tiles so that several row and vocab chunks are merged
    out_h, out_nll = fused_linear_entropy_nll(
        h, w, tgt, row_chunk=16, vocab_chunk=257, backend=backend
    )
    assert out_h.dtype == torch.float32 and out_h.shape == (n,)
    assert torch.isfinite(out_h).all() and torch.isfinite(out_nll).all()
    assert rel(out_h, ref_h) < TOL[dtype]
    assert rel(out_nll, ref_nll) < TOL[dtype]
    assert rel(fused_linear_entropy(h, w, backend=backend), ref_h) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_stats_matches_float64(dtype, backend):
    """Entropy, NLL and max logit against float64 materialised logits; the target logit is
    the max exactly where the target is the float64 argmax (rows with a planted winner)."""
    g = torch.Generator().manual_seed(4)
    n, d, v = 41, 32, 1203
    h = (torch.randn(n, d, generator=g) * 0.5).to(dtype)
    w = (torch.randn(v, d, generator=g) * 0.5).to(dtype)
    tgt = torch.randint(0, v, (n,), generator=g)
    logits = h.double() @ w.double().T
    tgt[::3] = logits[::3].argmax(-1)  # a third of the targets are the top-1 token
    out = fused_linear_stats(h.to(DEV), w.to(DEV), tgt.to(DEV), backend=backend)
    assert len(out) == 4 and all(o.dtype == torch.float32 and o.shape == (n,) for o in out)
    ent, nll, mx, tl = (o.cpu() for o in out)
    ref_nll = torch.logsumexp(logits, -1) - logits.gather(1, tgt[:, None])[:, 0]
    assert rel(ent, logits_entropy_ref(logits)) < TOL[dtype]
    assert rel(nll, ref_nll) < TOL[dtype]
    assert rel(mx, logits.amax(-1)) < TOL[dtype]
    assert rel(tl, logits.gather(1, tgt[:, None])[:, 0]) < TOL[dtype]
    top1 = tl >= mx - 1e-6 * mx.abs().clamp_min(1.0)
    if dtype == torch.float32:
        assert torch.equal(top1, logits.argmax(-1) == tgt)
    assert top1[::3].all()


def test_fused_linear_stats_shares_the_torch_path():
    """On CPU the stats are the chunked path's, bit for bit: the same numbers as
    ``fused_linear_entropy_nll`` and as evaluation's partials + combine + finalize."""
    g = torch.Generator().manual_seed(9)
    h, w = torch.randn(1500, 48, generator=g), torch.randn(9000, 48, generator=g)
    tgt = torch.randint(0, 9000, (1500,), generator=g)
    ent, nll, mx, _ = fused_linear_stats(h, w, tgt)
    ent2, nll2 = fused_linear_entropy_nll(h, w, tgt)
    m, s, t = partials.combine_partials(*linear_entropy_partials(h, w))
    assert torch.equal(ent, ent2) and torch.equal(nll, nll2) and torch.equal(mx, m)
    assert torch.equal(nll, partials.finalize_partials(m, s, t)[1] - (h * w[tgt]).sum(-1))


VARIANTS = [  # (tma, flatten): operand loads by pointer or tensor descriptor, loop nest as is
    (False, False),  # or flattened by the compiler
    (False, True),
    (True, False),
    (True, True),
]


@needs_triton
@pytest.mark.parametrize("tma,flatten", VARIANTS)
def test_triton_vocab_splits_merge_exactly(tma, flatten):
    """Several vocab splits (as on a GPU with short inputs) merge to the one-split result, for
    every variant of the fused kernel; d = 48 is a multiple of BLOCK_K = 16 (no k mask) for
    the pointer path, and rows/columns past the ends are clamped or zero-filled."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(19, 48, generator=g).to(DEV)
    w = torch.randn(777, 48, generator=g).to(DEV)
    ref = linear_entropy_ref(h.cpu(), w.cpu())
    for splits in (1, 2, 5):
        m, s, t = LT.linear_entropy_partials_triton(
            h, w, block_n=64, block_k=16, splits=splits, tma=tma, flatten=flatten
        )
        out, _ = partials.finalize_partials(m, s, t)
        assert rel(out, ref) < 1e-5, splits


@needs_triton
@pytest.mark.parametrize("tma,flatten", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_variants_low_precision(dtype, tma, flatten):
    """bf16/fp16 operands, d not a multiple of BLOCK_K (masked or zero-filled k tail), a
    vocabulary that leaves a ragged last tile in every split, rows not a multiple of BLOCK_M."""
    g = torch.Generator().manual_seed(11)
    h = (torch.randn(23, 40, generator=g) * 0.5).to(dtype)
    w = (torch.randn(1003, 40, generator=g) * 0.5).to(dtype)
    ref = linear_entropy_ref(h, w)
    m, s, t = LT.linear_entropy_partials_triton(
        h.to(DEV),
        w.to(DEV),
        block_n=64,
        block_k=16 if DEV == "cpu" else 32,
        splits=3,
        tma=tma,
        flatten=flatten,
    )
    out, _ = partials.finalize_partials(m, s, t)
    assert rel(out, ref) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("i", range(6))
def test_each_linear_config_matches_float64(i):
    """Every shipped autotune config, launched with its own tile shape, stages and warps
    (the interpreter ignores the last two): 150 rows (a ragged last block of 128 or 256),
    v = 700 in 2 splits, d = 64 = one BLOCK_K."""
    if DEV == "cuda":
        pytest.skip("tests/gpu compiles the configs at the Qwen2.5 vocabulary")
    c = LT.LINEAR_CONFIGS[i]
    g = torch.Generator().manual_seed(i)
    h = (torch.randn(150, 64, generator=g) * 0.5).to(torch.bfloat16)
    w = (torch.randn(700, 64, generator=g) * 0.5).to(torch.bfloat16)
    kw = c.kwargs
    m, s, t = LT.linear_entropy_partials_triton(
        h,
        w,
        block_m=kw["BLOCK_M"],
        block_n=kw["BLOCK_N"],
        block_k=kw["BLOCK_K"],
        splits=2,
        tma=kw["TMA"],
        flatten=kw["FLATTEN"],
        group_m=kw["GROUP_M"],
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )
    assert rel(partials.finalize_partials(m, s, t)[0], linear_entropy_ref(h, w)) < 2e-3


@needs_triton
def test_unaligned_rows_get_the_pointer_config():
    """The autotuner tries the tensor-descriptor configs on 16-byte aligned rows and the
    pointer config, the only one without descriptors, on rows that are not."""
    w = torch.randn(50, 16)
    aligned = LT._prune_linear(LT.LINEAR_CONFIGS, {"H": torch.randn(4, 16), "W": w})
    ragged = LT._prune_linear(LT.LINEAR_CONFIGS, {"H": torch.randn(4, 9), "W": w[:, :9]})
    assert len(aligned) == 5 and all(c.kwargs["TMA"] for c in aligned)
    assert len(ragged) == 1 and not ragged[0].kwargs["TMA"]


@needs_triton
def test_tma_needs_aligned_rows():
    h = torch.randn(4, 9).to(DEV)  # 36-byte rows: no tensor descriptor
    with pytest.raises(ValueError, match="16-byte aligned"):
        LT.linear_entropy_partials_triton(h, torch.randn(50, 9).to(DEV), block_n=16, tma=True)


@needs_triton
def test_split_heuristic_fills_the_gpu(monkeypatch):
    """The split count keeps wave-quantisation loss small on a 132-SM GPU, and gives the
    grouped grid enough splits for L2 reuse once there are more than 8 row blocks."""

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: Props())
    cuda = torch.device("cuda")
    for n, v in [(2048, 151_936), (8192, 151_936), (32768, 151_936), (2048, 128_256), (300, 5000)]:
        S = LT.num_splits(n, 128, v, cuda)
        rb = -(-n // 128)
        tiles = -(-v // LT.SPLIT_QUANTUM)
        per = -(-tiles // S)
        waves = -(-(rb * S) // 132)
        eff = rb * tiles / (waves * 132 * per)
        # the best achievable efficiency with this tile grain is at least the one-split one
        one = rb * tiles / (-(-rb // 132) * 132 * tiles)
        assert eff >= one - 1e-9 and 1 <= S <= tiles, (n, v, S, eff)
        if rb > 8:  # grouped grid: the 132 resident programs span 8 row blocks
            assert S >= 17 and eff > 0.9, (n, v, S, eff)
    assert LT.num_splits(32768, 128, 151_936, torch.device("cpu")) == 1


def test_never_materialises_full_logits(monkeypatch):
    """The largest matmul output of the torch path is one [row_chunk, vocab_chunk] tile."""
    seen = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        out = real(a, b)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    h, w = torch.randn(300, 16), torch.randn(5000, 16)
    fused_linear_entropy(h, w, row_chunk=64, vocab_chunk=1000, backend="torch")
    assert max(seen) <= 64 * 1000 < 300 * 5000


# -- logits entropy ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logits_entropy_matches_float64(dtype, backend):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(29, 3001, generator=g) * 3).to(dtype)
    out = logits_entropy(x.to(DEV), vocab_chunk=500, backend=backend)
    assert rel(out, logits_entropy_ref(x)) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("block_r,block_v,stages", [(4, 128, 1), (4, 128, 3), (1, 256, 2)])
def test_triton_logits_exact_cases(block_r, block_v, stages):
    """-inf rows, a one-hot row, a uniform row, a row whose max rises in every tile (the lazy
    rescale), a spike of 45 in a late tile, -inf logits in a middle tile, a ragged last tile
    and rows past n in the last block (7 rows, BLOCK_R = 4)."""
    x = _exact_rows(torch.randn(7, 777))
    m, s, t = LE.logits_entropy_partials_triton(
        x.to(DEV), block_r=block_r, block_v=block_v, stages=stages
    )
    out = partials.finalize_partials(m, s, t)[0].cpu()
    assert abs(float(out[0]) - math.log(777)) < 1e-5 and float(out[1]) == 0.0
    assert rel(out, logits_entropy_ref(x)) < 1e-6


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("i", range(3))
def test_each_logits_config_matches_float64(dtype, i):
    """Every shipped autotune config of the logits kernel on every input dtype (9 rows; 2,500
    = whole tiles + a ragged tail)."""
    c = LE.LOGITS_CONFIGS[i].kwargs
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(9, 2500, generator=g) * 4).to(dtype)
    x[2, 2100] = 40.0
    m, s, t = LE.logits_entropy_partials_triton(
        x.to(DEV), block_r=c["BLOCK_R"], block_v=c["BLOCK_V"], stages=c["STAGES"]
    )
    assert rel(partials.finalize_partials(m, s, t)[0], logits_entropy_ref(x)) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_cases(backend):
    v = 1000
    x = torch.randn(5, v)
    x[0] = 0.0  # uniform: log v
    x[1] = float("-inf")
    x[1, 17] = 5.0  # one-hot: 0
    x[2] = 0.0
    x[2, : v // 2] = float("-inf")  # half masked, half uniform: log(v/2)
    x[3, 1::2] = float("-inf")
    out = logits_entropy(x.to(DEV), vocab_chunk=300, backend=backend).cpu()
    assert torch.isfinite(out).all()
    assert abs(float(out[0]) - math.log(v)) < 1e-5
    assert float(out[1]) == 0.0
    assert abs(float(out[2]) - math.log(v // 2)) < 1e-5
    for i in (3, 4):
        assert abs(float(out[i]) - float(logits_entropy_ref(x[i : i + 1])[0])) < 1e-5


# -- entropy reduction, errors -----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_reduction_matches_reference(backend):
    g = torch.Generator().manual_seed(3)
    k, p, d, v = 5, 7, 12, 301
    w = torch.randn(v, d, generator=g)
    hid = torch.randn(k, p, d, generator=g)
    h0 = linear_entropy_ref(torch.randn(p, d, generator=g), w).float() + 0.5
    dh, ok = entropy_reduction(h0.to(DEV), hid.to(DEV), w.to(DEV), 0.2, backend=backend)
    rdh, rok = entropy_reduction_ref(h0, hid, w, 0.2)
    assert rel(dh, rdh) < 1e-5
    # the threshold agrees wherever the reference is not within rounding of tau
    clear = (rdh - 0.2).abs() > 1e-4
    assert torch.equal(ok.cpu()[clear], rok[clear])
    tgt = torch.randint(0, v, (p,), generator=g)
    _, _, nll = entropy_reduction(
        h0.to(DEV),
        hid.to(DEV),
        w.to(DEV),
        0.2,
        targets=tgt.to(DEV),
        return_nll=True,
        backend=backend,
    )
    _, rnll = linear_entropy_ref(hid.reshape(k * p, d), w, tgt.repeat(k))
    assert rel(nll.reshape(-1), rnll) < 1e-5


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        ("dims", ValueError, "hidden dim 8 != weight dim 9"),
        ("rank", ValueError, r"hidden must be \[n, d\]"),
        ("int", TypeError, "weight must be a floating tensor"),
        ("mixed", TypeError, "hidden is torch.float32 but weight is torch.bfloat16"),
        ("strided", ValueError, "weight must be contiguous"),
        ("empty", ValueError, "empty input"),
        ("targets", ValueError, r"targets must be \[n\]"),
        ("no_targets", ValueError, "fused_linear_stats needs targets"),
        ("backend", ValueError, "entropy backend 'cuda'"),
        ("env", ValueError, "POLICYLONG_ENTROPY_BACKEND='gpu'"),
        ("logits_empty", ValueError, "empty input"),
    ],
)
def test_bad_input_is_a_clear_error(bad, exc, match, monkeypatch):
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(exc, match=match):
        if bad == "dims":
            fused_linear_entropy(h, torch.randn(10, 9))
        elif bad == "rank":
            fused_linear_entropy(h[None], w)
        elif bad == "int":
            fused_linear_entropy(h, w.long())
        elif bad == "mixed":
            fused_linear_entropy(h, w.bfloat16())
        elif bad == "strided":
            fused_linear_entropy(h, torch.randn(8, 10).T)
        elif bad == "empty":
            fused_linear_entropy(h[:0], w)
        elif bad == "targets":
            fused_linear_stats(h, w, torch.zeros(3, dtype=torch.long))
        elif bad == "no_targets":
            fused_linear_stats(h, w, None)
        elif bad == "backend":
            fused_linear_entropy(h, w, backend="cuda")
        elif bad == "env":
            monkeypatch.setenv("POLICYLONG_ENTROPY_BACKEND", "gpu")
            fused_linear_entropy(h, w)
        else:
            logits_entropy(torch.zeros(0, 5))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter error")
@needs_triton
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_linear_entropy(torch.randn(4, 8), torch.randn(10, 8), backend="triton")
