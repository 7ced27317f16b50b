"""The dGRPO paper's comparison at CPU scale: sft, kd, grpo, opd and dgrpo at an equal rollout
budget, several seeds, from one start checkpoint with one teacher.

    python benchmarks/bench_align.py --workdir W --start demo_workdir/runs/policylong/ckpt_3 \\
        [--teacher CKPT] [--seeds 0 1 2] [--steps 15] [--lengths 256 512]

Without ``--teacher`` the teacher is built first: ``gold-sft`` (the start model fine-tuned on
the reference answers of tasks of seed 99, which no compared run or evaluation uses). Every
run: ``align.steps`` steps of ``prompts_per_step`` × ``group_size`` responses (sft / kd: the
teacher's responses, the same count). Then greedy accuracy on held-out tasks (seed 777) per
family and length for the start, the teacher and every run; greedy accuracy at the first
length every ``--eval-every`` steps (the runs save there), hence the steps each run needs to
reach ``--reach`` (default: half-way from the start's accuracy to the teacher's); and
retention: NIAH-single top-1 at 128 tokens and the language-model loss on held-out short
documents (``align.evaluate.retention``). Writes a JSON row per run to
``benchmarks/results.jsonl``, ``W/align_compare.json`` and PNG plots in ``W/plots/``
(reward vs step, accuracy per length, accuracy vs step, KL to the teacher, retention), and
prints the tables.
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
        f"align.save_interval={a.eval_every}",
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
    ap.add_argument("--eval-every", type=int, default=5, help="steps between accuracy checks")
    ap.add_argument("--reach", type=float, help="accuracy whose first step is reported")
    a = ap.parse_args()

    import torch
    from rows import append_rows, run_meta

    from policylong.align.evaluate import plot_eval, retention, task_accuracy
    from policylong.align.loop import run_align
    from policylong.config import load_config
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
    evals, kept = {}, {}

    def accuracy(lm, lengths):
        per = {}
        for length in lengths:
            recs = generate_tasks(fams, a.eval_n * len(fams), length, 777, lm.tokenizer)
            per[str(length)] = task_accuracy(lm, recs, a.max_new)
        return per

    for name, src in models.items():
        lm = megatron_language_model(cfg, src)
        evals[name] = accuracy(lm, a.lengths)
        kept[name] = retention(lm, a.eval_n, 4, 128)
        print(name, json.dumps(evals[name]), json.dumps(kept[name]), flush=True)
    # accuracy along the way (first length): the runs saved every --eval-every steps
    L0, f0 = str(a.lengths[0]), fams[0]
    curve = {}
    for name in runs:
        pts = {}
        for it in range(a.eval_every, a.steps, a.eval_every) if a.eval_every else ():
            lm = megatron_language_model(cfg, f"{models[name]}@{it}")
            pts[it] = accuracy(lm, [a.lengths[0]])[L0][f0]["accuracy"]
        pts[a.steps] = evals[name][L0][f0]["accuracy"]
        curve[name] = pts
        print(name, "accuracy by step", pts, flush=True)
    start_acc = evals["start"][L0][f0]["accuracy"]
    reach = a.reach
    if reach is None:
        reach = round((start_acc + evals["teacher"][L0][f0]["accuracy"]) / 2, 3)

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
                "accuracy_by_step": {str(k): v for k, v in curve[name].items()},
                "reach": reach,
                "steps_to_reach": next((k for k, v in curve[name].items() if v >= reach), None),
                "retention": kept[name],
                "start_accuracy": evals["start"],
                "teacher_accuracy": evals["teacher"],
                "start_retention": kept["start"],
                "teacher_retention": kept["teacher"],
                "teacher": teacher,
                "teacher_steps": a.teacher_steps,
                "teacher_lr": a.teacher_lr or a.lr,
                "lr": a.lr,
                "tasks": a.tasks,
                "start": a.start,
            }
        )
    append_rows(rows)
    out = {"evals": evals, "retention": kept, "reach": reach, "rows": rows}
    with open(os.path.join(a.workdir, "align_compare.json"), "w") as f:
        json.dump(out, f, indent=2)
    os.makedirs(os.path.join(a.workdir, "plots"), exist_ok=True)
    plot_eval(
        {n: {"tasks": evals[n]} for n in ["start", "teacher"] + list(runs)},
        os.path.join(a.workdir, "plots", "accuracy.png"),
    )
    _plot_curves(rows, os.path.join(a.workdir, "plots"))
    _plot_by_step(rows, start_acc, reach, f"{f0} @{L0}", os.path.join(a.workdir, "plots"))
    _table(rows, evals, kept, fams, a.lengths)
    _reach_table(rows, reach, a.steps)
    print(f"{time.perf_counter() - t0:.0f} s", flush=True)


def _mean_sd(xs):
    import numpy as np

    x = np.asarray(xs, dtype=float)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def _table(rows, evals, kept, fams, lengths) -> None:
    cols = [f"{f} @{L}" for L in lengths for f in fams] + ["niah@128", "held-out loss"]
    print("| model | " + " | ".join(cols) + " |")
    print("|---" * (1 + len(cols)) + "|")
    for name in ("start", "teacher"):
        cells = [f"{evals[name][str(L)][f]['accuracy']:.3f}" for L in lengths for f in fams]
        r = kept[name]
        cells += [f"{r['niah_single']['accuracy']:.3f}", f"{r['heldout_loss']['loss']:.4f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for p in dict.fromkeys(r["preset"] for r in rows):
        rs = [r for r in rows if r["preset"] == p]
        cells = []
        for L in lengths:
            for f in fams:
                m, s = _mean_sd([r["accuracy"][str(L)][f]["accuracy"] for r in rs])
                cells.append(f"{m:.3f} ± {s:.3f}")
        m, s = _mean_sd([r["retention"]["niah_single"]["accuracy"] for r in rs])
        cells.append(f"{m:.3f} ± {s:.3f}")
        m, s = _mean_sd([r["retention"]["heldout_loss"]["loss"] for r in rs])
        cells.append(f"{m:.4f} ± {s:.4f}")
        print(f"| {p} (n={len(rs)}) | " + " | ".join(cells) + " |")


def _reach_table(rows, reach: float, steps: int) -> None:
    print(f"\nsteps to reach greedy accuracy {reach:.3f} (first length; '>{steps}': not reached)")
    seeds = [r["seed"] for r in rows if r["preset"] == rows[0]["preset"]]
    print("| preset | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---" * (1 + len(seeds)) + "|")
    for p in dict.fromkeys(r["preset"] for r in rows):
        rs = [r for r in rows if r["preset"] == p]
        cells = [str(r["steps_to_reach"] or f">{steps}") for r in rs]
        print(f"| {p} | " + " | ".join(cells) + " |")


def _plot_by_step(rows, start: float, reach: float, label: str, out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for p in dict.fromkeys(r["preset"] for r in rows):
        rs = [r for r in rows if r["preset"] == p]
        x = [0] + [int(k) for k in rs[0]["accuracy_by_step"]]
        y = np.asarray([[start] + list(r["accuracy_by_step"].values()) for r in rs], float)
        ax.plot(x, y.mean(0), marker="o", label=p)
        ax.fill_between(x, y.min(0), y.max(0), alpha=0.2)
    ax.axhline(reach, color="gray", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel(f"greedy accuracy, {label}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy_by_step.png"), dpi=120)
    plt.close(fig)


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
