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
def test_logits_gpu_variants_match_float64(dtype, tol):
    """The inline-PTX ``ex2.approx.ftz`` variant (CUDA only), the per-thread grouped sums and
    the deferred max (bf16: with and without int32 pairs), compiled, on the exact cases
    (uniform row: log v; one-hot row among -inf: exactly 0; a row whose max rises in every
    tile) and random rows at the Qwen2.5 vocabulary, against the float64 reference."""
    import math

    import policylong.kernels.entropy as E
    from policylong.kernels import logits_entropy_ref

    g = torch.Generator().manual_seed(3)
    v = 151_936
    x = torch.randn(37, v, generator=g) * 3
    x[0] = 0.0
    x[1] = float("-inf")
    x[1, 1234] = 3.0
    x[2, : v // 3] = float("-inf")
    x[3] = torch.linspace(-30, 30, v)
    x[4, 100_000:100_050] = float("-inf")  # defer: a tile redone on its NaN p·x
    x = x.to(dtype)
    variants = [  # block_v, warps, stages, fast_exp, group, defer, pairs (None: bf16 auto)
        (1024, 1, 2, True, False, False, None),
        (512, 1, 2, True, False, False, None),
        (2048, 4, 2, True, False, False, None),
        (1024, 1, 1, False, True, False, None),
        (1024, 1, 2, True, True, False, None),
        (2048, 2, 1, True, True, False, None),
        (512, 1, 2, True, True, True, None),
        (1024, 1, 1, True, True, True, None),
        (1024, 1, 1, True, True, True, False),
        (2048, 4, 1, False, True, True, None),
        # 3-stage cp.async pipelines around the deferred fold and its reload on redo
        (1024, 1, 3, True, True, True, None),
        (2048, 4, 3, True, True, True, None),
    ]
    for block_v, warps, stages, fast_exp, group, defer, pairs in variants:
        m, s, t = E.logits_entropy_partials_triton(
            x.cuda(),
            block_r=1,
            block_v=block_v,
            tail=True,
            stages=stages,
            num_warps=warps,
            fast_exp=fast_exp,
            group=group,
            defer=defer,
            pairs=pairs,
        )
        out = E.finalize_partials(m, s, t)[0].cpu()
        ref = logits_entropy_ref(x)
        assert abs(float(out[0]) - math.log(v)) < 1e-5 and float(out[1]) == 0.0
        assert float((out.double() - ref).norm() / ref.norm()) < tol
