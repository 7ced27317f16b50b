"""Entropy kernel benchmark: materialised logits vs. the chunked PyTorch path vs. Triton.

CPU (materialised and chunked; Triton needs CUDA, its interpreter is for tests only)::

    python benchmarks/bench_kernels.py --n 2048 8192 --d 2048 --vocab 151936

One GPU (the shapes of the issue; adds Triton, a cuBLAS matmul of the same shape and a
device-to-device copy as the rooflines)::

    python benchmarks/bench_kernels.py --device cuda --dtype bfloat16 \
        --n 2048 8192 32768 --d 2048 3584 4096 --vocab 151936 128256

Variant sweep on one GPU (every kernel variant of ``LINEAR_VARIANTS`` / ``LOGITS_VARIANTS``
launched explicitly, no autotuner; rows ``"bench": "kernels_sweep"``)::

    python benchmarks/bench_kernels.py --device cuda --dtype bfloat16 --sweep \
        --n 8192 32768 --d 4096 --vocab 151936

Fused linear entropy (``hidden [n, d] @ weight [v, d]ᵀ`` → entropy [n]): seconds, achieved
TFLOP/s (2·n·d·v flops) and peak extra memory; ``matmul`` is ``hidden @ weight.T`` with cuBLAS,
the ceiling the fused kernel is compared with. Logits entropy (``logits [n, v]`` → [n]):
achieved GB/s (n·v·bytes read), against ``copy`` (a device-to-device copy of the logits).
On CPU every measurement runs in a fresh process and peak extra memory is the peak RSS (VmHWM,
reset before the timed calls) minus the RSS before them; on CUDA one process times every method
with ``triton.testing.do_bench`` (median), takes the CUDA peak allocation of one call, and
reports each entropy method's ‖out−ref‖/‖ref‖ against the chunked path (``err``).

Prints a table and appends one JSON row per measurement to ``benchmarks/results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from rows import RESULTS, in_fresh_process, reset_peak_rss, run_meta, status_mb


def _row(kind, method, n, d, v, dtype, device) -> dict:
    """The keys every result row starts with."""
    return {
        "kernel": kind,
        "method": method,
        "n": n,
        "d": d,
        "v": v,
        "dtype": dtype,
        "device": device,
    }


def _run(kind: str, method: str, h, w, x):
    """One call of ``method``: materialised logits + log_softmax, the cuBLAS matmul or device
    copy rooflines, or the entropy functions with the chunked (torch) or Triton backend."""
    import torch

    from policylong.kernels import fused_linear_entropy, logits_entropy

    if method == "materialised":
        logits = (h @ w.T).float() if kind == "linear" else x.float()
        lp = torch.log_softmax(logits, -1)
        return -(lp.exp() * lp).sum(-1)
    if method == "matmul":
        return h @ w.T
    if method == "copy":
        return x.clone()
    backend = "torch" if method == "chunked" else "triton"
    if kind == "linear":
        return fused_linear_entropy(h, w, backend=backend)
    return logits_entropy(x, backend=backend)


def _worker(
    kind: str, method: str, n: int, d: int, v: int, dtype: str, device: str, reps: int, q
) -> None:
    import gc

    import torch

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    cuda = device.startswith("cuda")
    if kind == "linear":
        h = (torch.randn(n, d, generator=g) * 0.05).to(dt).to(device)
        w = (torch.randn(v, d, generator=g) * 0.05).to(dt).to(device)
        x = None
    else:
        h = w = None
        x = (torch.randn(n, v, generator=g) * 2).to(dt).to(device)

    def run():
        return _run(kind, method, h, w, x)

    out = run()  # warm-up / compile
    del out
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        before = status_mb("VmRSS")
    t0 = time.perf_counter()
    for _ in range(reps):
        out = run()
    if cuda:
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / reps
    extra = (
        (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else status_mb("VmHWM") - before
    )
    row = _row(kind, method, n, d if kind == "linear" else None, v, dtype, device)
    row.update(seconds=round(sec, 5), peak_extra_mb=round(extra, 1))
    if kind == "linear":
        row["tflops"] = round(2.0 * n * d * v / sec / 1e12, 3)
    else:
        nbytes = n * v * torch.tensor([], dtype=dt).element_size()
        # a copy reads and writes the logits; the entropy kernels read them once
        row["gb_per_s"] = round((2 if method == "copy" else 1) * nbytes / sec / 1e9, 1)
    if method not in ("matmul", "copy"):
        row["checksum"] = round(float(out.double().sum()), 3)
    q.put(row)


def measure(kind, method, n, d, v, dtype, device, reps):
    args = (kind, method, n, d, v, dtype, device, reps)
    return in_fresh_process(_worker, args, _row(kind, method, n, d, v, dtype, device))


def _cuda_inputs(kind, n, d, v, dt, device):
    """(hidden, weight, None) for ``linear``, (None, None, logits) for ``logits``: seeded
    random data made on the device (the timed and the swept runs see the same tensors)."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    if kind == "linear":
        h = (torch.randn(n, d, generator=g, device=device) * 0.05).to(dt)
        w = (torch.randn(v, d, generator=g, device=device) * 0.05).to(dt)
        return h, w, None
    return None, None, (torch.randn(n, v, generator=g, device=device) * 2).to(dt)


