"""The loop's report: every model of the given runs (M_0 and each M_{t+1}) evaluated on
held-out roots (paper Fig. 2a landscape, Fig. 3 difficulty, probes), JSON + PNG plots, and the
summary a person reads first."""

from __future__ import annotations

import copy
import json
import logging
import os
import time

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tqdm import tqdm

from policylong.corpus import encode, read_documents
from policylong.datasets import load_manifest
from policylong.errors import ConfigError, InputNotFoundError
from policylong.evaluation import Probe, evaluate, evaluate_planted, planted_probes, score_probes
from policylong.megatron_ext.checkpointing import read_meta
from policylong.megatron_ext.lm import megatron_language_model
from policylong.screening.entropy import root_entropies
from policylong.screening.positions import select_positions

log = logging.getLogger("policylong.report")


# -- the loop's report (paper Fig. 2a, Fig. 3, probes) -----------------------------------------

LANDSCAPE_PERCENTILE = 5.0
"""M_0's top 5% entropy positions of the held-out roots are the fixed set whose entropy under
M_1..M_T the landscape tracks (the paper's Fig. 2a follows the positions the base model found)."""


def stage_sequences(stage_dir: str) -> list[list[int]]:
    """The token sequences of a stage dataset, read with megatron-core's IndexedDataset."""

    ds = IndexedDataset(os.path.join(stage_dir, "data"))
    return [ds[i].astype(np.int64).tolist() for i in range(len(ds))]


def sequence_loss(lm, seqs: list[list[int]], batch_size: int = 4) -> float:
    """Mean next-token NLL over every token of ``seqs`` (what training minimises)."""

    probes = [Probe(s, [(i, s[i + 1]) for i in range(len(s) - 1)]) for s in seqs]
    return score_probes(lm, probes, batch_size)["nll"]


def heldout_roots(docs: list, root_offset: int, runs: list[dict]) -> list[str]:
    """Ids of the corpus documents (from ``root_offset`` on) that no stage of any of ``runs``
    screened: the probe and landscape roots."""
    used = set()
    for r in runs:
        for s in r["stages"]:
            used.update(range(*s["root_range"]))
    return [d.id for i, d in enumerate(docs) if i >= root_offset and i not in used]


def _run_summary(root: str) -> dict:
    """What a finished (or partly finished) loop left in ``root``: stages, checkpoints, stats."""

    with open(os.path.join(root, "loop.json")) as f:
        history = json.load(f)
    stages = []
    for h in sorted(history, key=lambda h: h["stage"]):
        m = load_manifest(h["stage_dir"])
        with open(os.path.join(h["checkpoint"], "metrics.jsonl")) as f:
            metrics = [json.loads(x) for x in f if x.strip()]
        stages.append(
            {
                "stage": h["stage"],
                "stage_dir": h["stage_dir"],
                "checkpoint": h["checkpoint"],
                "screened_with": h["screened_with"],
                "root_range": [
                    m["config"]["data"]["root_offset"],
                    m["config"]["data"]["root_offset"] + m["config"]["data"]["num_roots"],
                ],
                "sequences": m["num_sequences"],
                "screening": {
                    k: m["stats"].get(k)
                    for k in (
                        "roots",
                        "sequences",
                        "skipped",
                        "positives",
                        "negatives",
                        "mean_delta_h",
                        "mean_positives_per_sequence",
                        "mean_negatives_per_sequence",
                        "mean_root_entropy",
                        "mean_selected_entropy",
                    )
                },
                "ground_truth": m["stats"].get("ground_truth"),
                "train_loss": [r["loss"] for r in metrics],
            }
        )
    return {"dir": root, "stages": stages}


