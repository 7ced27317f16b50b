"""Fused linear policy head (log-prob, entropy, exact KL to a teacher) against float64 autograd.

Fresh seeded inputs, shapes that are not powers of two, fp32/bf16/fp16, temperature ≠ 1, with
and without a teacher; errors as ‖out−ref‖/‖ref‖ for the outputs and for the gradients of a
random combination of them. Every buffer the op writes row by row starts as NaN (the
``dispatch.alloc`` hook), so a row or vocab block it forgets shows.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from policylong.kernels import dispatch, fused_linear_policy, linear_policy_ref

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}


def rel(out, ref):
    return float((out.detach().double() - ref.detach()).norm() / ref.detach().norm())


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    real = dispatch.alloc
    monkeypatch.setattr(dispatch, "alloc", lambda *a, **k: real(*a, **k).fill_(math.nan))


def make(n, d, dt, v, dtype, seed, teacher=True, teacher_dtype=None):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * 0.5).to(dtype)
    w = (torch.randn(v, d, generator=g) * 0.5).to(dtype)
    tgt = torch.randint(0, v, (n,), generator=g)
    th = tw = None
    if teacher:
        tdt = teacher_dtype or dtype
        th = (torch.randn(n, dt, generator=g) * 0.5).to(tdt)
        tw = (torch.randn(v, dt, generator=g) * 0.5).to(tdt)
    coefs = torch.randn(3, n, generator=g)
    return h, w, tgt, th, tw, coefs


def run_both(h, w, tgt, th, tw, temp, coefs, **kw):
    """(outputs, dhidden, dweight) of the op and of the float64 reference, for the loss
    ``Σ a·logp + b·entropy + c·kl`` (the terms present)."""
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = fused_linear_policy(h1, w1, tgt, th, tw, temp, **kw)
    h2, w2 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = linear_policy_ref(h2, w2, tgt, th, tw, temp)
    for res, c in ((out, coefs), (ref, coefs.double())):
        sum(o @ ci.to(o.dtype) for o, ci in zip(res, c) if o is not None).backward()
    return (out, h1.grad, w1.grad), (ref, h2.grad, w2.grad)


@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "n,d,dt,v,temp", [(37, 24, 20, 1001, 0.7), (5, 64, 64, 3, 1.0), (130, 40, 56, 2003, 1.6)]
)
def test_forward_and_grads_match_float64(n, d, dt, v, temp, dtype, teacher):
    h, w, tgt, th, tw, coefs = make(n, d, dt, v, dtype, seed=n + v + d, teacher=teacher)
    # small tiles: several row and vocab chunks, a ragged last one of each
    (out, dh, dw), (ref, rdh, rdw) = run_both(
        h, w, tgt, th, tw, temp, coefs, row_chunk=16, vocab_chunk=257
    )
    assert (out[2] is None) == (not teacher)
    for o, r in zip(out, ref):
        if r is None:
            continue
        assert o.dtype == torch.float32 and o.shape == (n,) and torch.isfinite(o).all()
        assert rel(o, r) < TOL[dtype]
    assert dh.dtype == dtype and dw.dtype == dtype
    assert rel(dh, rdh) < TOL[dtype] and rel(dw, rdw) < TOL[dtype]


def test_teacher_in_another_dtype_and_a_planted_kl_of_zero():
    """A bf16 teacher under an fp32 student; a teacher equal to the student gives KL 0 and a
    KL gradient of 0 (the exact KL, not an estimator on the sampled token)."""
    h, w, tgt, th, tw, coefs = make(41, 32, 48, 1203, torch.float32, 3, True, torch.bfloat16)
    (out, dh, dw), (ref, rdh, rdw) = run_both(h, w, tgt, th, tw, 0.9, coefs, vocab_chunk=300)
    assert max(rel(o, r) for o, r in zip(out, ref)) < 1e-5
    assert rel(dh, rdh) < 1e-5 and rel(dw, rdw) < 1e-5
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    _, _, kl = fused_linear_policy(h1, w1, tgt, h, w, 0.9, vocab_chunk=300)
    assert kl.abs().max() < 1e-5
    kl.sum().backward()
    assert h1.grad.abs().max() < 1e-5 and w1.grad.abs().max() < 1e-5


@pytest.mark.parametrize("which", [0, 1, 2])
def test_one_output_alone(which):
    """A loss of one output (the other grads are None inside the backward) matches float64."""
    h, w, tgt, th, tw, coefs = make(29, 18, 22, 777, torch.float32, 5)
    coefs[[i for i in range(3) if i != which]] = 0
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = fused_linear_policy(h1, w1, tgt, th, tw, 1.3, row_chunk=8, vocab_chunk=100)
    (out[which] @ coefs[which]).backward()
    h2, w2 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = linear_policy_ref(h2, w2, tgt, th, tw, 1.3)
    (ref[which] @ coefs[which].double()).backward()
    assert rel(h1.grad, h2.grad) < 1e-5 and rel(w1.grad, w2.grad) < 1e-5


@pytest.mark.parametrize("teacher", [False, True])
def test_gradcheck_float64(teacher):
    h, w, tgt, th, tw, _ = make(5, 3, 4, 11, torch.float64, 7, teacher)
    h.requires_grad_()
    w.requires_grad_()

    def f(a, b):
        out = fused_linear_policy(a, b, tgt, th, tw, 1.3, row_chunk=2, vocab_chunk=4)
        return tuple(o for o in out if o is not None)

    assert torch.autograd.gradcheck(f, (h, w))


def test_only_hidden_or_only_weight_needs_grad():
    h, w, tgt, th, tw, coefs = make(19, 12, 12, 300, torch.float32, 8)
    (_, rdh, rdw) = run_both(h, w, tgt, th, tw, 1.0, coefs, vocab_chunk=64)[1]
    for hg, wg in ((True, False), (False, True)):
        h1, w1 = h.clone().requires_grad_(hg), w.clone().requires_grad_(wg)
        out = fused_linear_policy(h1, w1, tgt, th, tw, vocab_chunk=64)
        sum(o @ c for o, c in zip(out, coefs)).backward()
        assert rel(h1.grad if hg else w1.grad, rdh if hg else rdw) < 1e-5
        assert (w1 if hg else h1).grad is None


class LargestTensor(TorchDispatchMode):
    """The largest tensor (in elements) any op creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def test_never_more_than_one_tile_of_logits():
    """Forward and backward create no tensor larger than a tile, the weight's gradient
    [v, d] or the hidden's [n, d]; the materialised logits would be 45× the largest."""
    n, d, v, rc, vc = 300, 6, 5000, 64, 512
    h, w, tgt, th, tw, coefs = make(n, d, d, v, torch.float32, 9)
    h.requires_grad_()
    w.requires_grad_()
    with LargestTensor() as mode:
        out = fused_linear_policy(h, w, tgt, th, tw, 0.8, row_chunk=rc, vocab_chunk=vc)
        sum(o @ c for o, c in zip(out, coefs)).backward()
    assert mode.largest <= max(rc * vc, v * d, n * d) < n * v / 40
    assert mode.largest > 0


