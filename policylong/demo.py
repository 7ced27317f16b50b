"""``policylong demo``: the whole method on the embedded default, on CPU, with no downloads.

synthetic corpus (planted dependencies + ground truth) -> FAISS passage index -> PolicyLong and
EntropyLong side by side, each a ``policylong run`` of T stages (screen with M_t, train M_t into
M_{t+1} with Megatron-Core on gloo) at a target length L several times the embedded model's
training length (400 tokens), with the RoPE base raised -> ``policylong report`` (JSON + PNGs)
-> alignment of PolicyLong's extended model: a teacher (``gold-sft``: the extended model
fine-tuned on reference answers of tasks of another seed), then ``dgrpo`` from the extended
model with that teacher, then greedy task accuracy of the three (``policylong eval-tasks``).

Both runs see the same corpus, the same root documents per stage, the same token budget and
the same training schedule; they differ only in the method preset (``policylong/presets/``).
The NLL guard is on for both (the synthetic corpus plants wrong-value passages that fool
entropy alone).
"""

from __future__ import annotations

import json
import logging
import os
import time

from policylong.align.evaluate import evaluate_tasks, plot_eval, write_eval
from policylong.align.loop import run_align
from policylong.config import load_config
from policylong.report import loop_report, summarize_report
from policylong.retrieval import build_index
from policylong.stages import run_stages
from policylong.synthetic import generate_corpus

log = logging.getLogger("policylong.demo")

DEMO_RUNS = ("policylong", "entropylong")
DEMO_LENGTHS = [256, 512, 1024, 1536]
DEMO_SETTINGS = [
    # L = 1536, about 4x the 400 tokens the embedded model was trained on; RoPE base
    # 10,000 -> 50,000 (NTK rule for 4x at head dim 32: 10,000 * 4^(32/30) = 44,000)
    "data.seq_length=1536",
    "train.rotary_base=50000",
    "loop.stages=3",
    "loop.roots_per_stage=24",
    # 30 steps x 4 sequences = 120 sequences per stage (~5 passes over ~24 sequences)
    "train.train_steps=30",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.lr=3e-4",
    "train.min_lr=3e-5",
    "train.lr_warmup_steps=3",
    "train.save_interval=10",
]
ALIGN_SETTINGS = [
    "align.tasks=lookup",
    "align.task_length=256",
    "align.prompts_per_step=8",
    "align.group_size=8",
    "align.max_new_tokens=4",
    "align.lr=3e-5",
    "align.micro_batch_size=16",
]
"""The alignment part: 256-token lookup prompts; 8 prompts x 8 rollouts per step."""
ALIGN_STEPS = {"teacher": 30, "dgrpo": 15}
ALIGN_EVAL = {"lengths": [256, 512], "n": 48, "seed": 777}
"""Held-out evaluation prompts (a seed no run trains on)."""
HELDOUT = 24
"""Root documents kept out of every stage: the report's probes and landscape use them."""


def run_demo(configs: list[str] | None, overrides: list[str], roots: int | None = None) -> dict:
    t0 = time.time()
    cfgs = {p: load_config([*(configs or []), p], DEMO_SETTINGS + overrides) for p in DEMO_RUNS}
    cfg = cfgs[DEMO_RUNS[0]]
    need = cfg.data.root_offset + cfg.loop.stages * cfg.loop.roots_per_stage + HELDOUT
    roots = roots or need
    corpus = cfg.path("corpus")
    if not os.path.isfile(os.path.join(corpus, "ground_truth.jsonl")):
        counts = generate_corpus(corpus, num_roots=roots, seed=cfg.seed)
        log.info("demo: synthetic corpus %s", counts)
    if not os.path.isfile(os.path.join(cfg.path(cfg.retrieval.index_dir), "meta.json")):
        build_index(cfg)
    seconds = {}
    for p, c in cfgs.items():
        t1 = time.time()
        log.info(
            "demo: run %s (%d stages x %d roots, L=%d)",
            p,
            c.loop.stages,
            c.loop.roots_per_stage,
            c.data.seq_length,
        )
        run_stages(c)
        seconds[p] = round(time.time() - t1, 1)
    t1 = time.time()
    rep = loop_report(cfg, list(DEMO_RUNS), DEMO_LENGTHS)
    seconds["report"] = round(time.time() - t1, 1)
    summary = summarize_report(rep)
    st0 = rep["runs"][DEMO_RUNS[0]]["stages"][0]
    gt = st0.get("ground_truth") or {}
    summary["stage_0_screening_vs_planted_truth"] = {
        k: gt.get(k)
        for k in (
            "recall",
            "precision",
            "precision_entropy_only",
            "hard_negative_distractor_recall",
        )
    }
    t1 = time.time()
    summary["align"] = _align(cfg, configs, overrides)
    seconds["align"] = round(time.time() - t1, 1)
    summary["report"] = rep["plots"] + [os.path.join(cfg.workdir, "report", "tasks_eval.png")]
    summary["seconds"] = {**seconds, "total": round(time.time() - t0, 1)}
    with open(os.path.join(cfg.workdir, "report", "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _align(cfg, configs, overrides) -> dict:
    """Teacher (gold-sft, tasks of seed 99), dgrpo from PolicyLong's last checkpoint, then the
    greedy task accuracy of start, teacher and result on held-out prompts."""
    start = os.path.join(cfg.workdir, "runs", DEMO_RUNS[0], f"ckpt_{cfg.loop.stages}")
    base = DEMO_SETTINGS + overrides + ALIGN_SETTINGS + [f"model.path={start}"]
    teacher_cfg = load_config(
        [*(configs or []), "gold-sft"],
        base + ["seed=99", "align.preset=teacher", f"align.steps={ALIGN_STEPS['teacher']}"],
    )
    log.info("demo: align teacher (gold-sft from %s)", start)
    run_align(teacher_cfg)
    teacher = os.path.join(cfg.workdir, "align", "teacher", "ckpt")
    dg = load_config(
        [*(configs or []), "dgrpo"],
        base + [f"align.teacher={teacher}", f"align.steps={ALIGN_STEPS['dgrpo']}"],
    )
    log.info("demo: align dgrpo (teacher %s)", teacher)
    last = run_align(dg)
    models = [start, teacher, os.path.join(cfg.workdir, "align", "dgrpo", "ckpt")]
    e = ALIGN_EVAL
    res = evaluate_tasks(dg, models, ["lookup"], e["lengths"], e["n"], e["seed"], 4, e["n"])
    out = os.path.join(cfg.workdir, "report")
    write_eval(res, out)
    plot_eval(res, os.path.join(out, "tasks_eval.png"))
    names = dict(zip(models, ("start", "teacher", "dgrpo")))
    return {
        "greedy_accuracy": {
            names[m]: {L: v["lookup"]["accuracy"] for L, v in r["tasks"].items()}
            for m, r in res.items()
        },
        "retention": {
            names[m]: {
                "niah_single@128": r["retention"]["niah_single"]["accuracy"],
                "heldout_loss": r["retention"]["heldout_loss"]["loss"],
            }
            for m, r in res.items()
        },
        "dgrpo_last_step": {k: last.get(k) for k in ("reward", "kl_teacher", "loss")},
    }
