"""Policy head benchmark: materialised logits + autograd vs. ``fused_linear_policy``.

One forward + backward of the loss ``Σ a·logp + b·entropy (+ c·kl)`` (random weights a, b, c
[n]), with and without a teacher (``d_T = d``): seconds and peak extra memory, i.e. beyond
the inputs; the gradients of hidden and weight ([n, d] + [v, d]) count for both methods.
``materialised`` is what one writes in PyTorch: ``log_softmax(hidden @ weight.T / T)`` in
float32, entropy and KL from it, ``backward()``; ``chunked`` is ``fused_linear_policy`` with
the PyTorch backend; ``triton`` (CUDA) is its Triton backend (``linear_policy_triton.py``: one
untimed config per kernel; the first call of a shape compiles, which the CUDA default
``--warmup 1`` keeps out of the timing).

CPU, each measurement in a fresh process; peak extra memory is the peak RSS (VmHWM, reset
before the timed call) minus the RSS before it. The materialised path is skipped where its
estimate (about 5 float32 ``[n, v]`` buffers, 7 with a teacher) exceeds 80% of the available
memory, with a row that says so::

    python benchmarks/bench_policy.py --n 1024 2048 8192 --d 128 --vocab 151936

One GPU (one process, CUDA peak allocation of one call, median of the timed calls)::

    python benchmarks/bench_policy.py --device cuda --dtype bfloat16 --n 8192 32768 \
        --d 2048 4096 --vocab 151936 --methods materialised chunked triton

Prints a table and appends one JSON row per measurement to ``benchmarks/results.jsonl``
(``"bench": "policy"``).
"""

from __future__ import annotations

import argparse
import json
import time

from rows import RESULTS, in_fresh_process, reset_peak_rss, run_meta, status_mb

TEMP = 0.9


def _inputs(n, d, v, teacher, dtype, device):
    import torch

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(n, d, generator=g) * 0.3).to(dt).to(device).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.3).to(dt).to(device).requires_grad_()
    tgt = torch.randint(0, v, (n,), generator=g).to(device)
    th = tw = None
    if teacher:
        th = (torch.randn(n, d, generator=g) * 0.3).to(dt).to(device)
        tw = (torch.randn(v, d, generator=g) * 0.3).to(dt).to(device)
    coefs = torch.randn(3, n, generator=g).to(device)
    return h, w, tgt, th, tw, coefs


def _step(method, h, w, tgt, th, tw, coefs):
    """One forward + backward; returns the outputs (detached)."""
    import torch

    from policylong.kernels import fused_linear_policy

    h.grad = w.grad = None
    if method == "materialised":
        lp = torch.log_softmax((h @ w.T).float() / TEMP, -1)
        logp = lp.gather(1, tgt[:, None])[:, 0]
        p = lp.exp()
        out = [logp, -(p * lp).sum(-1)]
        if th is not None:
            lq = torch.log_softmax((th @ tw.T).float() / TEMP, -1)
            out.append((p * (lp - lq)).sum(-1))
            del lq
        del lp, p
    else:
        backend = "torch" if method == "chunked" else "triton"
        out = [
            o
            for o in fused_linear_policy(h, w, tgt, th, tw, TEMP, backend=backend)
            if o is not None
        ]
    sum(o @ c for o, c in zip(out, coefs)).backward()
    return [o.detach() for o in out]


def _row(method, n, d, v, teacher, dtype, device) -> dict:
    return dict(method=method, n=n, d=d, v=v, teacher=teacher, dtype=dtype, device=device)


def _finish(row, sec, extra, out):
    row.update(seconds=round(sec, 4), peak_extra_mb=round(extra, 1))
    row["checksum"] = [round(float(o.double().sum()), 2) for o in out]
    return row


def _cpu_worker(method, n, d, v, teacher, dtype, reps, warmup, q) -> None:
    import gc

    try:
        _step(method, *_inputs(8, d, 64, teacher, dtype, "cpu"))  # libraries, thread pools
        args = _inputs(n, d, v, teacher, dtype, "cpu")
        for _ in range(warmup):
            _step(method, *args)
        args[0].grad = args[1].grad = None
        gc.collect()
        reset_peak_rss()
        before = status_mb("VmRSS")
        t0 = time.perf_counter()
        for _ in range(reps):
            out = _step(method, *args)
        sec = (time.perf_counter() - t0) / reps
        extra = status_mb("VmHWM") - before
        q.put(_finish(_row(method, n, d, v, teacher, dtype, "cpu"), sec, extra, out))
    except Exception as e:  # noqa: BLE001 - an error row, not a lost table
        row = _row(method, n, d, v, teacher, dtype, "cpu")
        q.put({**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})


