"""Task accuracy of a policy: greedy responses to held-out task records, scored by the
families' verifiers, per family and prompt length (``policylong eval-tasks``).

Greedy decoding (the arg max at every step, KV-cached through ``megatron_ext.generate``) makes
the score a property of the model, not of a sampling seed; the prompts are generated with a
seed of their own, so they are not the prompts any run trained on when that seed differs from
the run's.

Retention (what post-training must not cost): NIAH-single top-1 at a short length (the embedded
probes of ``policylong.evaluation``) and the language-model loss on held-out short documents
(``evaluation.heldout_loss``).
"""

from __future__ import annotations

import json
import logging
import os

from policylong.config import Config
from policylong.corpus import eos_id
from policylong.evaluation import evaluate, heldout_documents, heldout_loss
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


def retention(lm, n: int, seed: int, length: int = 128, heldout: str | None = None) -> dict:
    """Short-context ability of ``lm``: ``{"niah_single": {length, accuracy, n},
    "heldout_loss": {loss, documents, tokens}}`` on ``n`` probes and ``n`` documents."""
    niah = evaluate(lm, [length], n=n, tasks=("niah_single",), seed=seed)["niah_single"][length]
    docs = heldout_documents(lm.tokenizer, n, seed, heldout, max_tokens=lm.max_length - 1)
    return {
        "niah_single": {"length": length, "accuracy": niah["accuracy"], "n": niah["n"]},
        "heldout_loss": heldout_loss(lm, docs),
    }


def evaluate_tasks(
    cfg: Config, models: list[str], families: list[str], lengths: list[int], n: int, seed: int,
    max_new: int, retention_n: int = 0, retention_length: int = 128, heldout: str | None = None,
) -> dict:  # fmt: skip
    """Accuracy of each model (HF folder, checkpoint or ``CKPT@N``) on ``n`` generated records
    per family and length, and with ``retention_n > 0`` its retention:
    ``{model: {"tasks": {length: {family: {accuracy, n}}}, "retention": {...}}}``."""
    res: dict = {}
    for src in models:
        lm = megatron_language_model(cfg, src)
        per: dict = {}
        for length in lengths:
            recs = generate_tasks(families, n * len(families), length, seed, lm.tokenizer)
            per[str(length)] = task_accuracy(lm, recs, max_new)
            cells = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in per[str(length)].items())
            log.info("%s @ %d tokens: %s", src, length, cells)
        res[src] = {"tasks": per}
        if retention_n > 0:
            r = retention(lm, retention_n, seed, retention_length, heldout)
            res[src]["retention"] = r
            log.info(
                "%s retention: niah_single@%d %.3f, held-out loss %.4f nats/token",
                src, retention_length, r["niah_single"]["accuracy"], r["heldout_loss"]["loss"],
            )  # fmt: skip
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
    for src, r in res.items():
        per = r["tasks"]
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