def loop_report(
    cfg,
    presets: list[str],
    lengths: list[int],
    n_niah: int = 12,
    max_probe_roots: int = 24,
    out_dir: str | None = None,
) -> dict:
    """Evaluate every model of the given loop runs (M_0 and each M_{t+1}) and write
    ``report.json`` and PNG plots to ``out_dir`` (default ``WORKDIR/report``), plus a per-run
    ``runs/<preset>/report/report.json``.

    Per run and stage: screening statistics, training losses, the Fig. 3 difficulty
    ``Loss(M_0) − Loss(M_t)`` on the data stage t built (M_t screened it when on-policy),
    the entropy landscape (the model's entropy at M_0's high-entropy positions of held-out
    roots) and probe scores per length (planted-dependency recall on held-out roots, NIAH
    single and multi-key)."""

    runs = {}
    for p in presets:
        root = os.path.join(cfg.workdir, "runs", p)
        if not os.path.isfile(os.path.join(root, "loop.json")):
            raise InputNotFoundError(f"{root}: no loop.json (run `policylong run` first)")
        runs[p] = _run_summary(root)
    corpus = read_documents(cfg.path(cfg.corpus.docs), cfg.corpus.id_field, cfg.corpus.text_field)
    held = heldout_roots(corpus, cfg.data.root_offset, list(runs.values()))[:max_probe_roots]
    if not held:
        raise ConfigError(
            f"{cfg.path(cfg.corpus.docs)}: every root document was used for training; the "
            "report needs held-out roots (make the corpus larger than stages × roots_per_stage)"
        )
    docs = {d.id: d.text for d in corpus}
    corpus_dir = os.path.dirname(cfg.path(cfg.corpus.docs))
    has_gt = bool(cfg.corpus.ground_truth) and os.path.isfile(cfg.path(cfg.corpus.ground_truth))
    seqs_cache: dict[str, list[list[int]]] = {}
    planted: dict[tuple, dict] = {}

    def seqs_of(stage_dir):
        if stage_dir not in seqs_cache:
            seqs_cache[stage_dir] = stage_sequences(stage_dir)
        return seqs_cache[stage_dir]

    # every (model, run) pair to evaluate; M_0 once for all runs
    # M_0 as the runs used it: the RoPE settings their checkpoints were trained with (the loop
    # screens stage 0 with them), unless this config sets its own
    first = next((r["stages"][0]["checkpoint"] for r in runs.values() if r["stages"]), None)
    if first and not (cfg.train.rotary_base or cfg.train.rope_scaling_factor):
        saved = read_meta(first).get("model_options", {})
        cfg = copy.deepcopy(cfg)
        cfg.train.rotary_base = saved.get("rotary_base") or 0.0
        cfg.train.rope_scaling_factor = saved.get("rope_scaling_factor") or 0.0
    models = [("M_0", cfg.model.path, None, 0)]
    for p, r in runs.items():
        for s in r["stages"]:
            models.append((f"{p}/M_{s['stage'] + 1}", s["checkpoint"], p, s["stage"] + 1))
    landscape_pos = None
    results: dict[str, dict] = {}
    for name, src, _, _ in tqdm(models, desc="report: models"):
        t0 = time.time()
        lm = megatron_language_model(cfg, src)
        tok = lm.tokenizer
        roots = [encode(tok, docs[r])[: cfg.screening.screen_length] for r in held]
        ents = [h for h, _ in root_entropies(lm, roots, lm.ctx_id, lm.eos_id, 8)]
        if landscape_pos is None:  # M_0 fixes the positions
            landscape_pos = [
                select_positions(h, "percentile", LANDSCAPE_PERCENTILE, 2.0, 1 << 30) for h in ents
            ]
        res = {
            "source": src,
            "landscape": [float(h[pos].mean()) for h, pos in zip(ents, landscape_pos)],
            "landscape_values": [
                round(float(v), 4) for h, pos in zip(ents, landscape_pos) for v in h[pos]
            ],
            "probes": evaluate(lm, lengths, n=n_niah, tasks=("niah_single", "niah_multikey")),
        }
        if has_gt:  # the probes depend on the tokenizer only: built once for all models
            key = (getattr(tok, "name_or_path", None), len(tok), lm.ctx_id)
            if key not in planted:
                planted[key] = planted_probes(tok, lm.ctx_id, corpus_dir, held, lengths)
            res["probes"]["planted"] = evaluate_planted(
                lm, corpus_dir, held, lengths, probes=planted[key]
            )
        # Fig. 3: this model's loss on the stage data it is compared on
        res["stage_loss"] = {}
        for p, r in runs.items():
            for s in r["stages"]:
                t = s["stage"]
                mine = name == "M_0" and t >= 1 or name == f"{p}/M_{t}"
                if mine:
                    res["stage_loss"][f"{p}/stage_{t}"] = sequence_loss(lm, seqs_of(s["stage_dir"]))
        res["seconds"] = round(time.time() - t0, 1)
        results[name] = res
        del lm
        log.info("report: %s evaluated in %.1fs", name, res["seconds"])

    report = {"lengths": lengths, "heldout_roots": held, "models": results, "runs": {}}
    for p, r in runs.items():
        rows = []
        for s in r["stages"]:
            t = s["stage"]
            row = dict(s)
            key = f"{p}/stage_{t}"
            if t >= 1:
                l0 = results["M_0"]["stage_loss"][key]
                lt = results[f"{p}/M_{t}"]["stage_loss"][key]
                row["difficulty"] = {"loss_M0": l0, "loss_Mt": lt, "gap": l0 - lt}
            m = results[f"{p}/M_{t + 1}"]
            row["after"] = {
                "landscape_mean": float(np.mean(m["landscape"])),
                "probes": m["probes"],
            }
            rows.append(row)
        report["runs"][p] = {"dir": r["dir"], "stages": rows}
        os.makedirs(os.path.join(r["dir"], "report"), exist_ok=True)
        with open(os.path.join(r["dir"], "report", "report.json"), "w") as f:
            json.dump({"lengths": lengths, "heldout_roots": held, **report["runs"][p]}, f, indent=2)
    report["M_0"] = {
        "landscape_mean": float(np.mean(results["M_0"]["landscape"])),
        "probes": results["M_0"]["probes"],
    }
    out_dir = out_dir or os.path.join(cfg.workdir, "report")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json.tmp"), "w") as f:
        json.dump(report, f, indent=2)
    os.replace(os.path.join(out_dir, "report.json.tmp"), os.path.join(out_dir, "report.json"))
    report["plots"] = plot_report(report, out_dir)
    for p, r in report["runs"].items():  # each run's own folder: its numbers and plots
        plot_report({**report, "runs": {p: r}}, os.path.join(r["dir"], "report"))
    return report


