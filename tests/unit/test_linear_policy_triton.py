"""Triton backend of the fused linear policy head against float64 autograd and the torch path.

Under the interpreter on CPU (``TRITON_INTERPRET=1``, set by conftest), compiled on CUDA.
Fresh seeded inputs; shapes that are not powers of two, a vocabulary that leaves a ragged last
tile, ``d`` below, at and above ``BLOCK_K``, ``d_T ≠ d``, temperature ≠ 1, targets on the
first and last vocab entry; errors as ‖out−ref‖/‖ref‖. Every buffer the kernels write starts
as NaN (the ``dispatch.alloc`` hook), so a row, a vocab block or a first accumulation that is
loaded instead of stored shows.
"""

from __future__ import annotations

import math

import pytest
import torch

from policylong.kernels import HAS_TRITON, dispatch, fused_linear_policy, linear_policy_ref

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

if HAS_TRITON:
    from policylong.kernels import linear_policy_triton as LPT


def rel(out, ref):
    return float((out.detach().double().cpu() - ref.detach().cpu()).norm() / ref.detach().norm())


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    real = dispatch.alloc
    monkeypatch.setattr(dispatch, "alloc", lambda *a, **k: real(*a, **k).fill_(math.nan))


def make(n, d, dt, v, dtype, seed, teacher=True):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * 0.5).to(dtype)
    w = (torch.randn(v, d, generator=g) * 0.5).to(dtype)
    tgt = torch.randint(0, v, (n,), generator=g)
    tgt[:2] = torch.tensor([0, v - 1])  # the first and last entry of the shard
    th = tw = None
    if teacher:
        th = (torch.randn(n, dt, generator=g) * 0.5).to(dtype)
        tw = (torch.randn(v, dt, generator=g) * 0.5).to(dtype)
    return h, w, tgt, th, tw, torch.randn(3, n, generator=g)


def run(h, w, tgt, th, tw, temp, coefs, backend="triton"):
    """(outputs, dhidden, dweight) of the op for the loss ``Σ a·logp + b·entropy + c·kl``."""
    dev = lambda x: None if x is None else x.to(DEV)  # noqa: E731
    h1, w1 = h.detach().to(DEV).requires_grad_(), w.detach().to(DEV).requires_grad_()
    out = fused_linear_policy(h1, w1, dev(tgt), dev(th), dev(tw), temp, backend=backend)
    sum(o @ c.to(DEV) for o, c in zip(out, coefs) if o is not None).backward()
    return out, h1.grad, w1.grad


def ref64(h, w, tgt, th, tw, temp, coefs):
    h2, w2 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = linear_policy_ref(h2, w2, tgt, th, tw, temp)
    sum(o @ c.double() for o, c in zip(ref, coefs) if o is not None).backward()
    return ref, h2.grad, w2.grad


@needs_triton
@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    # interpreter tiles 16 × 64, BLOCK_K 32: 3 row blocks and 5 vocab tiles (the last 45
    # wide) with d, d_T below BLOCK_K; 2 row blocks, 3 tiles, d = 2 and d_T = 1 whole K blocks
    "n,d,dt,v,temp",
    [(37, 24, 20, 301, 0.7), (21, 64, 32, 130, 1.6)],
)
def test_triton_matches_float64(n, d, dt, v, temp, dtype, teacher):
    h, w, tgt, th, tw, coefs = make(n, d, dt, v, dtype, seed=n + v, teacher=teacher)
    out, dh, dw = run(h, w, tgt, th, tw, temp, coefs)
    ref, rdh, rdw = ref64(h, w, tgt, th, tw, temp, coefs)
    assert (out[2] is None) == (not teacher)
    for o, r in zip(out, ref):
        if r is not None:
            assert o.dtype == torch.float32 and o.shape == (n,) and torch.isfinite(o).all()
            assert rel(o, r) < TOL[dtype]
    assert dh.dtype == dtype and dw.dtype == dtype
    assert rel(dh, rdh) < TOL[dtype] and rel(dw, rdw) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_agrees_with_torch(dtype):
    """The two backends on the same inputs, int32 targets, a strided hidden (rows of a wider
    tensor) and a column-major weight (copied to row-major for the kernels)."""
    n, d, dt, v = 29, 40, 24, 205
    h, w, tgt, th, tw, coefs = make(n, d, dt, v, dtype, seed=2)
    wide = torch.zeros(n, d + 8, dtype=dtype)
    wide[:, :d] = h
    a = run(wide[:, :d], w.T.contiguous().T, tgt.int(), th, tw, 1.3, coefs)
    b = run(h, w, tgt, th, tw, 1.3, coefs, backend="torch")
    tol = 1e-6 if dtype == torch.float32 else 1e-3  # bf16: a few grads 1 ulp apart
    for x, y in zip(a[0], b[0]):
        assert rel(x, y.double()) < 1e-6
    assert rel(a[1], b[1].double()) < tol and rel(a[2], b[2].double()) < tol


