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
    from policylong.megatron_ext.generate import sample
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
        # the LanguageModel / align path: decoder output after the final norm, no head
        hidden = M.forward_only(model, tokens, hidden_only=True)
        # KV-cached greedy decoding (rollouts, eval-tasks) past a 20-token prompt
        prompt = tokens[0, :20].tolist()
        greedy = sample(model, prompt, 1, 6, 0.0, 0, set(), V)
        entry = {}
        if logits is not None:
            hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            with torch.no_grad():
                ref = hf(tokens).logits
                ref_h = hf.base_model(input_ids=tokens).last_hidden_state
            entry["max_abs_diff"] = float((logits[..., :V] - ref).abs().max())
            entry["hidden_max_abs_diff"] = float((hidden.transpose(0, 1) - ref_h).abs().max())
            seq = torch.tensor([prompt + greedy.tokens[0]])
            with torch.no_grad():
                lp = torch.log_softmax(hf(seq).logits[0, len(prompt) - 1 : -1], -1)
            entry["greedy_equal"] = greedy.tokens[0] == lp.argmax(-1).tolist()
            ref_lp = lp.gather(1, seq[0, len(prompt) :, None])[:, 0]
            entry["greedy_logprob_diff"] = float(
                (torch.tensor(greedy.logprobs[0]) - ref_lp).abs().max()
            )
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


