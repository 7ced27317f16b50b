"""GPU tier: the same screening math on CUDA agrees with the CPU path."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU node)"
)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-3)])
def test_fused_linear_entropy_cuda_matches_float64(dtype, tol):
    from policylong.kernels import fused_linear_entropy_nll, linear_entropy_ref

    g = torch.Generator().manual_seed(0)
    n, d, v = 1031, 256, 151_936
    h = (torch.randn(n, d, generator=g) * 0.1).to(dtype)
    w = (torch.randn(v, d, generator=g) * 0.1).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    ref_h, ref_nll = linear_entropy_ref(h, w, t)
    out_h, out_nll = fused_linear_entropy_nll(h.cuda(), w.cuda(), t.cuda())
    assert float((out_h.cpu().double() - ref_h).norm() / ref_h.norm()) < tol
    assert float((out_nll.cpu().double() - ref_nll).norm() / ref_nll.norm()) < tol


def test_hf_backend_cuda_matches_cpu():
    from policylong.lm import HFLanguageModel
    from policylong.screening.entropy import root_entropies

    cpu = HFLanguageModel("embedded", device="cpu")
    gpu = HFLanguageModel("embedded", device="cuda")
    tok = cpu.tokenizer
    roots = [
        tok("nobody was in a hurry . the weather was calm that day .", add_special_tokens=False)[
            "input_ids"
        ]
    ]
    a = root_entropies(cpu, roots, tok.bos_token_id, tok.eos_token_id, 4)
    b = root_entropies(gpu, roots, tok.bos_token_id, tok.eos_token_id, 4)
    assert torch.allclose(a[0][0], b[0][0], atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-3)])
def test_logits_configs_match_float64(dtype, tol):
    """Each shipped config of the logits kernel, compiled, and the autotuned launch, at the
    Qwen2.5 vocabulary: a uniform row (log v), a one-hot row among -inf (exactly 0), a -inf
    prefix, a max rising in every tile, -inf logits in a middle tile, random rows."""
    import importlib
    import math

    from policylong.kernels import logits_entropy_ref
    from policylong.kernels.partials import finalize_partials

    LE = importlib.import_module("policylong.kernels.logits_entropy")
    g = torch.Generator().manual_seed(3)
    v = 151_936
    x = torch.randn(37, v, generator=g) * 3
    x[0] = 0.0
    x[1] = float("-inf")
    x[1, 1234] = 3.0
    x[2, : v // 3] = float("-inf")
    x[3] = torch.linspace(-30, 30, v)
    x[4, 100_000:100_050] = float("-inf")
    x = x.to(dtype)
    ref = logits_entropy_ref(x)
    runs = [
        dict(
            block_r=c.kwargs["BLOCK_R"],
            block_v=c.kwargs["BLOCK_V"],
            stages=c.kwargs["STAGES"],
            num_warps=c.num_warps,
        )
        for c in LE.LOGITS_CONFIGS
    ]
    for kw in runs + [{}]:  # {}: the autotuned launch (or the fixed config with autotune off)
        out = finalize_partials(*LE.logits_entropy_partials_triton(x.cuda(), **kw))[0].cpu()
        assert abs(float(out[0]) - math.log(v)) < 1e-5 and float(out[1]) == 0.0, kw
        assert float((out.double() - ref).norm() / ref.norm()) < tol, kw


@pytest.mark.parametrize("d", [256, 250])
def test_linear_configs_match_float64(d):
    """Each shipped config of the fused linear kernel, compiled, on bf16 at the Qwen2.5
    vocabulary, entropy and max logit through ``fused_linear_stats``; d = 250 (500-byte rows)
    takes the pointer path, where tensor descriptors cannot go."""
    from policylong.kernels import fused_linear_stats, logits_entropy_ref
    from policylong.kernels import linear_entropy_triton as LT
    from policylong.kernels.partials import finalize_partials

    g = torch.Generator().manual_seed(1)
    n, v = 1031, 151_936
    h = (torch.randn(n, d, generator=g) * 0.1).to(torch.bfloat16)
    w = (torch.randn(v, d, generator=g) * 0.1).to(torch.bfloat16)
    t = torch.randint(0, v, (n,), generator=g)
    logits = h.double() @ w.double().T
    ref_h = logits_entropy_ref(logits)
    ent, nll, mx, _ = fused_linear_stats(h.cuda(), w.cuda(), t.cuda())
    assert float((ent.cpu().double() - ref_h).norm() / ref_h.norm()) < 2e-3
    assert float((mx.cpu().double() - logits.amax(-1)).norm() / logits.amax(-1).norm()) < 2e-3
    aligned = LT.tma_ok(h, w)
    assert aligned == (d == 256)
    for c in LT._prune_linear(LT.LINEAR_CONFIGS, {"H": h, "W": w}):
        kw = c.kwargs
        m, s, tt = LT.linear_entropy_partials_triton(
            h.cuda(),
            w.cuda(),
            block_m=kw["BLOCK_M"],
            block_n=kw["BLOCK_N"],
            block_k=kw["BLOCK_K"],
            tma=kw["TMA"],
            flatten=kw["FLATTEN"],
            group_m=kw["GROUP_M"],
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )
        out = finalize_partials(m, s, tt)[0].cpu().double()
        assert float((out - ref_h).norm() / ref_h.norm()) < 2e-3, c


def _policy_case(n, d, dt, v, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * 0.3).to(dtype).cuda()
    w = (torch.randn(v, d, generator=g) * 0.3).to(dtype).cuda()
    th = (torch.randn(n, dt, generator=g) * 0.3).to(dtype).cuda()
    tw = (torch.randn(v, dt, generator=g) * 0.3).to(dtype).cuda()
    tgt = torch.randint(0, v, (n,), generator=g)
    tgt[:2] = torch.tensor([0, v - 1])
    return h, w, tgt.cuda(), th, tw, torch.randn(3, n, generator=g).cuda()


def _policy_run(fn, h, w, tgt, th, tw, coefs, temp, **kw):
    """(logp, entropy, kl, dhidden, dweight) of ``fn`` for ``Σ a·logp + b·entropy + c·kl``."""
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = fn(h, w, tgt, th, tw, temp, **kw)
    sum(o @ c.to(o.dtype) for o, c in zip(out, coefs)).backward()
    return [o.detach() for o in out] + [h.grad, w.grad]


@pytest.mark.parametrize("d,dt", [(256, 192), (250, 200)])
def test_policy_triton_cuda_matches_float64(d, dt):
    """The compiled policy kernels on bf16 at the Qwen2.5 vocabulary, with a teacher, T = 0.9:
    the forward in vocab splits (n = 1031: 9 row blocks of 128), dhidden and dweight (in
    DW_CHUNK-row launches: 10 for 151,936 rows), against float64 autograd on the GPU (about
    10 GB of [n × v] float64 buffers); d = 250 and d_T = 200 leave masked K tails (BLOCK_K
    64). Two runs give the same bits (no atomics), and the torch backend agrees."""
    from policylong.kernels import fused_linear_policy, linear_policy_ref

    n, v, temp = 1031, 151_936, 0.9
    case = _policy_case(n, d, dt, v, torch.bfloat16, seed=d)
    tri = _policy_run(fused_linear_policy, *case, temp, backend="triton")
    h, w, tgt, th, tw, coefs = case
    ref = _policy_run(
        linear_policy_ref,
        h.double(),
        w.double(),
        tgt,
        th,
        tw,
        coefs.double(),
        temp,
    )
    names = ("logp", "entropy", "kl", "dhidden", "dweight")
    for name, o, r in zip(names, tri, ref):
        assert o.dtype == (torch.float32 if name in names[:3] else torch.bfloat16)
        err = float((o.double() - r).norm() / r.norm())
        assert err < 2e-3, (name, err)
    again = _policy_run(fused_linear_policy, *case, temp, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(tri, again))
    chunked = _policy_run(fused_linear_policy, *case, temp, backend="torch")
    for name, a, b in zip(names, tri, chunked):
        assert float((a.double() - b.double()).norm() / b.double().norm()) < 1e-3, name


def test_policy_triton_cuda_float32():
    """float32 inputs take full-precision dots (no TF32): the 1e-5 contract, outputs and
    both gradients, at v = 32,000; the default launch picks several vocab splits."""
    from policylong.kernels import fused_linear_policy, linear_policy_ref

    case = _policy_case(300, 128, 96, 32_000, torch.float32, seed=5)
    tri = _policy_run(fused_linear_policy, *case, 1.3, backend="triton")
    h, w, tgt, th, tw, coefs = case
    ref = _policy_run(
        linear_policy_ref,
        h.double(),
        w.double(),
        tgt,
        th,
        tw,
        coefs.double(),
        1.3,
    )
    for i, (o, r) in enumerate(zip(tri, ref)):
        assert float((o.double() - r).norm() / r.norm()) < 1e-5, i