@needs_triton
def test_vocab_splits_merge_exactly():
    """A shard that starts at vocab id 1000, in 1, 2 and 5 splits of 16-wide tiles: the max
    and the target logit are the same bits in every split count (the target lies in exactly
    one split), the sums agree with float64, and targets outside the shard (ids 999 and
    1301) give 0 while its edges (1000, 1300) give their logits."""
    n, d, dt, v, start, temp = 19, 24, 20, 301, 1000, 0.8
    h, w, _, th, tw, _ = make(n, d, dt, v, torch.float32, seed=4)
    g = torch.Generator().manual_seed(5)
    tgt = torch.randint(0, 3000, (n,), generator=g)
    tgt[:4] = torch.tensor([start - 1, start, start + v - 1, start + v])
    z = h.double() @ w.double().T / temp
    zt = th.double() @ tw.double().T / temp
    m = z.amax(-1)
    e = torch.exp(z - m[:, None])
    mt = zt.amax(-1)
    local = tgt - start
    inside = (local >= 0) & (local < v)
    ref = dict(
        m=m,
        s=e.sum(-1),
        t=(e * z).sum(-1),
        w=(e * (z - zt)).sum(-1),
        mT=mt,
        sT=torch.exp(zt - mt[:, None]).sum(-1),
        tl=torch.where(inside, z.gather(1, local.clamp(0, v - 1)[:, None])[:, 0], 0.0),
    )
    args = (h.to(DEV), w.to(DEV), tgt.to(DEV), th.to(DEV), tw.to(DEV), 1 / temp, start)
    first = None
    for splits in (1, 2, 5):
        parts, tl = LPT.policy_partials_triton(*args, splits=splits, BLOCK_N=16)
        got = dict(zip(("m", "s", "t", "w", "mT", "sT", "tl"), (*parts, tl)))
        for k, r in ref.items():
            assert rel(got[k], r) < 1e-6, (splits, k)
        assert (got["tl"][[0, 3]] == 0).all() and (got["tl"][[1, 2]] != 0).all()
        if first is None:
            first = got
        for k in ("m", "mT", "tl"):
            assert torch.equal(got[k], first[k]), (splits, k)


@needs_triton
def test_split_vocab_through_the_op(monkeypatch):
    """Forward and backward of the op with the forward's vocabulary in 3 splits (as on a GPU
    with short inputs), and dweight of bf16 and fp16 weights in 64-row launches (3 for 130
    rows; fp16 casts in the kernel, bf16 under the interpreter through PyTorch) equal to one
    launch bit for bit."""
    h, w, tgt, th, tw, coefs = make(23, 24, 20, 130, torch.float32, seed=6)
    ref, rdh, rdw = ref64(h, w, tgt, th, tw, 0.9, coefs)
    monkeypatch.setattr(LPT, "num_splits", lambda *a: 3)
    out, dh, dw = run(h, w, tgt, th, tw, 0.9, coefs)
    assert max(rel(o, r) for o, r in zip(out, ref)) < 1e-5
    assert rel(dh, rdh) < 1e-5 and rel(dw, rdw) < 1e-5
    for dtype in (torch.bfloat16, torch.float16):
        args = (h.to(dtype), w.to(dtype), tgt, th.to(dtype), tw.to(dtype), 0.9, coefs)
        whole = run(*args)[2]
        monkeypatch.setattr(LPT, "DW_CHUNK", 64)
        chunked = run(*args)[2]
        monkeypatch.setattr(LPT, "DW_CHUNK", 16_384)
        assert torch.equal(whole, chunked), dtype
        assert rel(chunked, ref64(*args)[2]) < 2e-3


