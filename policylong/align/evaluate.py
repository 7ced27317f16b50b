"""Task accuracy of a policy: greedy responses to held-out task records, scored by the
families' verifiers, per family and prompt length (``policylong eval-tasks``).

Greedy decoding (the arg max at every step, KV-cached through ``megatron_ext.generate``) makes
the score a property of the model, not of a sampling seed; the prompts are generated with a
seed of their own, so they are not the prompts any run trained on when that seed differs from
the run's.
"""

from __future__ import annotations

import json
import logging
import os

from policylong.config import Config
from policylong.corpus import eos_id
from policylong.megatron_ext.generate import sample
from policylong.megatron_ext.lm import megatron_language_model
from policylong.tasks import generate_tasks, reward

from .rollout import prompt_ids, stop_ids

log = logging.getLogger("policylong.align")


def task_accuracy(lm, records, max_new: int) -> dict:
    """Mean greedy reward of ``lm`` (a ``MegatronLanguageModel``) on ``records``, per family:
    ``{family: {"accuracy": mean reward, "n": count}}``; collective over its model-parallel
    group."""
    tok = lm.tokenizer
    stops = stop_ids(tok, {r.task for r in records}) | {eos_id(tok)}
    window = lm.max_length
    out: dict[str, list[float]] = {}
    for rec in records:
        ids = prompt_ids(tok, rec, window, max_new)
        s = sample(lm.model, ids, 1, max_new, 0.0, 0, stops, lm.vocab_size)
        text = tok.decode(s.tokens[0], skip_special_tokens=True)
        out.setdefault(rec.task, []).append(reward(rec, text))
    return {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in out.items()}


def evaluate_tasks(
    cfg: Config, models: list[str], families: list[str], lengths: list[int], n: int, seed: int,
    max_new: int,
) -> dict:  # fmt: skip
    """Accuracy of each model (HF folder, checkpoint or ``CKPT@N``) on ``n`` generated records
    per family and length: ``{model: {length: {family: {accuracy, n}}}}``."""
    res: dict = {}
    for src in models:
        lm = megatron_language_model(cfg, src)
        per: dict = {}
        for length in lengths:
            recs = generate_tasks(families, n * len(families), length, seed, lm.tokenizer)
            per[str(length)] = task_accuracy(lm, recs, max_new)
            cells = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in per[str(length)].items())
            log.info("%s @ %d tokens: %s", src, length, cells)
        res[src] = per
    return res


def write_eval(res: dict, out: str) -> str:
    """``out/tasks_eval.json`` (beside, then renamed); returns its path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "tasks_eval.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def plot_eval(res: dict, path: str) -> str:
    """Greedy accuracy per prompt length, one line per (model, family), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for src, per in res.items():
        lengths = sorted(per, key=int)
        for fam in sorted({f for v in per.values() for f in v}):
            ys = [per[L][fam]["accuracy"] for L in lengths]
            ax.plot(
                [int(L) for L in lengths], ys, marker="o", label=f"{os.path.basename(src)} {fam}"
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("greedy accuracy (mean reward)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