def measure_cuda_group(kind, methods, n, d, v, dtype, device):
    """All methods of one shape in this process (a fresh process per row costs ~10 s of CUDA
    start-up each on a lent GPU): median time of ``triton.testing.do_bench``, peak extra CUDA
    memory of one call after ``reset_peak_memory_stats``, and the error of each entropy method
    against the chunked path (float32 GEMM tiles) as ‖out−ref‖/‖ref‖."""
    import torch
    import triton.testing

    dt = getattr(torch, dtype)
    h, w, x = _cuda_inputs(kind, n, d, v, dt, device)

    def run(method):
        return _run(kind, method, h, w, x)

    rows, outs = [], {}
    for method in methods:
        row = _row(kind, method, n, d, v, dtype, device)
        try:
            out = run(method)  # warm-up, compile, autotune
            torch.cuda.synchronize()
            if method not in ("matmul", "copy"):
                outs[method] = out.double()
            del out
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run(method)
            torch.cuda.synchronize()
            extra = (torch.cuda.max_memory_allocated() - base) / 2**20
            sec = (
                triton.testing.do_bench(
                    lambda m=method: run(m), warmup=25, rep=200, return_mode="median"
                )
                / 1e3
            )
        except torch.OutOfMemoryError as e:  # the materialised path at large n
            row["error"] = f"out of memory: {str(e).splitlines()[0]}"
            torch.cuda.empty_cache()
            rows.append(row)
            continue
        except Exception as e:  # a kernel that fails to compile must not lose the other rows
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            rows.append(row)
            continue
        if method == "triton":  # which autotune config won (None: fixed config)
            tuned = _autotuner(kind)
            row["config"] = str(getattr(tuned, "best_config", None))
            timings = getattr(tuned, "configs_timings", None) or {}
            row["autotune_ms"] = {
                str(c): round(float(t[0] if isinstance(t, (list, tuple)) else t), 4)
                for c, t in timings.items()
            }
        row["seconds"] = round(sec, 6)
        row["peak_extra_mb"] = round(extra, 1)
        if kind == "linear":
            row["tflops"] = round(2.0 * n * d * v / sec / 1e12, 2)
        else:
            nbytes = n * v * torch.tensor([], dtype=dt).element_size()
            row["gb_per_s"] = round((2 if method == "copy" else 1) * nbytes / sec / 1e9, 1)
        rows.append(row)
    ref = outs.get("chunked")
    for row in rows:
        o = outs.get(row["method"])
        if ref is not None and o is not None and row["method"] != "chunked":
            row["rel_err_vs_chunked"] = float((o - ref).norm() / ref.norm())
    return rows


# -- variant sweep (CUDA): one explicit launch per kernel variant, no autotuner ----------------

LINEAR_VARIANTS = {  # name -> keyword arguments of linear_entropy_partials_triton
    "ptr n256 k64 s3 g8": dict(block_n=256, block_k=64, num_stages=3),
    "ptr n256 k64 s4 g8": dict(block_n=256, block_k=64, num_stages=4),
    "ptr n256 k64 s3 g16": dict(block_n=256, block_k=64, num_stages=3, group_m=16),
    "ptr flat n256 k64 s3 g8": dict(block_n=256, block_k=64, num_stages=3, flatten=True),
    "tma n256 k64 s3 g8": dict(block_n=256, block_k=64, num_stages=3, tma=True),
    "tma n256 k64 s4 g8": dict(block_n=256, block_k=64, num_stages=4, tma=True),
    "tma flat n256 k64 s3 g8": dict(block_n=256, block_k=64, num_stages=3, tma=True, flatten=True),
    "tma flat n256 k64 s4 g8": dict(block_n=256, block_k=64, num_stages=4, tma=True, flatten=True),
    "tma flat n256 k64 s4 g16": dict(
        block_n=256, block_k=64, num_stages=4, tma=True, flatten=True, group_m=16
    ),
    "tma flat n256 k64 s4 g32": dict(
        block_n=256, block_k=64, num_stages=4, tma=True, flatten=True, group_m=32
    ),
    "tma n256 k128 s2 g8": dict(block_n=256, block_k=128, num_stages=2, tma=True),
    "tma flat n128 k64 s4 g8 w4": dict(
        block_n=128, block_k=64, num_stages=4, tma=True, flatten=True, num_warps=4
    ),
    "tma m256 n128 k64 s3 g8": dict(
        block_m=256, block_n=128, block_k=64, num_stages=3, tma=True, group_m=8
    ),
    "tma flat m256 n128 k64 s4 g8": dict(
        block_m=256, block_n=128, block_k=64, num_stages=4, tma=True, flatten=True
    ),
}


