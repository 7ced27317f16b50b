"""Chunked entropy against a float64 reference: odd shapes, several dtypes, exact cases."""

from __future__ import annotations

import math

import pytest
import torch
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


def rel(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,v", [(37, 24, 1001), (5, 64, 3), (130, 40, 5003)])
def test_fused_linear_entropy_matches_float64(n, d, v, dtype):
    g = torch.Generator().manual_seed(n * v + d)
    h = (torch.randn(n, d, generator=g) * 0.5).to(dtype)
    w = (torch.randn(v, d, generator=g) * 0.5).to(dtype)
    tgt = torch.randint(0, v, (n,), generator=g)
    ref_h, ref_nll = linear_entropy_ref(h, w, tgt)
    # small tiles so that several row and vocab chunks are merged
    out_h, out_nll = fused_linear_entropy_nll(h, w, tgt, row_chunk=16, vocab_chunk=257)
    assert out_h.dtype == torch.float32 and out_h.shape == (n,)
    assert rel(out_h, ref_h) < TOL[dtype]
    assert rel(out_nll, ref_nll) < TOL[dtype]
    assert rel(fused_linear_entropy(h, w), ref_h) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logits_entropy_matches_float64(dtype):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(29, 3001, generator=g) * 3).to(dtype)
    assert rel(logits_entropy(x, vocab_chunk=500), logits_entropy_ref(x)) < TOL[dtype]


def test_exact_cases():
    v = 1000
    x = torch.randn(4, v)
    x[0] = 0.0  # uniform: log v
    x[1] = float("-inf")
    x[1, 17] = 5.0  # one-hot: 0
    x[2, : v // 2] = float("-inf")  # half masked: uniform over v/2
    out = logits_entropy(x, vocab_chunk=300)
    assert torch.isfinite(out).all()
    assert abs(float(out[0]) - math.log(v)) < 1e-5
    assert float(out[1]) == 0.0
    assert abs(float(out[2]) - float(logits_entropy_ref(x[2:3])[0])) < 1e-5
    assert abs(float(out[3]) - float(logits_entropy_ref(x[3:4])[0])) < 1e-5


def test_never_materialises_full_logits(monkeypatch):
    """The largest matmul output is one [row_chunk, vocab_chunk] tile."""
    import policylong.kernels.entropy as E

    seen = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        out = real(a, b)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    h, w = torch.randn(300, 16), torch.randn(5000, 16)
    E.fused_linear_entropy(h, w, row_chunk=64, vocab_chunk=1000)
    assert max(seen) <= 64 * 1000 < 300 * 5000


def test_entropy_reduction_matches_reference():
    g = torch.Generator().manual_seed(3)
    k, p, d, v = 5, 7, 12, 301
    w = torch.randn(v, d, generator=g)
    hid = torch.randn(k, p, d, generator=g)
    h0 = linear_entropy_ref(torch.randn(p, d, generator=g), w).float() + 0.5
    dh, ok = entropy_reduction(h0, hid, w, 0.2)
    rdh, rok = entropy_reduction_ref(h0, hid, w, 0.2)
    assert rel(dh, rdh) < 1e-5
    assert torch.equal(ok, rok)
    tgt = torch.randint(0, v, (p,), generator=g)
    _, _, nll = entropy_reduction(h0, hid, w, 0.2, targets=tgt, return_nll=True)
    _, rnll = linear_entropy_ref(hid.reshape(k * p, d), w, tgt.repeat(k))
    assert rel(nll.reshape(-1), rnll) < 1e-5


@pytest.mark.parametrize("bad", ["dims", "rank", "int", "empty", "targets"])
def test_bad_input_is_a_clear_error(bad):
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises((ValueError, TypeError)) as e:
        if bad == "dims":
            fused_linear_entropy(h, torch.randn(10, 9))
        elif bad == "rank":
            fused_linear_entropy(h[None], w)
        elif bad == "int":
            fused_linear_entropy(h, w.long())
        elif bad == "empty":
            fused_linear_entropy(h[:0], w)
        else:
            fused_linear_entropy_nll(h, w, torch.zeros(3, dtype=torch.long))
    assert str(e.value)
