"""The dGRPO paper's comparison at CPU scale: sft, kd, grpo, opd and dgrpo at an equal rollout
budget, several seeds, from one start checkpoint with one teacher.

    python benchmarks/bench_align.py --workdir W --start demo_workdir/runs/policylong/ckpt_3 \\
        [--teacher CKPT] [--seeds 0 1 2] [--steps 15] [--lengths 256 512]

Without ``--teacher`` the teacher is built first: ``gold-sft`` (the start model fine-tuned on
the reference answers of tasks of seed 99, which no compared run or evaluation uses). Every
run: ``align.steps`` steps of ``prompts_per_step`` × ``group_size`` responses (sft / kd: the
teacher's responses, the same count). Then greedy accuracy on held-out tasks (seed 777) per
family and length for the start, the teacher and every run, and retention: NIAH-single top-1
at 128 tokens (the embedded probes, ``policylong.evaluation``). Writes a JSON row per run to
``benchmarks/results.jsonl``, ``W/align_compare.json`` and PNG plots in ``W/plots/``
(reward vs step, accuracy per length, KL to the teacher), and prints the table.
Runs resume (``policylong align`` does), so an interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PRESETS = ("sft", "kd", "grpo", "opd", "dgrpo")


def _settings(a) -> list[str]:
    return [
        f"workdir={a.workdir}",
        f"model.path={a.start}",
        f"align.tasks={a.tasks}",
        f"align.task_length={a.task_length}",
        f"align.num_tasks={a.num_tasks}",
        f"align.prompts_per_step={a.prompts}",
        f"align.group_size={a.group}",
        f"align.max_new_tokens={a.max_new}",
        f"align.lr={a.lr}",
        "align.micro_batch_size=16",
    ]


def _metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--start", required=True, help="the policy every run starts from")
    ap.add_argument("--teacher", help="teacher checkpoint (default: build gold-sft)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--teacher-steps", type=int, default=30)
    ap.add_argument("--teacher-lr", type=float, help="gold-sft learning rate (default: --lr)")
    ap.add_argument("--tasks", default="lookup")
    ap.add_argument("--task-length", type=int, default=256)
    ap.add_argument("--num-tasks", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--eval-n", type=int, default=48)
    a = ap.parse_args()

    import torch
    from rows import RESULTS, run_meta

    from policylong.align.evaluate import plot_eval, task_accuracy
    from policylong.align.loop import run_align
    from policylong.config import load_config
    from policylong.evaluation import evaluate
    from policylong.logs import setup_logging
    from policylong.megatron_ext.lm import megatron_language_model
    from policylong.tasks import generate_tasks

    setup_logging()
    torch.set_num_threads(os.cpu_count() or 1)
    base = _settings(a)
    t0 = time.perf_counter()
    teacher = a.teacher
    if teacher is None:
        cfg = load_config(
            ["gold-sft"],
            base
            + ["seed=99", f"align.steps={a.teacher_steps}", "align.preset=teacher"]
            + [f"align.lr={a.teacher_lr or a.lr}"],
        )
        run_align(cfg)
        teacher = os.path.join(a.workdir, "align", "teacher", "ckpt")
    runs = {}
    for seed in a.seeds:
        for p in a.presets:
            name = f"{p}-s{seed}"
            sets = base + [
                f"seed={seed}",
                f"align.steps={a.steps}",
                f"align.preset={name}",
                f"align.teacher={teacher}",
            ]
            if p == "grpo":
                sets.remove(f"align.teacher={teacher}")
            run_align(load_config([p], sets))
            runs[name] = os.path.join(a.workdir, "align", name)

    cfg = load_config(None, base)
    fams = a.tasks.split(",")
    models = {"start": a.start, "teacher": teacher}
    models.update({n: os.path.join(d, "ckpt") for n, d in runs.items()})
    evals, retention = {}, {}
    for name, src in models.items():
        lm = megatron_language_model(cfg, src)
        per = {}
        for length in a.lengths:
            recs = generate_tasks(fams, a.eval_n * len(fams), length, 777, lm.tokenizer)
            per[str(length)] = task_accuracy(lm, recs, a.max_new)
        evals[name] = per
        niah = evaluate(lm, [128], n=a.eval_n, tasks=("niah_single",), seed=4)
        retention[name] = niah["niah_single"][128]["accuracy"]
        print(name, json.dumps(per), "niah@128", retention[name], flush=True)

    meta = run_meta("align_compare", False)
    rows = []
    for name, d in runs.items():
        m = _metrics(os.path.join(d, "metrics.jsonl"))
        preset, seed = name.rsplit("-s", 1)
        rows.append(
            {
                **meta,
                "preset": preset,
                "seed": int(seed),
                "steps": a.steps,
                "rollouts_per_step": a.prompts * a.group,
                "task_length": a.task_length,
                "reward": [r["reward"] for r in m],
                "kl_teacher": [r.get("kl_teacher") for r in m],
                "accuracy": {L: v for L, v in evals[name].items()},
                "niah128": retention[name],
                "start_accuracy": evals["start"],
                "teacher_accuracy": evals["teacher"],
                "start_niah128": retention["start"],
                "teacher": teacher,
                "teacher_steps": a.teacher_steps,
                "teacher_lr": a.teacher_lr or a.lr,
                "lr": a.lr,
                "tasks": a.tasks,
                "start": a.start,
            }
        )
    with open(RESULTS, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    out = {"evals": evals, "retention": retention, "rows": rows}
    with open(os.path.join(a.workdir, "align_compare.json"), "w") as f:
        json.dump(out, f, indent=2)
    os.makedirs(os.path.join(a.workdir, "plots"), exist_ok=True)
    plot_eval(
        {n: evals[n] for n in ["start", "teacher"] + list(runs)},
        os.path.join(a.workdir, "plots", "accuracy.png"),
    )
    _plot_curves(rows, os.path.join(a.workdir, "plots"))
    _table(rows, evals, retention, fams, a.lengths)
    print(f"{time.perf_counter() - t0:.0f} s", flush=True)


def _mean_sd(xs):
    import numpy as np

    x = np.asarray(xs, dtype=float)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def _table(rows, evals, retention, fams, lengths) -> None:
    print("| preset | " + " | ".join(f"{f} @{L}" for L in lengths for f in fams) + " | niah@128 |")
    print("|---" * (1 + len(lengths) * len(fams) + 1) + "|")
    for name in ("start", "teacher"):
        cells = [f"{evals[name][str(L)][f]['accuracy']:.3f}" for L in lengths for f in fams]
        print(f"| {name} | " + " | ".join(cells) + f" | {retention[name]:.3f} |")
    for p in dict.fromkeys(r["preset"] for r in rows):
        rs = [r for r in rows if r["preset"] == p]
        cells = []
        for L in lengths:
            for f in fams:
                m, s = _mean_sd([r["accuracy"][str(L)][f]["accuracy"] for r in rs])
                cells.append(f"{m:.3f} ± {s:.3f}")
        m, s = _mean_sd([r["niah128"] for r in rs])
        print(f"| {p} (n={len(rs)}) | " + " | ".join(cells) + f" | {m:.3f} ± {s:.3f} |")


def _plot_curves(rows, out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    for key, fname, label in (
        ("reward", "reward.png", "reward of the trained responses"),
        ("kl_teacher", "kl_teacher.png", "KL(policy ‖ teacher)"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in dict.fromkeys(r["preset"] for r in rows):
            ys = [r[key] for r in rows if r["preset"] == p]
            if any(v is None for y in ys for v in y):
                continue
            y = np.asarray(ys, dtype=float)
            x = np.arange(1, y.shape[1] + 1)
            ax.plot(x, y.mean(0), label=p)
            ax.fill_between(x, y.min(0), y.max(0), alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, fname), dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()
