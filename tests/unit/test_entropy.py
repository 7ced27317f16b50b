"""Entropy kernels (chunked PyTorch and Triton) against a float64 reference.

Fresh random inputs, shapes that are not powers of two, fp32/bf16/fp16; errors reported as
‖out−ref‖/‖ref‖. Triton runs under the interpreter on CPU (``TRITON_INTERPRET=1``, set by
conftest) and compiled on CUDA; outputs are poisoned with NaN before every Triton launch.
"""

from __future__ import annotations

import math

import pytest
import torch

import policylong.kernels.entropy as E
from policylong.kernels import (
    entropy_reduction,
    entropy_reduction_ref,
    fused_linear_entropy,
    fused_linear_entropy_nll,
    linear_entropy_ref,
    logits_entropy,
    logits_entropy_ref,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}
DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [
    "torch",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(not E.HAS_TRITON, reason="triton is not installed"),
    ),
]


def rel(out, ref):
    return float((out.double().cpu() - ref).norm() / ref.norm())


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every Triton output buffer starts as NaN: a row the kernel forgets stays NaN."""
    real = E._alloc
    monkeypatch.setattr(E, "_alloc", lambda shape, device: real(shape, device).fill_(math.nan))


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


VARIANTS = [  # (tma, flatten): operand loads by pointer or tensor descriptor, loop nest as is
    (False, False),  # or flattened by the compiler
    (False, True),
    (True, False),
    (True, True),
]


@pytest.mark.skipif(not E.HAS_TRITON, reason="triton is not installed")
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
        m, s, t = E.linear_entropy_partials_triton(
            h, w, block_n=64, block_k=16, splits=splits, tma=tma, flatten=flatten
        )
        out, _ = E.finalize_partials(m, s, t)
        assert rel(out, ref) < 1e-5, splits


@pytest.mark.skipif(not E.HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("tma,flatten", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_variants_low_precision(dtype, tma, flatten):
    """bf16/fp16 operands, d not a multiple of BLOCK_K (masked or zero-filled k tail), a
    vocabulary that leaves a ragged last tile in every split, rows not a multiple of BLOCK_M."""
    g = torch.Generator().manual_seed(11)
    h = (torch.randn(23, 40, generator=g) * 0.5).to(dtype)
    w = (torch.randn(1003, 40, generator=g) * 0.5).to(dtype)
    ref = linear_entropy_ref(h, w)
    m, s, t = E.linear_entropy_partials_triton(
        h.to(DEV),
        w.to(DEV),
        block_n=64,
        block_k=16 if DEV == "cpu" else 32,
        splits=3,
        tma=tma,
        flatten=flatten,
    )
    out, _ = E.finalize_partials(m, s, t)
    assert rel(out, ref) < TOL[dtype]


@pytest.mark.skipif(not E.HAS_TRITON, reason="triton is not installed")
def test_tma_needs_aligned_rows():
    h = torch.randn(4, 9).to(DEV)  # 36-byte rows: no tensor descriptor
    with pytest.raises(ValueError, match="16-byte aligned"):
        E.linear_entropy_partials_triton(h, torch.randn(50, 9).to(DEV), block_n=16, tma=True)


def test_split_heuristic_fills_the_gpu(monkeypatch):
    """The split count keeps wave-quantisation loss small on a 132-SM GPU, and gives the
    grouped grid enough splits for L2 reuse once there are more than 8 row blocks."""
    if not E.HAS_TRITON:
        pytest.skip("triton is not installed")

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: Props())
    cuda = torch.device("cuda")
    for n, v in [(2048, 151_936), (8192, 151_936), (32768, 151_936), (2048, 128_256), (300, 5000)]:
        S = E._num_splits(n, 128, v, cuda)
        rb = -(-n // 128)
        tiles = -(-v // E.SPLIT_QUANTUM)
        per = -(-tiles // S)
        waves = -(-(rb * S) // 132)
        eff = rb * tiles / (waves * 132 * per)
        # the best achievable efficiency with this tile grain is at least the one-split one
        one = rb * tiles / (-(-rb // 132) * 132 * tiles)
        assert eff >= one - 1e-9 and 1 <= S <= tiles, (n, v, S, eff)
        if rb > 8:  # grouped grid: the 132 resident programs span 8 row blocks
            assert S >= 17 and eff > 0.9, (n, v, S, eff)
    assert E._num_splits(32768, 128, 151_936, torch.device("cpu")) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logits_entropy_matches_float64(dtype, backend):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(29, 3001, generator=g) * 3).to(dtype)
    out = logits_entropy(x.to(DEV), vocab_chunk=500, backend=backend)
    assert rel(out, logits_entropy_ref(x)) < TOL[dtype]


def _exact_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows 0, 1, 2, 4, 5, 6 of ``x [7, v ≥ 700]`` (in place): uniform (entropy log v);
    one-hot among -inf (exactly 0); a -inf prefix; -inf logits in a middle tile (the
    deferred fold's NaN redo); a new max in every tile; a spike of 45 in a late tile."""
    x[0] = 0.0
    x[1] = float("-inf")
    x[1, 700] = 3.0
    x[2, :400] = float("-inf")
    x[4, 500:520] = float("-inf")
    x[5] = torch.linspace(-20, 20, x.shape[1])
    x[6, 650] = 45.0
    return x


