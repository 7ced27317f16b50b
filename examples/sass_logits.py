"""Static cost of the logits-entropy kernel variants, without a GPU: compile each one for
sm_90 (H100/H200) with Triton's own ptxas and read registers and instruction counts from
the cubin with the cuobjdump shipped in the triton wheel.

Registers and shared memory decide how many warps an SM holds (65,536 registers and 228 KB
per SM, at most 32 blocks), and so how many loads are in flight; benchmarks/KERNELS.md has the
tables this printed on 2026-11-27.

    # CPU (any machine with the triton wheel; no CUDA device needed)
    python examples/sass_logits.py                      # the autotune configs + candidates
    python examples/sass_logits.py --dtype float32 --sweep   # every benchmark sweep variant
    # the Triton of the GPU image (3.6.0) instead of this venv's:
    pip install --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 python examples/sass_logits.py
    # one node / several nodes: not applicable (nothing runs on a GPU)
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def compile_sm90(consts: dict, num_warps: int, dtype: str) -> dict:
    """Registers, SASS instruction count and local-memory spills of one configuration."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import policylong.kernels.entropy as E

    # constexprs with defaults must be named too (ASTSource does not fill them in)
    params = inspect.signature(E._logits_entropy_kernel.fn).parameters.values()
    consts = {p.name: p.default for p in params if p.default is not p.empty} | consts
    sig = {"X": f"*{dtype}", "OUT_M": "*fp32", "OUT_S": "*fp32", "OUT_T": "*fp32"}
    sig.update({k: "i32" for k in ("n", "v", "stride_x", "v_per_split", "n_splits")})
    sig["size_class"] = "i32"
    sig.update({k: "constexpr" for k in consts})
    # what the launcher's specialisation sees for the real shapes: pointers, n, v, the row
    # stride and the split width all divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(9)}
    src = ASTSource(E._logits_entropy_kernel, sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", res.stdout).group(1))
    instrs = sum(1 for line in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+\S", line))
    smem = k.metadata.shared
    # resident blocks per SM: 65,536 registers (allocated per warp in units of 256), at most
    # 64 warps and 32 blocks, and 228 KB of shared memory with 1 KB reserved per block
    # (STAGES = s keeps s - 1 tiles in flight through shared memory: 2 KB each at 1024 bf16)
    blocks = min(65536 // (((regs + 7) // 8) * 8 * 32) // num_warps, 64 // num_warps, 32)
    if smem:
        blocks = min(blocks, 228 * 1024 // (smem + 1024))
    return {
        "regs": regs,
        "instrs": instrs,
        "spills": sass.count("STL"),
        "warps_per_sm": blocks * num_warps,
        "smem": smem,
    }


def _configs(sweep: bool, dtype: str):
    """(name, constexprs, num_warps) of the autotune configs or of the sweep variants; PAIRS
    as the launcher and the autotuner's heuristic decide it for aligned bf16 rows."""
    import policylong.kernels.entropy as E

    if not sweep:
        for c in E._LOGITS_CONFIGS + E._LOGITS_CANDIDATES:
            kw = c.kwargs
            name = f"r{kw['BLOCK_R']} v{kw['BLOCK_V']} w{c.num_warps} s{kw['STAGES']}"
            name += "".join(f" {f.lower()}" for f in ("GROUP", "DEFER", "FAST_EXP") if kw.get(f))
            tag = "candidate" if c in E._LOGITS_CANDIDATES else "timed"
            pairs = bool(kw.get("DEFER")) and dtype == "bf16"
            yield f"{name} ({tag})", {**kw, "PAIRS": pairs}, c.num_warps
        return
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from bench_kernels import LOGITS_VARIANTS

    for name, kw in LOGITS_VARIANTS.items():
        kw = dict(kw)
        warps = kw.pop("num_warps", 4)
        kw.pop("splits", None)
        pairs = kw.pop("pairs", None)
        if pairs is None:
            pairs = kw.get("defer", False) and dtype == "bf16"
        yield name, E.logits_kernel_meta(pairs=pairs, **kw), warps


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--sweep", action="store_true", help="the sweep variants of bench_kernels")
    args = ap.parse_args()
    import triton

    print(f"triton {triton.__version__}, sm_90, {args.dtype}")
    print(f"{'regs':>5} {'smem':>6} {'warps/SM':>8} {'SASS':>6} {'spills':>6}  config")
    for name, consts, warps in _configs(args.sweep, DTYPES[args.dtype]):
        r = compile_sm90(consts, warps, DTYPES[args.dtype])
        print(
            f"{r['regs']:>5} {r['smem']:>6} {r['warps_per_sm']:>8} {r['instrs']:>6}"
            f" {r['spills']:>6}  {name}",
            flush=True,
        )


if __name__ == "__main__":
    main()