def _bad(**over):
    h, w, tgt, th, tw, _ = make(6, 5, 7, 50, torch.float32, 1)
    kw = dict(hidden=h, weight=w, targets=tgt, teacher_hidden=th, teacher_weight=tw)
    kw.update(over)
    return kw


BAD = [
    ("teacher vocab", _bad(teacher_weight=torch.randn(49, 7)), ValueError, r"\(49, 7\).*\(50, 5\)"),
    ("teacher rows", _bad(teacher_hidden=torch.randn(5, 7)), ValueError, "same rows"),
    ("teacher dims", _bad(teacher_hidden=torch.randn(6, 8)), ValueError, r"\(6, 8\).*dims"),
    ("student dims", _bad(hidden=torch.randn(6, 4)), ValueError, r"\(6, 4\).*\(50, 5\)"),
    ("teacher half", _bad(teacher_weight=None), ValueError, "go together"),
    ("target high", _bad(targets=torch.full((6,), 50)), ValueError, r"\[0, 50\).*max 50"),
    ("target low", _bad(targets=torch.full((6,), -1)), ValueError, "min -1"),
    ("target dtype", _bad(targets=torch.zeros(6)), TypeError, "int64"),
    ("target shape", _bad(targets=torch.zeros(5, dtype=torch.long)), ValueError, r"\[n\]"),
    ("hidden dtype", _bad(hidden=torch.zeros(6, 5, dtype=torch.long)), TypeError, "floating"),
    ("mixed dtype", _bad(weight=torch.randn(50, 5).half()), TypeError, "float16"),
    ("teacher mixed", _bad(teacher_hidden=torch.randn(6, 7).half()), TypeError, "teacher"),
    (
        "empty",
        _bad(
            hidden=torch.zeros(0, 5),
            targets=torch.zeros(0).long(),
            teacher_hidden=None,
            teacher_weight=None,
        ),
        ValueError,
        "empty",
    ),
]


@pytest.mark.parametrize("name,kw,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_fails_clearly(name, kw, exc, match):
    with pytest.raises(exc, match=match):
        fused_linear_policy(**kw)


@pytest.mark.parametrize("temp", [0.0, -1.0, math.inf, math.nan])
def test_bad_temperature(temp):
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_policy(**_bad(), temperature=temp)