def measure_cpu(method, n, d, v, teacher, dtype, reps, warmup):
    args = (method, n, d, v, teacher, dtype, reps, warmup)
    return in_fresh_process(_cpu_worker, args, _row(method, n, d, v, teacher, dtype, "cpu"))


def measure_cuda(method, n, d, v, teacher, dtype, device, reps, warmup):
    import torch

    row = _row(method, n, d, v, teacher, dtype, device)
    try:
        args = _inputs(n, d, v, teacher, dtype, device)
        for _ in range(warmup):
            _step(method, *args)
        args[0].grad = args[1].grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            out = _step(method, *args)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        return _finish(row, sorted(times)[len(times) // 2], extra, out)
    except Exception as e:  # noqa: BLE001 - out of memory, or a kernel that fails to compile
        torch.cuda.empty_cache()
        return {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def _fmt(r: dict) -> str:
    head = (
        f"{r['method']:>12} {'teacher' if r['teacher'] else 'student':>7} n={r['n']:>6} "
        f"d={r['d']:>5} v={r['v']:>6}"
    )
    if "error" in r:
        return f"{head}: {r['error']}"
    return f"{head}: {r['seconds']:9.3f} s  peak extra {r['peak_extra_mb']:>9.1f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--d", type=int, nargs="+", default=[128])
    ap.add_argument("--vocab", type=int, nargs="+", default=[151_936])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=None, help="timed calls (1 on CPU, 5 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls (0 CPU, 1 CUDA)")
    ap.add_argument("--teacher", nargs="+", default=["no", "yes"], choices=["no", "yes"])
    ap.add_argument(
        "--methods", nargs="+", default=None, help="materialised, chunked, triton (CUDA)"
    )
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    import psutil

    cuda = args.device.startswith("cuda")
    reps = args.reps or (5 if cuda else 1)
    warmup = args.warmup if args.warmup is not None else int(cuda)
    methods = args.methods or (
        ["materialised", "chunked", "triton"] if cuda else ["materialised", "chunked"]
    )
    meta = run_meta("policy", cuda)
    rows = []
    for v in args.vocab:
        for d in args.d:
            for n in args.n:
                for teacher in (t == "yes" for t in args.teacher):
                    group = []
                    for m in methods:
                        need = (7 if teacher else 5) * n * v * 4
                        avail = psutil.virtual_memory().available
                        if m == "materialised" and not cuda and need > 0.8 * avail:
                            r = _row(m, n, d, v, teacher, args.dtype, args.device)
                            r["error"] = (
                                f"skipped: needs about {need / 2**30:.1f} GiB, "
                                f"{avail / 2**30:.1f} GiB available"
                            )
                            r["estimated_mb"] = round(need / 2**20)
                        elif cuda:
                            r = measure_cuda(
                                m, n, d, v, teacher, args.dtype, args.device, reps, warmup
                            )
                        else:
                            r = measure_cpu(m, n, d, v, teacher, args.dtype, reps, warmup)
                        print(_fmt(r), flush=True)
                        group.append(r)
                    ok = {r["method"]: r for r in group if "error" not in r}
                    for a, b in (
                        ("chunked", "materialised"),
                        ("triton", "materialised"),
                        ("triton", "chunked"),
                    ):
                        if a in ok and b in ok and ok[b]["peak_extra_mb"] > 0:
                            print(
                                f"{'':>20} {a}/{b}: memory "
                                f"{ok[a]['peak_extra_mb'] / ok[b]['peak_extra_mb']:.3f}, "
                                f"time {ok[a]['seconds'] / ok[b]['seconds']:.2f}"
                            )
                    rows += group
                    if not args.no_save:  # per shape, so a run cut short keeps what it measured
                        with open(RESULTS, "a") as f:
                            for r in group:
                                f.write(json.dumps({**meta, **r}) + "\n")
    if not args.no_save:
        print(f"appended {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