LOGITS_VARIANTS = {  # name -> keyword arguments of logits_entropy_partials_triton
    f"r1 v{bv} w{w} s{st}": dict(block_r=1, block_v=bv, num_warps=w, stages=st)
    for bv, w, st in [
        (1024, 1, 1),
        (1024, 1, 2),
        (1024, 1, 3),
        (1024, 1, 4),
        (1024, 2, 1),
        (1024, 2, 2),
        (512, 1, 1),
        (512, 1, 2),
        (512, 1, 3),
        (2048, 2, 2),
        (2048, 4, 1),
        (2048, 4, 2),
    ]
}


def _kernel_modules():
    """(the linear kernel's module, the logits op's module): the package exports functions
    named like the modules, so they are imported by name."""
    import importlib

    return (
        importlib.import_module("policylong.kernels.linear_entropy_triton"),
        importlib.import_module("policylong.kernels.logits_entropy"),
    )


def _autotuner(kind):
    LT, LE = _kernel_modules()
    return LT._linear_entropy_tuned if kind == "linear" else LE._logits_entropy_tuned


def sweep_cuda(kind, n, d, v, dtype, device, only=None):
    """Time every variant of one kernel at one shape against its roofline (cuBLAS matmul of
    the same shape, or a device copy of the logits), in this process, with do_bench medians;
    a variant that fails to compile or run gives an error row, not a crash."""
    import torch
    import triton.testing

    from policylong.kernels import fused_linear_entropy, logits_entropy
    from policylong.kernels.partials import finalize_partials

    LT, LE = _kernel_modules()
    h, w, x = _cuda_inputs(kind, n, d, v, getattr(torch, dtype), device)
    if kind == "linear":
        roof = lambda: h @ w.T  # noqa: E731
        ref = fused_linear_entropy(h, w, backend="torch").double()
        variants, fn, args = LINEAR_VARIANTS, LT.linear_entropy_partials_triton, (h, w)
        work = 2.0 * n * d * v
    else:
        roof = lambda: x.clone()  # noqa: E731
        ref = logits_entropy(x, backend="torch").double()
        variants, fn, args = LOGITS_VARIANTS, LE.logits_entropy_partials_triton, (x,)
        work = n * v * x.element_size()
    bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median") / 1e3  # noqa: E731
    roof_s = bench(roof)
    roof_rate = work / roof_s / 1e12 if kind == "linear" else 2 * work / roof_s / 1e9
    rows = [_row(kind, "matmul" if kind == "linear" else "copy", n, d, v, dtype, device)]
    rows[0]["seconds"] = roof_s
    for name, kw in variants.items():
        if only and not any(o in name for o in only):
            continue
        row = {**_row(kind, "triton", n, d, v, dtype, device), "variant": name}
        try:
            t0 = time.perf_counter()
            out = finalize_partials(*fn(*args, **kw))[0].double()
            torch.cuda.synchronize()
            row["first_call_s"] = round(time.perf_counter() - t0, 2)  # compile included
            row["rel_err"] = float((out - ref).norm() / ref.norm())
            sec = bench(lambda kw=kw: fn(*args, **kw))
        except Exception as e:  # noqa: BLE001 - one bad variant must not lose the others
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            rows.append(row)
            print(f"{kind:>6} {name:<34} n={n} d={d} v={v}: {row['error']}", flush=True)
            continue
        row["seconds"] = sec
        if kind == "linear":
            row["tflops"] = round(work / sec / 1e12, 1)
            row["ratio"] = round(row["tflops"] / roof_rate, 3)
        else:
            row["gb_per_s"] = round(work / sec / 1e9, 1)
            row["ratio"] = round(row["gb_per_s"] / roof_rate, 3)
        rows.append(row)
        rate = f"{row.get('tflops', row.get('gb_per_s'))}"
        print(
            f"{kind:>6} {name:<34} n={n} d={d} v={v}: {sec * 1e3:8.3f} ms {rate:>7} "
            f"{'TFLOP/s' if kind == 'linear' else 'GB/s'} = {row['ratio']:.3f} of "
            f"{roof_rate:.0f} ({'cuBLAS' if kind == 'linear' else 'copy'}) "
            f"err {row.get('rel_err', float('nan')):.1e} first {row['first_call_s']} s",
            flush=True,
        )
    rows[0]["tflops" if kind == "linear" else "gb_per_s"] = round(roof_rate, 1)
    return rows