def summarize_report(rep: dict) -> dict:
    """The numbers a person reads first: per run and stage, difficulty gap, landscape mean,
    probe accuracy at the longest length."""
    longest = str(max(rep["lengths"]))
    out = {"M_0": {"landscape_mean": round(rep["M_0"]["landscape_mean"], 4)}}
    out["M_0"]["accuracy_at_longest"] = {
        t: round(v[int(longest)]["accuracy"], 3) for t, v in rep["M_0"]["probes"].items()
    }
    for p, r in rep["runs"].items():
        out[p] = []
        for s in r["stages"]:
            out[p].append(
                {
                    "stage": s["stage"],
                    "difficulty_gap": round(s["difficulty"]["gap"], 4)
                    if "difficulty" in s
                    else None,
                    "landscape_mean_after": round(s["after"]["landscape_mean"], 4),
                    "accuracy_at_longest_after": {
                        t: round(v[int(longest)]["accuracy"], 3)
                        for t, v in s["after"]["probes"].items()
                    },
                    "final_train_loss": s["train_loss"][-1] if s["train_loss"] else None,
                }
            )
    return out


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_report(report: dict, out_dir: str) -> list[str]:
    """landscape.png (Fig. 2a), difficulty.png (Fig. 3), probes.png, train_loss.png,
    screening.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    models = report["models"]
    paths = []

    # Fig. 2a: entropy at M_0's high-entropy positions, per model
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, (p, r) in zip(axes[0], runs.items()):
        series = [("M_0", models["M_0"]["landscape_values"])]
        series += [
            (f"M_{s['stage'] + 1}", models[f"{p}/M_{s['stage'] + 1}"]["landscape_values"])
            for s in r["stages"]
        ]
        hi = max(max(v) for _, v in series if v) if series else 1.0
        bins = np.linspace(0, hi, 30)
        for label, v in series:
            ax.hist(v, bins=bins, histtype="step", lw=1.5, label=f"{label} (mean {np.mean(v):.2f})")
        ax.set_title(f"{p}: entropy at M_0's top-{LANDSCAPE_PERCENTILE:g}% positions")
        ax.set_xlabel("entropy (nats)")
        ax.set_ylabel("positions")
        ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir, "landscape.png"))

    # Fig. 3: Loss(M_0) - Loss(M_t) on stage-t data
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    width = 0.8 / max(len(runs), 1)
    for i, (p, r) in enumerate(runs.items()):
        xs = [s["stage"] for s in r["stages"] if "difficulty" in s]
        ys = [s["difficulty"]["gap"] for s in r["stages"] if "difficulty" in s]
        b = ax.bar(np.array(xs) + i * width, ys, width, label=p)
        ax.bar_label(b, fmt="%+.3f", fontsize=7)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("stage t (data built by M_t)")
    ax.set_ylabel("Loss(M_0) − Loss(M_t)")
    ax.set_title("data difficulty (paper Fig. 3)")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir, "difficulty.png"))

    # probes: accuracy per length (shaded: 95% interval), M_0 and each run's final model
    tasks = list(models["M_0"]["probes"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    finals = [("M_0", models["M_0"])] + [
        (f"{p}/M_{r['stages'][-1]['stage'] + 1}", models[f"{p}/M_{r['stages'][-1]['stage'] + 1}"])
        for p, r in runs.items()
        if r["stages"]
    ]
    for ax, task in zip(axes[0], tasks):
        for label, m in finals:
            per = m["probes"][task]
            xs = sorted(per, key=int)
            line = ax.plot(
                [int(x) for x in xs], [per[x]["accuracy"] for x in xs], marker="o", label=label
            )[0]
            if all("ci95" in per[x] for x in xs):  # 95% Wilson interval of each cell
                lo, hi = zip(*(per[x]["ci95"] for x in xs))
                ax.fill_between([int(x) for x in xs], lo, hi, color=line.get_color(), alpha=0.12)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(task)
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel("top-1 accuracy")
        ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir, "probes.png"))

    # training loss over the whole loop
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for p, r in runs.items():
        ys = [x for s in r["stages"] for x in s["train_loss"]]
        ax.plot(range(1, len(ys) + 1), ys, label=p)
    ax.set_xlabel("training step (all stages)")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir, "train_loss.png"))

    # screening statistics per stage
    keys = ("mean_selected_entropy", "mean_positives_per_sequence", "mean_delta_h")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for p, r in runs.items():
            ys = [s["screening"].get(k) for s in r["stages"]]
            ax.plot(
                [s["stage"] for s in r["stages"]],
                [y if y is not None else np.nan for y in ys],
                marker="o",
                label=p,
            )
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("stage")
        ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir, "screening.png"))
    return paths
