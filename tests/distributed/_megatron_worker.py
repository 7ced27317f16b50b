"""Worker for the Megatron-Core tests, launched under torchrun (gloo, CPU) by test_megatron.py.

    torchrun --nproc-per-node N tests/distributed/_megatron_worker.py exact --json OUT \\
        --tp T --pp P --hf DIR [--hf DIR ...] --export-dir D
    torchrun --nproc-per-node N tests/distributed/_megatron_worker.py train --json OUT \\
        --tp T --pp P --init DIR --stage DIR --ckpt DIR --steps S [--kill K]

Rank 0 (or the last pipeline stage for logits) writes its findings as JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _dump(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def case_exact(a) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import AutoModelForCausalLM

    from policylong.config import ParallelConfig
    from policylong.megatron_ext import model as M
    from policylong.megatron_ext.parallel import init_distributed

    torch.set_num_threads(1)
    init_distributed(ParallelConfig(a.tp, a.pp), seed=7)
    res = {}
    for hf_dir in a.hf:
        name = os.path.basename(hf_dir.rstrip("/"))
        cfg = M.read_hf_config(hf_dir)
        model = M.build_gpt_model(cfg, M.ModelOptions(spec=a.spec), max_seq_length=64)
        M.load_hf_weights(model, cfg, hf_dir)
        g = torch.Generator().manual_seed(5)
        V = int(cfg["vocab_size"])
        tokens = torch.randint(0, V, (2, 29), generator=g)
        logits = M.forward_logits(model, tokens)
        entry = {}
        if logits is not None:
            hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            with torch.no_grad():
                ref = hf(tokens).logits
            entry["max_abs_diff"] = float((logits[..., :V] - ref).abs().max())
            entry["pad_columns"] = int(logits.shape[-1] - V)
        out = os.path.join(a.export_dir, name)
        M.export_hf(model, cfg, M.ModelOptions(), out, hf_dir)
        if dist.get_rank() == 0:
            src = M.HFWeights(hf_dir)
            dst = M.HFWeights(out)
            names = sorted(src.weight_map)
            entry["export_same_names"] = names == sorted(dst.weight_map)
            entry["export_bitwise"] = all(torch.equal(src.get(k), dst.get(k)) for k in names)
            hf2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            with torch.no_grad():
                entry["reload_logits_equal"] = bool(
                    torch.equal(hf2(tokens).logits, hf(tokens).logits)
                )
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, entry)
        merged = {}
        for e in gathered:
            merged.update(e)
        res[name] = merged
    res["layout"] = {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }
    if dist.get_rank() == 0:
        _dump(a.json, res)


def case_entropy(a) -> None:
    """Root entropies and NLLs through the live Megatron model (the on-policy backend) vs. the
    Hugging Face backend on the same weights."""
    import torch
    import torch.distributed as dist

    from policylong.config import ParallelConfig
    from policylong.lm import HFLanguageModel
    from policylong.megatron_ext import model as M
    from policylong.megatron_ext.lm import MegatronLanguageModel
    from policylong.megatron_ext.parallel import init_distributed
    from policylong.screening.entropy import root_entropies

    torch.set_num_threads(1)
    init_distributed(ParallelConfig(a.tp, a.pp), seed=7)
    hf_dir = a.hf[0]
    cfg = M.read_hf_config(hf_dir)
    model = M.build_gpt_model(cfg, M.ModelOptions(spec=a.spec), max_seq_length=128)
    M.load_hf_weights(model, cfg, hf_dir)
    mlm = MegatronLanguageModel(model, cfg, hf_dir)
    hlm = HFLanguageModel(hf_dir)
    g = torch.Generator().manual_seed(3)
    V = int(cfg["vocab_size"])
    roots = [torch.randint(4, V, (n,), generator=g).tolist() for n in (17, 40, 9)]
    got = root_entropies(mlm, roots, mlm.ctx_id, mlm.eos_id, 2)
    ref = root_entropies(hlm, roots, hlm.ctx_id, hlm.eos_id, 2)
    dh = max(float((x[0] - y[0]).abs().max()) for x, y in zip(got, ref))
    dn = max(float((x[1] - y[1]).abs().max()) for x, y in zip(got, ref))
    res = {
        "rank": dist.get_rank(),
        "max_entropy_diff": dh,
        "max_nll_diff": dn,
        "head_rows": int(mlm.head_weight().shape[0]),
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, res)
    if dist.get_rank() == 0:
        _dump(a.json, gathered)


def case_train(a) -> None:
    import torch

    from policylong.config import load_config
    from policylong.megatron_ext.train import train_stage

    torch.set_num_threads(1)
    sets = [
        "screening.screen_length=16",
        f"data.seq_length={a.seq}",
        f"parallel.tensor_parallel={a.tp}",
        f"parallel.pipeline_parallel={a.pp}",
        f"train.train_steps={a.steps}",
        f"train.global_batch_size={a.gbs}",
        f"train.micro_batch_size={a.mb}",
        f"train.lr={a.lr}",
        f"train.min_lr={a.lr / 10}",
        "train.lr_warmup_steps=2",
        f"train.save_interval={a.save_interval}",
        f"train.params_dtype={a.dtype}",
        "seed=11",
    ]
    cfg = load_config(None, sets)
    res = train_stage(cfg, [a.stage], a.init, a.ckpt, kill_at_step=a.kill)
    if os.environ.get("RANK", "0") == "0":
        with open(os.path.join(a.ckpt, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        _dump(a.json, {"summary": res, "metrics": rows})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("case", choices=["exact", "train", "entropy"])
    ap.add_argument("--json", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--hf", action="append", default=[])
    ap.add_argument("--export-dir")
    ap.add_argument("--spec", default="local")
    ap.add_argument("--init")
    ap.add_argument("--stage")
    ap.add_argument("--ckpt")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gbs", type=int, default=8)
    ap.add_argument("--mb", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--save-interval", type=int, default=0)
    ap.add_argument("--kill", type=int)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    {"exact": case_exact, "train": case_train, "entropy": case_entropy}[a.case](a)
    from policylong.megatron_ext.parallel import destroy_distributed

    destroy_distributed()  # a barrier first: no rank leaves while a peer is mid-collective


if __name__ == "__main__":
    main()