def _fmt(r: dict) -> str:
    if "error" in r:
        return (
            f"{r['kernel']:>6} {r['method']:>12} n={r['n']:>6} d={r['d']} v={r['v']}: {r['error']}"
        )
    rate = f"{r['tflops']:8.2f} TFLOP/s" if "tflops" in r else f"{r['gb_per_s']:8.1f} GB/s   "
    dpart = f"d={r['d']:>5} " if r["d"] else "        "
    return (
        f"{r['kernel']:>6} {r['method']:>12} n={r['n']:>6} {dpart}v={r['v']:>6}: "
        f"{r['seconds']:9.4f}s {rate} peak extra {r['peak_extra_mb']:>9.1f} MB"
        + (f" err {r['rel_err_vs_chunked']:.1e}" if "rel_err_vs_chunked" in r else "")
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, nargs="+", default=[2048])
    ap.add_argument("--d", type=int, nargs="+", default=[2048])
    ap.add_argument("--vocab", type=int, nargs="+", default=[151_936])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--kernels", nargs="+", default=["linear", "logits"], choices=["linear", "logits"]
    )
    ap.add_argument(
        "--skip-materialised-above",
        type=int,
        default=8192,
        help="skip the materialised path for n above this (its logits alone are "
        "n·v·4 bytes: 20 GB at n=32K, v=152K)",
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="measure only these of materialised/chunked/triton/matmul/copy",
    )
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="CUDA: time every kernel variant (LINEAR_VARIANTS / LOGITS_VARIANTS) at each "
        "shape against its roofline instead of the autotuned launch",
    )
    ap.add_argument("--only", nargs="+", default=None, help="--sweep: variants containing these")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    cuda = args.device.startswith("cuda")
    meta = run_meta("kernels", cuda)
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    rows = []
    if args.sweep:
        if not cuda:
            raise SystemExit("--sweep times Triton variants: it needs --device cuda")
        meta["bench"] = "kernels_sweep"
        for kind in args.kernels:
            for v in args.vocab:
                for d in args.d if kind == "linear" else [None]:
                    for n in args.n:
                        group = sweep_cuda(kind, n, d, v, args.dtype, args.device, args.only)
                        rows += group
                        if not args.no_save:
                            with open(RESULTS, "a") as f:
                                for r in group:
                                    f.write(json.dumps({**meta, **r}) + "\n")
        if not args.no_save:
            print(f"appended {len(rows)} rows to {RESULTS}")
        return
    for kind in args.kernels:
        for v in args.vocab:
            for d in args.d if kind == "linear" else [None]:
                for n in args.n:
                    methods = ["chunked"]
                    if n <= args.skip_materialised_above:
                        methods.insert(0, "materialised")
                    if cuda:
                        methods += ["triton", "matmul" if kind == "linear" else "copy"]
                    if args.methods:
                        methods = [m for m in methods if m in args.methods]
                    if cuda:
                        group = measure_cuda_group(kind, methods, n, d, v, args.dtype, args.device)
                        for r in group:
                            print(_fmt(r), flush=True)
                    else:
                        group = []
                        for m in methods:
                            r = measure(kind, m, n, d, v, args.dtype, args.device, args.reps)
                            print(_fmt(r), flush=True)
                            group.append(r)
                    rows += group
                    if not args.no_save:  # per shape, so a run cut short keeps what it measured
                        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
                        with open(RESULTS, "a") as f:
                            for r in group:
                                f.write(json.dumps({**meta, **r}) + "\n")
                    ok = {r["method"]: r for r in group if "error" not in r}
                    if (
                        "materialised" in ok
                        and "chunked" in ok
                        and ok["materialised"]["peak_extra_mb"] > 0
                    ):
                        mem = ok["chunked"]["peak_extra_mb"] / ok["materialised"]["peak_extra_mb"]
                        print(f"{'':>20} memory chunked/materialised = {mem:.3f}")
                    if "triton" in ok and "matmul" in ok:
                        speedup = (
                            f", speed-up over chunked = "
                            f"{ok['chunked']['seconds'] / ok['triton']['seconds']:.2f}x"
                            if "chunked" in ok
                            else ""
                        )
                        print(
                            f"{'':>20} triton/cuBLAS TFLOP/s = "
                            f"{ok['triton']['tflops'] / ok['matmul']['tflops']:.3f}{speedup}"
                        )
                    if "triton" in ok and "copy" in ok:
                        print(
                            f"{'':>20} triton/copy bandwidth = "
                            f"{ok['triton']['gb_per_s'] / ok['copy']['gb_per_s']:.3f}"
                        )
    if not args.no_save:
        print(f"appended {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