@pytest.mark.skipif(not E.HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    "lane,lazy,stages,tail,splits,group,defer",
    [
        (False, False, 1, False, 1, False, False),
        (True, False, 1, False, 1, False, False),
        (True, True, 1, False, 1, False, False),
        (True, True, 3, False, 1, False, False),
        (True, True, 1, True, 1, False, False),
        (True, False, 2, True, 1, False, False),
        (False, False, 1, False, 3, False, False),
        (True, True, 2, True, 4, False, False),
        (True, True, 1, True, 1, True, False),
        (True, True, 2, True, 3, True, False),
        (True, True, 1, True, 1, True, True),
        (True, True, 2, True, 2, True, True),
    ],
)
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
def test_triton_logits_variants_exact_cases(lane, lazy, stages, tail, splits, group, defer):
    """Every loop structure of the logits kernel (per-row sums, per-lane sums, per-lane with
    lazy rescaling, pipelined loads, unmasked whole tiles + a masked tail, sums grouped per
    thread, no tile max but a checked reference), with the vocabulary in one range or split
    over programs and merged, on -inf rows (one split sees only -inf in row 1), a one-hot
    row, a uniform row, a row whose max rises in every tile (forces the lazy rescale; the
    deferred fold redoes tiles once it is 14 above its reference), a spike of 45 in a late
    tile, -inf logits in a middle tile (the deferred fold skips the clamp and redoes the
    tile on the NaN), a ragged last tile and rows past n in the last block (7 rows, BLOCK_R
    = 4)."""
    x = _exact_rows(torch.randn(7, 777))
    m, s, t = E.logits_entropy_partials_triton(
        x.to(DEV),
        block_r=4,
        block_v=128,
        lane=lane,
        lazy=lazy,
        stages=stages,
        tail=tail,
        splits=splits,
        group=group,
        defer=defer,
    )
    out, _ = E.finalize_partials(m, s, t)
    out = out.cpu()
    assert abs(float(out[0]) - math.log(777)) < 1e-5 and float(out[1]) == 0.0
    assert rel(out, logits_entropy_ref(x)) < 1e-6


@pytest.mark.skipif(not E.HAS_TRITON, reason="triton is not installed")
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("v,offset", [(778, 0), (777, 0), (778, 1)])
def test_triton_logits_bf16_pairs(v, offset):
    """``defer`` on bf16 reads two logits per int32 word where rows allow it (even stride,
    4-byte aligned start; here v = 778) and falls back to bf16 loads where they do not (odd
    v = 777; a view starting one element in): the exact cases of the variants test, against
    float64 on the same bf16 values, and the same partials as ``pairs=False`` up to
    summation order."""
    base = torch.randn(7, v + offset)
    x = _exact_rows(base[:, offset:])
    x[3, 1::2] = float("-inf")  # every word holds one -inf logit: each tile redone
    xb = base.to(torch.bfloat16).to(DEV)[:, offset:]
    assert E._pairs_ok(xb) == (v % 2 == 0 and offset == 0)
    kw = dict(block_r=4, block_v=128, defer=True, tail=True)
    out, _ = E.finalize_partials(*E.logits_entropy_partials_triton(xb, **kw))
    out = out.cpu()
    assert abs(float(out[0]) - math.log(v)) < 1e-5 and float(out[1]) == 0.0
    assert rel(out, logits_entropy_ref(xb.cpu())) < 1e-6
    plain, _ = E.finalize_partials(*E.logits_entropy_partials_triton(xb, pairs=False, **kw))
    assert rel(out, plain.cpu()) < 1e-6
    if not E._pairs_ok(xb):
        with pytest.raises(ValueError, match="pairs=True needs"):
            E.logits_entropy_partials_triton(xb, pairs=True, **kw)


@pytest.mark.skipif(not E.HAS_TRITON, reason="triton is not installed")
def test_fast_exp_is_cuda_only():
    if DEV == "cuda":
        pytest.skip("checks the interpreter's error (tests/gpu runs the variant)")
    with pytest.raises(ValueError, match="CUDA only"):
        E.logits_entropy_partials_triton(torch.randn(3, 100), block_r=1, fast_exp=True)


