"""Screening benchmark: entropy memory / throughput at the Qwen2.5 vocabulary, and end-to-end
screening throughput of the CPU demo.

CPU (this is what it was written for)::

    python benchmarks/bench_screening.py                      # both parts, default shapes
    python benchmarks/bench_screening.py --part entropy --n 256 1024 --d 2048
    python benchmarks/bench_screening.py --part screening --roots 48

One GPU node (entropy part; screening runs on whatever device model.device picks)::

    python benchmarks/bench_screening.py --part entropy --n 2048 8192 --d 2048 4096

Part 1 compares, at vocab 151,936, the materialised path (``logits = hidden @ Wᵀ`` then
``log_softmax`` entropy, what a naive screener does) with the chunked fused linear entropy of
``policylong.kernels``. Each measurement runs in a fresh process, and the peak extra memory is
that process's peak RSS (or CUDA peak allocation) minus its RSS just before the call.
Part 2 screens the synthetic corpus with the embedded base model and reports root documents/s
and tokens scored/s (root-entropy and candidate-verification forwards included).

Prints a table and appends one JSON row per measurement to ``benchmarks/results.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

VOCAB = 151_936
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rows import append_rows  # noqa: E402


def bench_entropy(ns, ds, v, dtype, device):
    """The fused-linear-entropy rows of bench_kernels (materialised vs. chunked)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_kernels import _fmt, measure

    rows = []
    for d in ds:
        for n in ns:
            pair = [
                measure("linear", m, n, d, v, dtype, device, 2) for m in ("materialised", "chunked")
            ]
            for r in pair:
                print(_fmt(r), flush=True)
            rows += pair
            if all("error" not in r for r in pair):
                m, c = pair
                print(
                    f"{'':>20} memory ratio chunked/materialised = "
                    f"{c['peak_extra_mb'] / max(m['peak_extra_mb'], 1e-9):.3f}, "
                    f"|Δchecksum| = {abs(m['checksum'] - c['checksum']):.3g}"
                )
    return rows


def bench_screening(roots: int, seq_length: int):
    from policylong.cli import build_index, run_screen
    from policylong.config import load_config
    from policylong.synthetic import generate_corpus

    wd = tempfile.mkdtemp(prefix="bench_screen_")
    try:
        cfg = load_config(None, [f"workdir={wd}", f"data.seq_length={seq_length}"])
        generate_corpus(os.path.join(wd, "corpus"), num_roots=roots, seed=0)
        build_index(cfg)
        t0 = time.time()
        m = run_screen(cfg, os.path.join(wd, "stage"))
        dt = time.time() - t0
        with open(os.path.join(wd, "stage", "timing.json")) as f:
            timing = json.load(f)
        st = m["stats"]
        row = {
            "method": "screen_stage",
            "roots": st["roots_screened"],
            "tokens_scored": st["tokens_scored"],
            "candidate_forwards": st["candidate_forwards"],
            "seq_length": seq_length,
            "seconds": round(dt, 2),
            "roots_per_s": round(st["roots_screened"] / dt, 3),
            "tokens_scored_per_s": round(st["tokens_scored"] / dt, 1),
            "pipeline_seconds": timing["seconds"],
            "sequences": m["num_sequences"],
        }
        print(
            f"screening: {row['roots']} roots, {row['candidate_forwards']} candidate forwards "
            f"in {dt:.1f}s -> {row['roots_per_s']:.2f} roots/s, "
            f"{row['tokens_scored_per_s']:.0f} root tokens scored/s"
        )
        return [row]
    finally:
        shutil.rmtree(wd, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--part", choices=["entropy", "screening", "all"], default="all")
    ap.add_argument("--n", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--d", type=int, nargs="+", default=[2048])
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--roots", type=int, default=32)
    ap.add_argument("--seq-length", type=int, default=1024)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    import torch

    meta = {
        "bench": "screening",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host_cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
    }
    rows = []
    if args.part in ("entropy", "all"):
        rows += bench_entropy(args.n, args.d, args.vocab, args.dtype, args.device)
    if args.part in ("screening", "all"):
        rows += bench_screening(args.roots, args.seq_length)
    if not args.no_save:
        append_rows(rows, meta)


if __name__ == "__main__":
    main()