def case_align(a) -> None:
    """One dGRPO step on a fixed batch (same on every layout: P = 2 prompts × G = 4 responses
    of random tokens, rewards planted), and KV-cached sampling checked against full forwards.
    Rank 0 saves loss, metric sums, the HF-layout gradients and the samples to ``--json``."""
    import torch
    from megatron.core import parallel_state as ps

    from policylong.align.loop import _head, train_on
    from policylong.align.objective import rollout_advantages
    from policylong.align.rollout import Batch, Scorer, score_with
    from policylong.config import load_config
    from policylong.megatron_ext import model as M
    from policylong.megatron_ext.generate import sample
    from policylong.megatron_ext.optim import build_optimizer, wrap_ddp
    from policylong.megatron_ext.parallel import init_distributed

    torch.set_num_threads(1)
    form = a.form
    sets = [
        f"parallel.tensor_parallel={a.tp}",
        f"parallel.pipeline_parallel={a.pp}",
        f"align.teacher={a.init}",
        "align.group_size=4",
        "align.prompts_per_step=2",
        "align.micro_batch_size=3",
        "align.lr=1e-3",
        "align.temperature=0.8",
        "train.clip_grad=1e9",
        "train.weight_decay=0",
    ]
    if form == "grpo":
        sets += ["align.teacher_coef=0"]
    else:
        sets += [f"align.teacher_form={form}", "align.teacher_coef=0.5"]
    cfg = load_config(None, sets)
    init_distributed(cfg.parallel, seed=7)
    hf = a.hf[0]
    hcfg = M.read_hf_config(hf)
    model = M.build_gpt_model(hcfg, M.ModelOptions(), max_seq_length=64)
    M.load_hf_weights(model, hcfg, hf)
    V = int(hcfg["vocab_size"])
    res = {}

    # sampling: the KV-cached sampler's log-probs equal a full forward's, seeds reproduce
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(10, V, (17,), generator=g).tolist()
    s1 = sample(model, prompt, 3, 6, 0.8, 1234, {3}, V)
    s2 = sample(model, prompt, 3, 6, 0.8, 1234, {3}, V)
    res["samples"] = s1.tokens
    res["same_seed_same_samples"] = s1.tokens == s2.tokens and s1.logprobs == s2.logprobs
    err = 0.0
    for toks, lps in zip(s1.tokens, s1.logprobs):
        seq = torch.tensor([prompt + toks])
        logits = M.forward_logits(model, seq)  # last pipeline stage only
        if logits is None:
            continue
        logits = logits[0, :, :V].double() / 0.8
        ref = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(
            1, torch.tensor(toks)[:, None]
        )[:, 0]
        err = max(err, float((ref - torch.tensor(lps, dtype=torch.float64)).abs().max()))
    res["sampler_logprob_max_err"] = err

    # one step on a fixed batch; DP ranks take their share of the prompts
    teacher = Scorer(cfg, a.init, "teacher", 64) if form != "grpo" else None
    ddp = wrap_ddp(model)
    opt, sched = build_optimizer(cfg, model, ddp, 1)
    dp, dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    g = torch.Generator().manual_seed(11)
    P, G = 2, 4
    prompts = [torch.randint(10, V, (int(n),), generator=g).tolist() for n in (13, 21)]
    resp = [
        [
            torch.randint(
                10, V, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g
            ).tolist()
            for _ in range(G)
        ]
        for _ in range(P)
    ]
    lsamp = [[(-2.0 - torch.rand(len(r), generator=g)).tolist() for r in rs] for rs in resp]
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    adv, _ = rollout_advantages(cfg.align, rewards)
    per = P // dp
    mine = list(range(dpr * per, (dpr + 1) * per))
    seqs, plens, rs, ls = [], [], [], []
    for p_ in mine:
        for j in range(G):
            seqs.append(prompts[p_] + resp[p_][j])
            plens.append(len(prompts[p_]))
            rs.append(resp[p_][j])
            ls.append(lsamp[p_][j])
    b = Batch(
        seqs,
        plens,
        rs,
        ls,
        rewards[mine],
        adv[mine].reshape(-1),
        torch.ones(len(seqs), dtype=torch.bool),
        [None] * len(seqs),
        [True] * len(seqs),
        [""] * len(seqs),
    )
    last = ps.is_pipeline_last_stage()
    head, start = _head(model, V) if last else (None, 0)
    tpg = ps.get_tensor_model_parallel_group() if a.tp > 1 else None
    ctx = {"tp_group": tpg, "device": "cpu", "pad": 3, "head": head}
    if teacher is not None:
        rows_v = head.shape[0] if last else 0
        if last:
            ctx["teacher_head"] = teacher.head_shard(start, rows_v)
        full = form == "full"
        b.teacher_hidden, b.logp_teacher = score_with(teacher, b, 3, full, start, rows_v)
    sums, gnorm = train_on(cfg, ddp, model, opt, sched, b, list(range(len(seqs))), ctx)
    import torch.distributed as dist

    res["grad_norm"] = gnorm
    for p_ in model.parameters():  # the HF-layout gradient: main_grad in place of the weights
        p_.data, p_.main_grad = p_.main_grad.to(p_.dtype), p_.data
    grads = {k: v.clone() for k, v in M.local_to_hf_state(model, hcfg).items()}
    loss_all = torch.tensor([sums.get("loss", 0.0)], dtype=torch.float64)  # last stage only
    errs = torch.tensor([res["sampler_logprob_max_err"]], dtype=torch.float64)
    if dp > 1:
        dist.all_reduce(loss_all, group=ps.get_data_parallel_group())
    if a.pp > 1:
        grp = ps.get_pipeline_model_parallel_group()
        dist.all_reduce(loss_all, group=grp)
        dist.all_reduce(errs, op=dist.ReduceOp.MAX, group=grp)
        parts = [None] * a.pp
        dist.all_gather_object(parts, grads, group=grp)
        grads = {k: v for part in parts for k, v in part.items()}
    res["loss"] = float(loss_all)
    res["sampler_logprob_max_err"] = float(errs)
    if os.environ.get("RANK", "0") == "0":
        res["grads"] = grads
        torch.save(res, a.json)


def case_presets(a) -> None:
    """``run_align`` for each preset of ``--presets`` in this process (one world, built
    once); rank 0 saves each run's summary to ``--json``."""
    import torch

    from policylong.align.loop import run_align
    from policylong.config import load_config

    torch.set_num_threads(1)
    out = {}
    for name in a.presets.split(","):
        cfg = load_config([name], a.set)
        out[name] = run_align(cfg)
    if os.environ.get("RANK", "0") == "0":
        _dump(a.json, out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("case", choices=["exact", "train", "entropy", "align", "presets"])
    ap.add_argument("--form", default="full")
    ap.add_argument("--presets", default="dgrpo")
    ap.add_argument("--set", action="append", default=[])
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
    cases = {
        "exact": case_exact,
        "train": case_train,
        "entropy": case_entropy,
        "align": case_align,
        "presets": case_presets,
    }
    cases[a.case](a)
    from policylong.megatron_ext.parallel import destroy_distributed

    destroy_distributed()  # a barrier first: no rank leaves while a peer is mid-collective


if __name__ == "__main__":
    main()
