"""Vocab-parallel entropy on gloo: shards combine to the full-vocabulary float64 reference.

Runs as a pytest test that spawns 2 and 4 processes (the same code runs under torchrun).
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, case, q, backend="torch"):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        torch.set_num_threads(1)
        from policylong.kernels import (
            entropy_reduction,
            entropy_reduction_ref,
            fused_linear_entropy_nll,
            fused_linear_stats,
            linear_entropy_ref,
        )

        g = torch.Generator().manual_seed(11)
        n, d, v = 45, 24, 1003  # 1003 splits unevenly over 2 and 4 ranks
        h = torch.randn(n, d, generator=g)
        w = torch.randn(v, d, generator=g)
        tgt = torch.randint(0, v, (n,), generator=g)
        bounds = [round(i * v / world) for i in range(world + 1)]
        shard = w[bounds[rank] : bounds[rank + 1]].contiguous()
        group = dist.new_group(list(range(world)))
        if case == "bad_dims":
            dr = d + (rank == 1)  # locally consistent, globally not
            try:
                fused_linear_entropy_nll(
                    torch.randn(n, dr), torch.randn(shard.shape[0], dr), None, group
                )
                q.put((rank, "no error"))
            except ValueError as e:
                q.put((rank, "error" if "disagree" in str(e) else str(e)))
            return
        out_h, out_nll = fused_linear_entropy_nll(
            h, shard, tgt, group, row_chunk=8, vocab_chunk=100, backend=backend
        )
        ref_h, ref_nll = linear_entropy_ref(h, w, tgt)
        e1 = float((out_h.double() - ref_h).norm() / ref_h.norm())
        e2 = float((out_nll.double() - ref_nll).norm() / ref_nll.norm())
        k, p = 3, 5
        hid = torch.randn(k, p, d, generator=g)
        h0 = torch.rand(p, generator=g) + 4.0
        dh, ok = entropy_reduction(h0, hid, shard, 0.1, group, backend=backend)
        rdh, rok = entropy_reduction_ref(h0, hid, w, 0.1)
        e3 = float((dh.double() - rdh).norm() / rdh.norm())
        # stats over the full vocabulary on every rank; every shard owns some targets
        assert all(((tgt >= a) & (tgt < b)).any() for a, b in zip(bounds, bounds[1:]))
        ent, nll, mx, _ = fused_linear_stats(h, shard, tgt, group, backend=backend)
        logits = h.double() @ w.double().T
        ref_mx = logits.amax(-1)
        e4 = max(
            float((ent.double() - ref_h).norm() / ref_h.norm()),
            float((nll.double() - ref_nll).norm() / ref_nll.norm()),
            float((mx.double() - ref_mx).norm() / ref_mx.norm()),
        )
        q.put((rank, (e1, e2, e3, e4, bool(torch.equal(ok, rok)))))
    except Exception:
        q.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(world, case, backend="torch"):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, case, q, backend)) for r in range(world)
    ]
    for p in procs:
        p.start()
    out = dict(q.get(timeout=120) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_matches_float64(world, backend):
    if backend == "triton":
        from policylong.kernels import HAS_TRITON

        if not HAS_TRITON:
            pytest.skip("triton is not installed")
    out = _run(world, "ok", backend)
    for rank, res in out.items():
        assert isinstance(res, tuple), res
        assert max(res[:4]) < 1e-5, (rank, res)
        same = res[4]
        assert same


def test_shards_that_disagree_on_dims_fail_on_every_rank():
    out = _run(2, "bad_dims")
    assert out == {0: "error", 1: "error"}
