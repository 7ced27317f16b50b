"""Training-stage throughput: tokens/s, TFLOP/s per GPU and MFU of `policylong train`.

Builds a Qwen2-shaped model with random weights (no download), a stage dataset of random
tokens at the target length, and runs a few steps of ``megatron_ext.train.train_stage``;
prints a table and appends one JSON row to ``benchmarks/results.jsonl``.

CPU (a smoke run of the tiny shape)::

    python benchmarks/bench_train.py --shape tiny --seq 512 --steps 3

One GPU (Qwen2.5-0.5B shape at 32K tokens, bf16, SDPA attention unless Transformer Engine
imports)::

    python benchmarks/bench_train.py --shape qwen2.5-0.5b --seq 32768 --steps 4 --gbs 4

Several GPUs / nodes: run it under ``torchrun`` with ``--set parallel.tensor_parallel=...``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results.jsonl")

SHAPES = {
    # Qwen2.5-0.5B: 24 layers, hidden 896, 14 heads / 2 KV heads, FFN 4864, vocab 151,936
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1520,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    ),
}


def make_model(shape: str, seq: int, out: str) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(max_position_embeddings=seq, bos_token_id=2, eos_token_id=3, **SHAPES[shape])
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)


def make_stage(vocab: int, seq: int, n: int, out: str) -> None:
    import numpy as np

    from policylong.datasets import commit, write_stage_dataset

    rng = np.random.default_rng(0)
    seqs = [rng.integers(10, vocab, size=seq).tolist() for _ in range(n)]
    part = out + ".partial"
    os.makedirs(part)
    write_stage_dataset(part, seqs, [{"root": str(i)} for i in range(n)], {"eod": 3}, vocab, seq)
    commit(part, out)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gbs", type=int, default=2)
    ap.add_argument("--mb", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="extra config overrides")
    ap.add_argument("--workdir", help="keep the model/data/checkpoint here (default: temp)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    from policylong.config import load_config
    from policylong.megatron_ext.model import resolve_spec
    from policylong.megatron_ext.train import train_stage

    rank0 = os.environ.get("RANK", "0") == "0"
    work = args.workdir or tempfile.mkdtemp(prefix="bench_train_")
    hf, stage, ckpt = (os.path.join(work, x) for x in ("hf", "stage_0", "ckpt"))
    t0 = time.time()
    if rank0 and not os.path.isdir(hf):
        make_model(args.shape, args.seq, hf)
    if rank0 and not os.path.isdir(stage):
        make_stage(SHAPES[args.shape]["vocab_size"], args.seq, args.steps * args.gbs, stage)
    if dist.is_initialized():
        dist.barrier()
    setup_s = time.time() - t0
    shutil.rmtree(ckpt, ignore_errors=True)
    sets = [
        "screening.screen_length=16",
        f"data.seq_length={args.seq}",
        f"train.train_steps={args.steps}",
        f"train.global_batch_size={args.gbs}",
        f"train.micro_batch_size={args.mb}",
        "train.lr=1e-5",
        "train.min_lr=1e-6",
        *args.set,
    ]
    cfg = load_config(None, sets)
    t1 = time.time()
    train_stage(cfg, [stage], hf, ckpt)
    wall = time.time() - t1
    if not rank0:
        return
    with open(os.path.join(ckpt, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    steady = rows[1:] or rows  # step 1 includes warm-up (allocator, kernel selection)
    mean = lambda k: sum(r[k] for r in steady) / len(steady)  # noqa: E731
    cuda = torch.cuda.is_available()
    row = {
        "bench": "train",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "shape": args.shape,
        "seq_length": args.seq,
        "global_batch_size": args.gbs,
        "micro_batch_size": args.mb,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "layer_spec": resolve_spec(cfg.train.layer_spec),
        "params_dtype": "bfloat16"
        if cuda and cfg.train.params_dtype == "auto"
        else cfg.train.params_dtype,
        "steps": len(rows),
        "tokens_per_s": round(mean("tokens_per_s"), 1),
        "losses": [round(r["loss"], 4) for r in rows],
        "stage_wall_s": round(wall, 1),
        "setup_s": round(setup_s, 1),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
    }
    if cuda:
        row["tflops_per_gpu"] = round(mean("tflops_per_gpu"), 1)
        if "mfu" in steady[0]:
            row["mfu"] = round(mean("mfu"), 3)
    print(f"{'shape':>14} {'seq':>6} {'tokens/s':>10} {'TFLOP/s/GPU':>12} {'MFU':>6} {'spec':>6}")
    print(
        f"{row['shape']:>14} {row['seq_length']:>6} {row['tokens_per_s']:>10.0f} "
        f"{row.get('tflops_per_gpu', float('nan')):>12.1f} {row.get('mfu', float('nan')):>6.3f} "
        f"{row['layer_spec']:>6}"
    )
    print("losses:", row["losses"])
    if not args.no_save:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"appended 1 row to {RESULTS}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