@needs_triton
@pytest.mark.parametrize("which", [0, 1, 2])
def test_one_output_alone(which):
    """A loss of one output, ``out.sum()``: the other upstream grads are None and this one is
    an expanded view (stride 0), which the kernels index by row."""
    h, w, tgt, th, tw, _ = make(29, 18, 22, 177, torch.float32, seed=5)
    h1, w1 = h.detach().to(DEV).requires_grad_(), w.detach().to(DEV).requires_grad_()
    out = fused_linear_policy(h1, w1, tgt.to(DEV), th.to(DEV), tw.to(DEV), 1.3, backend="triton")
    out[which].sum().backward()
    h2, w2 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    linear_policy_ref(h2, w2, tgt, th, tw, 1.3)[which].sum().backward()
    assert rel(h1.grad, h2.grad) < 1e-5 and rel(w1.grad, w2.grad) < 1e-5


@needs_triton
def test_teacher_dtype_and_a_planted_kl_of_zero():
    """A bf16 teacher under a float32 student (each operand pair its own dot precision); a
    teacher equal to the student gives KL 0 and a KL gradient of 0."""
    h, w, tgt, th, tw, coefs = make(17, 24, 40, 150, torch.float32, seed=8)
    th, tw = th.bfloat16(), tw.bfloat16()
    out, dh, dw = run(h, w, tgt, th, tw, 0.9, coefs)
    ref, rdh, rdw = ref64(h, w, tgt, th, tw, 0.9, coefs)
    assert max(rel(o, r) for o, r in zip(out, ref)) < 1e-5
    assert rel(dh, rdh) < 1e-5 and rel(dw, rdw) < 1e-5
    h1, w1 = h.detach().to(DEV).requires_grad_(), w.detach().to(DEV).requires_grad_()
    tgt, h, w = tgt.to(DEV), h.to(DEV), w.to(DEV)
    _, _, kl = fused_linear_policy(h1, w1, tgt, h, w, 0.9, backend="triton")
    assert kl.abs().max() < 1e-5
    kl.sum().backward()
    assert h1.grad.abs().max() < 1e-5 and w1.grad.abs().max() < 1e-5


@needs_triton
def test_only_weight_needs_grad():
    h, w, tgt, th, tw, coefs = make(19, 12, 12, 100, torch.float32, seed=9)
    _, _, rdw = ref64(h, w, tgt, th, tw, 1.0, coefs)
    w1 = w.detach().to(DEV).requires_grad_()
    out = fused_linear_policy(h.to(DEV), w1, tgt.to(DEV), th.to(DEV), tw.to(DEV), backend="triton")
    sum(o @ c.to(DEV) for o, c in zip(out, coefs)).backward()
    assert rel(w1.grad, rdw) < 1e-5


def test_backend_choice(monkeypatch):
    """``auto`` keeps CPU tensors and float64 on the torch path (also where the variable
    forces triton); an explicit ``triton`` refuses float64, CPU tensors without the
    interpreter and a missing triton package, each naming the way out."""
    from policylong.kernels import linear_policy as LP

    h, w, tgt, th, tw, _ = make(6, 5, 7, 50, torch.float32, 1)
    calls = []
    real = LP.policy_partials
    monkeypatch.setattr(LP, "policy_partials", lambda *a: calls.append(1) or real(*a))
    fused_linear_policy(h, w, tgt, th, tw)
    assert calls == [1]  # auto on CPU: the chunked path
    monkeypatch.setenv("POLICYLONG_ENTROPY_BACKEND", "triton")
    out = fused_linear_policy(h.double(), w.double(), tgt, th.double(), tw.double())
    assert calls == [1, 1] and out[0].dtype == torch.float64
    if HAS_TRITON:
        with pytest.raises(TypeError, match="float64"):
            fused_linear_policy(h.double(), w.double(), tgt, backend="triton")
        monkeypatch.setattr(dispatch, "interpreting", lambda: False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            fused_linear_policy(h, w, tgt, backend="triton")
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        fused_linear_policy(h, w, tgt, backend="triton")
