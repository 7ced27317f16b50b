"""Vocab-parallel policy head on gloo: TP = 2 and 4 equal TP = 1 and the float64 reference.

Outputs and gradients (the loss is a random combination of log-prob, entropy and KL) on every
rank: ``dhidden`` is all-reduced inside the op, so each rank's equals TP = 1's; each rank's
``dweight`` is its shard's rows of TP = 1's. The vocabulary (1003) divides neither by the
ranks nor by the tile (100), and every shard owns some targets. Buffers start as NaN.
Shards that disagree raise on every rank, and the group still works afterwards.
"""

from __future__ import annotations

import math
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from policylong.kernels import HAS_TRITON

pytestmark = pytest.mark.distributed

N, D, DT, V, TEMP = 45, 24, 20, 1003, 0.8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _fwd_bwd(fn, h, w, tgt, th, tw, coefs, group, backend="torch"):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = fn(h, w, tgt, th, tw, TEMP, group, row_chunk=8, vocab_chunk=100, backend=backend)
    sum(o @ c.to(o.dtype) for o, c in zip(out, coefs) if o is not None).backward()
    return [o for o in out if o is not None], h.grad, w.grad


def _ok(rank, world, group, backend):
    from policylong.kernels import fused_linear_policy, linear_policy_ref

    g = torch.Generator().manual_seed(11)
    h, w = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g)
    th, tw = torch.randn(N, DT, generator=g), torch.randn(V, DT, generator=g)
    tgt = torch.randint(0, V, (N,), generator=g)
    coefs = torch.randn(3, N, generator=g)
    b = [round(i * V / world) for i in range(world + 1)]
    tgt[:world] = torch.tensor(b[:-1]) + 7  # every shard owns targets
    lo, hi = b[rank], b[rank + 1]
    assert all(((tgt >= x) & (tgt < y)).any() for x, y in zip(b, b[1:]))

    def ref(h, w, tgt, th, tw, temp, group, **_):
        return linear_policy_ref(h, w, tgt, th, tw, temp)

    errs = []
    for teacher in (False, True):
        t_args = (th, tw[lo:hi].contiguous()) if teacher else (None, None)
        out, dh, dw = _fwd_bwd(
            fused_linear_policy, h, w[lo:hi], tgt, *t_args, coefs, group, backend
        )
        one = _fwd_bwd(
            fused_linear_policy,
            h,
            w,
            tgt,
            *((th, tw) if teacher else (None,) * 2),
            coefs,
            None,
            backend,
        )
        r64 = _fwd_bwd(
            ref,
            h.double(),
            w.double(),
            tgt,
            *((th, tw) if teacher else (None,) * 2),
            coefs.double(),
            None,
        )
        assert len(out) == 2 + teacher
        for base in (one, r64):
            errs.append(max(_rel(o, r) for o, r in zip(out, base[0])))
            errs.append(_rel(dh, base[1]))
            errs.append(_rel(dw, base[2][lo:hi]))
    return errs


def _bad(rank, world, group):
    """Each case: (kwargs this rank passes, the message every rank must raise)."""
    from policylong.kernels import fused_linear_policy

    g = torch.Generator().manual_seed(3)
    v_local = 50
    h, w = torch.randn(N, D, generator=g), torch.randn(v_local, D, generator=g)
    th, tw = torch.randn(N, DT, generator=g), torch.randn(v_local, DT, generator=g)
    tgt = torch.randint(0, v_local * world, (N,), generator=g)
    one = rank == 1
    cases = {
        "hidden dim": dict(hidden=torch.randn(N, D + one), weight=torch.randn(v_local, D + one)),
        "teacher hidden dim": dict(
            teacher_hidden=th if one else None, teacher_weight=tw if one else None
        ),
        "targets": dict(targets=tgt.roll(int(one))),
        "rows": dict(hidden=h[: N - one], targets=tgt[: N - one], teacher_hidden=th[: N - one]),
        "temperature": dict(temperature=1.0 + one),
        "rejected their inputs": dict(teacher_weight=tw[: v_local - one]),
        "full vocabulary": dict(targets=torch.full((N,), v_local * world)),
    }
    got = {}
    for name, over in cases.items():
        kw = dict(
            hidden=h,
            weight=w,
            targets=tgt,
            teacher_hidden=th,
            teacher_weight=tw,
            temperature=1.0,
            tp_group=group,
        )
        kw.update(over)
        try:
            fused_linear_policy(**kw)
            got[name] = "no error"
        except ValueError as e:
            msg = str(e)
            ok = name in msg or (one and name == "rejected their inputs" and "alike" in msg)
            got[name] = "error" if ok else msg
    # the group still works: nobody is left waiting in a collective
    _, ent, kl = fused_linear_policy(h, w, tgt, th, tw, 1.0, group)
    got["after"] = "ok" if torch.isfinite(ent).all() and torch.isfinite(kl).all() else "nan"
    return got


def _worker(rank, world, port, case, q):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        torch.set_num_threads(1)
        from policylong.kernels import dispatch

        real = dispatch.alloc
        dispatch.alloc = lambda *a, **k: real(*a, **k).fill_(math.nan)
        group = dist.new_group(list(range(world)))
        # case: "bad", or the backend of the equality run
        res = _bad(rank, world, group) if case == "bad" else _ok(rank, world, group, case)
        q.put((rank, res))
    except Exception:
        q.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(world, case):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, case, q)) for r in range(world)]
    for p in procs:
        p.start()
    out = dict(q.get(timeout=180) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_policy_equals_tp1(world):
    out = _run(world, "torch")
    for rank, errs in out.items():
        assert isinstance(errs, list), errs
        assert max(errs) < 1e-5, (rank, errs)


@pytest.mark.skipif(
    not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="gloo ranks hold CPU tensors: needs triton and TRITON_INTERPRET=1 (conftest sets it "
    "where there is no CUDA)",
)
def test_vocab_parallel_policy_triton_equals_tp1():
    """The Triton backend under the same collectives (the interpreter; the spawned ranks
    inherit TRITON_INTERPRET): TP = 2 equals TP = 1 and float64."""
    out = _run(2, "triton")
    for rank, errs in out.items():
        assert isinstance(errs, list), errs
        assert max(errs) < 1e-5, (rank, errs)


def test_shards_that_disagree_fail_on_every_rank():
    out = _run(2, "bad")
    for rank, got in out.items():
        assert isinstance(got, dict), got
        assert all(v in ("error", "ok") for v in got.values()), (rank, got)