@pytest.mark.skipif(not E.HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,defer", [(False, False), (True, False), (True, True)])
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
def test_triton_logits_lazy_dtypes(dtype, group, defer):
    """Lazy per-lane sums on every input dtype; ``group`` adds 8 (bf16/fp16) or 4 (fp32)
    neighbouring elements per thread first; ``defer`` skips the tile max (9 rows over
    BLOCK_R = 2: a clamped last block; 2,500 = 9 whole tiles of 256 + a ragged tail)."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(9, 2500, generator=g) * 4).to(dtype)
    m, s, t = E.logits_entropy_partials_triton(
        x.to(DEV), block_r=2, block_v=256, lazy=True, tail=True, group=group, defer=defer
    )
    out, _ = E.finalize_partials(m, s, t)
    assert rel(out, logits_entropy_ref(x)) < TOL[dtype]


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
    E.fused_linear_entropy(h, w, row_chunk=64, vocab_chunk=1000, backend="torch")
    assert max(seen) <= 64 * 1000 < 300 * 5000


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
        ("backend", ValueError, "entropy backend 'cuda'"),
        ("logits_empty", ValueError, "empty input"),
    ],
)
def test_bad_input_is_a_clear_error(bad, exc, match):
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
            fused_linear_entropy_nll(h, w, torch.zeros(3, dtype=torch.long))
        elif bad == "backend":
            fused_linear_entropy(h, w, backend="cuda")
        else:
            logits_entropy(torch.zeros(0, 5))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter error")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not E.HAS_TRITON:
        pytest.skip("triton is not installed")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_linear_entropy(torch.randn(4, 8), torch.randn(10, 8), backend="triton")


@pytest.mark.skipif(not E.HAS_TRITON, reason="triton is not installed")
def test_logits_autotuner_config_sets(monkeypatch):
    """The timed configs by default; with POLICYLONG_LOGITS_CONFIGS=all also the untimed
    candidates (grouped sums), which extend the timed set; anything else is an error."""
    monkeypatch.delenv("POLICYLONG_LOGITS_CONFIGS", raising=False)
    timed = E.logits_autotuner()
    monkeypatch.setenv("POLICYLONG_LOGITS_CONFIGS", "all")
    every = E.logits_autotuner()
    assert timed.configs == every.configs[: len(timed.configs)]
    assert not any(c.kwargs.get("GROUP") for c in timed.configs)
    assert any(c.kwargs.get("GROUP") for c in every.configs[len(timed.configs) :])
    monkeypatch.setenv("POLICYLONG_LOGITS_CONFIGS", "grouped")
    with pytest.raises(ValueError, match="POLICYLONG_LOGITS_CONFIGS"):
        E.logits_autotuner()


@pytest.mark.skipif(not E.HAS_TRITON, reason="triton is not installed")
def test_grouped_sums_take_fewer_registers_on_sm90(tmp_path):
    """The point of ``group``: compiled for sm_90 by Triton's own ptxas (no GPU needed), the
    1×1024 one-warp kernel with grouped sums fits in at most 64 registers per thread (32
    resident warps per SM), where per-element sums need over 96 (at most 20 warps). Runs in a
    subprocess: this one has the kernels built for the interpreter."""
    import json
    import os
    import subprocess
    import sys

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip(f"this triton wheel ships no cuobjdump ({tool})")
    examples = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from sass_logits import compile_sm90\n"
        "base = dict(BLOCK_R=1, BLOCK_V=1024, LANE=True, LAZY=True, STAGES=1, PROBE=0, TAIL=True)\n"
        "print(json.dumps([compile_sm90(base, 1, 'bf16'),"
        " compile_sm90({**base, 'GROUP': True}, 1, 'bf16')]))"
    )
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    log = tmp_path / "sass.log"
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-c", code, examples], stdout=f, stderr=f, env=env)
    out = log.read_text()
    assert rc.returncode == 0, out[-3000:]
    lane, grouped = json.loads(out.strip().splitlines()[-1])
    assert grouped["regs"] <= 64 < 96 < lane["regs"], (lane, grouped)
    assert grouped["warps_per_sm"] == 32 and lane["spills"] == grouped["spills"] == 0


@pytest.mark.skipif(not E.HAS_TRITON, reason="triton is not installed")
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_logits_autotuner_configs_each_correct(dtype, monkeypatch):
    """Every timed and candidate config, launched through the autotuner's own wrapper (one
    config per tuner, so no benchmarking) as on a GPU: the PAIRS heuristic sees the config's
    DEFER and the tensor (bf16 aligned rows: pairs on; fp32: off) and each config's entropy
    matches float64. fast_exp is inline PTX, so it is swapped for tl.exp2 here (tests/gpu
    runs it compiled)."""
    import triton

    if DEV == "cuda":
        pytest.skip("the interpreter's run of the tuner path (a GPU benchmarks it instead)")
    seen = []
    real = E._pairs_ok
    monkeypatch.setattr(E, "_pairs_ok", lambda x: seen.append(real(x)) or seen[-1])
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(5, 3000, generator=g) * 3).to(dtype)
    x[1, 2100:2110] = float("-inf")
    x[2, 2900] = 40.0
    ref = logits_entropy_ref(x)
    n, v = x.shape
    for c in E._LOGITS_CONFIGS + E._LOGITS_CANDIDATES:
        cfg = triton.Config({**c.kwargs, "FAST_EXP": False}, num_warps=c.num_warps)
        pm, ps, pt = (torch.full((1, n), float("nan")) for _ in range(3))
        seen.clear()
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_R"]), 1)  # noqa: E731
        E._logits_tuner([cfg])[grid](x, pm, ps, pt, n, v, x.stride(0), 4096, 1, 0)
        out, _ = E.finalize_partials(pm[0], ps[0], pt[0])
        assert rel(out, ref) < 1e-6, c
        assert seen == ([dtype == torch.bfloat16] if c.kwargs.get("DEFER") else []), c
