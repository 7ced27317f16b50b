"""Synthetic long-context probes, scored by the model at configurable lengths.

RULER-style needle-in-a-haystack tasks written in the synthetic language of
``policylong.synthetic`` (so the embedded model and any model trained on the demo corpus can be
probed offline), plus planted-dependency recall. A probe is a token sequence and the positions
whose next token is a planted value; it is scored by whether the value is the model's top-1
prediction there and by its NLL. Every task also runs a control: the same probes with the
needles replaced by filler of the same length, so the score of "knowing the answer without
the context" is measured, not assumed.

Tasks:
  niah_single      one fact ``the access code of E is V`` at a random depth; query E's code.
  niah_multikey    four facts with the same attribute for four entities; query one of them.
  niah_multivalue  four facts about one entity (code, city, pet, locker); query each value.
  niah_multiquery  four facts for four entities; query all four in turn.
  planted          planted-dependency recall on held-out root documents of a synthetic corpus:
                   the root at the end, its defining passages at random depths among corpus
                   passages that fill the probe to its length; each use of a fact in the root
                   (``... the access code of E is V``) is scored at V. This is the dependency
                   the training data teaches, at a distance set by the length.
  variable_tracking  RULER's VT in the synthetic language: ``the access code of E1 is V``, then
                   ``the access code of E2 is the access code of E1`` (VT_HOPS assignments, in
                   order, at random depths); query E3's code. Scored at the one value token
                   (RULER asks for every variable holding V; here the last one is queried).

Short-context retention beside the probes: ``heldout_loss``, the language-model loss (nats per
token) on held-out short documents, by default texts of the embedded base model's own
pretraining distribution (``synthetic.training_text``, ≤ 360 words) drawn from a seed stream
that pretraining never used.

Scores come from the ``LanguageModel`` protocol only (``final_hidden`` + ``head_weight``), via
``kernels.fused_linear_stats`` (vocab-parallel): top-1 means the target's logit equals the
maximum over the (possibly TP-sharded) vocabulary; full logits are never built.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from policylong import synthetic as syn
from policylong.corpus import CorpusError, encode, eos_id, read_documents
from policylong.errors import ConfigError
from policylong.kernels import fused_linear_stats
from policylong.screening.entropy import gather_rows, root_entropies
from policylong.synthetic import read_ground_truth

TASKS = (
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
)
VT_HOPS = 2
"""Assignments after the value in a variable-tracking chain (E1 = V, E2 = E1, E3 = E2)."""
NEEDLES = 4
"""Facts per multi-needle probe (RULER uses 4 keys / values / queries by default)."""


@dataclass
class Probe:
    tokens: list[int]
    """The whole sequence: context token, haystack with needles, then the queries."""
    targets: list[tuple[int, int]]
    """(row, value id): the hidden state at ``row`` predicts ``value id``."""


def _haystack(rng, tok, n_tokens: int) -> list[list[int]]:
    """Filler sentences (token lists) until ``n_tokens``."""
    out, total = [], 0
    while total < n_tokens:
        s = encode(tok, syn._fill(syn.FILLER[int(rng.integers(len(syn.FILLER)))], rng))
        out.append(s)
        total += len(s)
    return out


def _query(tok, attribute: str, entity: str) -> list[int]:
    """``later E told us that the <attribute> of E is`` (the value follows)."""
    words = syn.use_sentence(attribute, entity, "@@").split()
    return encode(tok, " ".join(words[: words.index("@@")]))


def build_probe(
    task: str, tok, lang: syn.Language, length: int, rng, ctx_id: int, control: bool = False
) -> Probe:
    """One probe of about ``length`` tokens. With ``control`` the needles are replaced by
    filler of the same length (the queries stay)."""
    if task not in TASKS:
        raise ConfigError(f"evaluation task {task!r}: one of {TASKS}")
    attrs = list(syn.ATTRIBUTES)
    if task == "variable_tracking":
        idx = rng.choice(len(lang.entities), size=VT_HOPS + 1, replace=False)
        ents = [lang.entities[int(i)] for i in idx]
        v = lang.values[attrs[0]][int(rng.integers(len(lang.values[attrs[0]])))]
        ref = syn.fact_sentence(attrs[0], "{E}", "@@").split("@@")[0].strip()  # "... of {E} is"
        chain = [syn.fact_sentence(attrs[0], ents[0], v)] + [
            ref.replace("{E}", ents[k + 1])
            + " "
            + ref[: ref.rindex(" is")].replace("{E}", ents[k])
            + " ."
            for k in range(VT_HOPS)
        ]
        needles = [encode(tok, c) for c in chain]
        qtoks = [(_query(tok, attrs[0], ents[-1]), encode(tok, v))]
        return _assemble(tok, needles, qtoks, length, rng, ctx_id, control)
    if task == "niah_single":
        ents = [lang.entities[int(rng.integers(len(lang.entities)))]]
        facts = [(attrs[0], ents[0])]
        queries = [0]
    elif task == "niah_multivalue":
        e = lang.entities[int(rng.integers(len(lang.entities)))]
        facts = [(a, e) for a in attrs[:NEEDLES]]
        queries = list(range(len(facts)))
    else:
        idx = rng.choice(len(lang.entities), size=NEEDLES, replace=False)
        facts = [(attrs[0], lang.entities[int(i)]) for i in idx]
        queries = [int(rng.integers(NEEDLES))] if task == "niah_multikey" else list(range(NEEDLES))
    values = [lang.values[a][int(rng.integers(len(lang.values[a])))] for a, _ in facts]
    needles = [encode(tok, syn.fact_sentence(a, e, v)) for (a, e), v in zip(facts, values)]
    qtoks = [(_query(tok, facts[q][0], facts[q][1]), encode(tok, values[q])) for q in queries]
    return _assemble(tok, needles, qtoks, length, rng, ctx_id, control)


def _assemble(tok, needles, qtoks, length, rng, ctx_id, control) -> Probe:
    """Haystack of about ``length`` tokens with ``needles`` at random depths (in order), then
    the queries; ``control`` replaces each needle by filler of its length."""
    q_len = sum(len(q) + len(v) + 1 for q, v in qtoks)
    budget = max(length - 1 - q_len - sum(map(len, needles)), 8)
    hay = _haystack(rng, tok, budget)
    # needles at random depths in [10%, 90%] of the haystack, in random order
    slots = sorted(
        int(rng.integers(len(hay) // 10, max(len(hay) * 9 // 10, len(hay) // 10 + 1)))
        for _ in needles
    )
    seq = [ctx_id]
    k = 0
    for i, s in enumerate(hay):
        while k < len(needles) and slots[k] == i:
            n = needles[k]
            if control:  # same length, no information
                n = encode(tok, syn.filler_passage(rng, 3))[: len(n)]
            seq += n
            k += 1
        seq += s
    for n in needles[k:]:
        seq += n
    targets = []
    dot = encode(tok, ".")
    for q, v in qtoks:
        seq += q
        targets.append((len(seq) - 1, v[0]))  # the value is one word-level token
        seq += v + dot
    return Probe(seq, targets)


@torch.no_grad()
def score_probes(lm, probes: list[Probe], batch_size: int = 4) -> dict:
    """Top-1 accuracy and mean NLL of the planted values (vocab-parallel, no full logits)."""
    seqs = [p.tokens for p in probes]
    rows = [torch.tensor([r for r, _ in p.targets]) for p in probes]
    pad = getattr(lm, "eos_id", 0)
    hidden = gather_rows(lm, seqs, rows, pad, batch_size)
    w = lm.head_weight()
    tgt = torch.tensor([t for p in probes for _, t in p.targets], device=hidden.device)
    hidden = hidden.to(w.dtype)
    st = fused_linear_stats(hidden, w, tgt, lm.tp_group)
    nll = st.nll.cpu()
    top1 = (st.target_logit >= st.max_logit - 1e-6 * st.max_logit.abs().clamp_min(1.0)).cpu()
    return {
        "accuracy": float(top1.float().mean()),
        "ci95": wilson(int(top1.sum()), int(tgt.numel())),
        "nll": float(nll.mean()),
        "n": int(tgt.numel()),
    }


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion k/n (``[0, 1]`` for n = 0): at the demo's
    12 probes per cell a 0.67 is [0.39, 0.86], so a 0.1 difference is not resolvable there."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, mid - half), 4), round(min(1.0, mid + half), 4)]


def build_planted_probe(
    tok,
    root_text: str,
    facts: list[dict],
    passages: dict[str, str],
    length: int,
    rng,
    ctx_id: int,
    control: bool = False,
) -> Probe:
    """The root document at the end of about ``length`` tokens; before it, in random order,
    its facts' defining passages (``control``: left out) and passages drawn from ``passages``
    that are none of the root's (neither its facts nor their distractors)."""
    root = encode(tok, root_text)
    sep = [eos_id(tok)]  # every chunk closed by EOS, as training sequences are (assemble)
    own = {f[k] for f in facts for k in ("passage", "different_entity", "wrong_value")}
    pool = sorted(k for k in passages if k not in own)
    chunks = [] if control else [encode(tok, passages[f["passage"]]) + sep for f in facts]
    budget = length - 1 - len(root) - sum(map(len, chunks))
    for i in rng.permutation(len(pool)):
        if budget <= 0:
            break
        c = (encode(tok, passages[pool[int(i)]]) + sep)[:budget]
        chunks.append(c)
        budget -= len(c)
    order = rng.permutation(len(chunks))
    seq = [ctx_id] + [t for i in order for t in chunks[int(i)]]
    off = len(seq)
    seq += root
    targets = []
    for f in facts:
        use = _query(tok, f["attribute"], f["entity"]) + encode(tok, f["value"])[:1]
        for j in range(len(root) - len(use) + 1):
            if root[j : j + len(use)] == use:
                targets.append((off + j + len(use) - 2, use[-1]))
                break
        else:
            raise ValueError(f"root {root_text[:40]!r}...: no use of the fact {f}")
    return Probe(seq, targets)


def planted_probes(
    tok, ctx: int, corpus_dir: str, root_ids: list[str], lengths: list[int], seed: int = 0
) -> dict[int, tuple[list[Probe], list[Probe]]]:
    """``{length: (probes, controls)}`` of the planted-dependency probe over ``root_ids`` of
    the synthetic corpus in ``corpus_dir`` (docs.jsonl, passages.jsonl, ground_truth.jsonl);
    they depend on the tokenizer, not the model, so one set serves every model of a report."""

    docs = {d.id: d.text for d in read_documents(os.path.join(corpus_dir, "docs.jsonl"))}
    passages = {d.id: d.text for d in read_documents(os.path.join(corpus_dir, "passages.jsonl"))}
    gt = {
        r: o["facts"]
        for r, o in read_ground_truth(os.path.join(corpus_dir, "ground_truth.jsonl")).items()
    }
    missing = [r for r in root_ids if r not in gt or r not in docs]
    if missing:
        raise CorpusError(f"{corpus_dir}: no root document / ground truth for {missing[:5]}")
    out = {}
    for length in lengths:

        def gen(i, r, control, _l=length):
            rng = np.random.default_rng([seed, 99, _l, i])
            return build_planted_probe(tok, docs[r], gt[r], passages, _l, rng, ctx, control)

        out[int(length)] = (
            [gen(i, r, False) for i, r in enumerate(root_ids)],
            [gen(i, r, True) for i, r in enumerate(root_ids)],
        )
    return out


def evaluate_planted(
    lm,
    corpus_dir: str,
    root_ids: list[str],
    lengths: list[int],
    seed: int = 0,
    batch_size: int = 4,
    probes: dict[int, tuple[list[Probe], list[Probe]]] | None = None,
) -> dict:
    """``{length: {"accuracy", "nll", "n", "control_accuracy", "control_nll", "tokens"}}`` of
    the planted-dependency probe over ``root_ids`` (held out from training) of the synthetic
    corpus in ``corpus_dir``; ``probes`` from :func:`planted_probes` skips building them."""
    if probes is None:
        tok = lm.tokenizer
        ctx = lm.ctx_id if hasattr(lm, "ctx_id") else int(tok.bos_token_id or tok.eos_token_id)
        probes = planted_probes(tok, ctx, corpus_dir, root_ids, lengths, seed)
    out = {}
    for length, (ps, ctrl) in probes.items():
        res = score_probes(lm, ps, batch_size)
        c = score_probes(lm, ctrl, batch_size)
        out[length] = {
            **res,
            "control_accuracy": c["accuracy"],
            "control_nll": c["nll"],
            "tokens": int(np.mean([len(p.tokens) for p in ps])),
        }
    return out


def evaluate(
    lm,
    lengths: list[int],
    n: int = 20,
    tasks: tuple[str, ...] = TASKS,
    seed: int = 0,
    batch_size: int = 4,
) -> dict:
    """``{task: {length: {"accuracy", "nll", "n", "control_accuracy", "control_nll"}}}``;
    the same seed gives the same probes for any model."""
    lang = syn.build_language()
    tok = lm.tokenizer
    ctx = lm.ctx_id if hasattr(lm, "ctx_id") else int(tok.bos_token_id or tok.eos_token_id)
    out: dict = {}
    for ti, task in enumerate(tasks):
        out[task] = {}
        for length in lengths:
            # one generator per probe: the control (needles replaced by filler) is built from
            # the same draws, so it has the same entities, values, haystack and depths
            def gen(i, control, _t=ti, _l=length, _task=task):
                rng = np.random.default_rng([seed, _t, _l, i])
                return build_probe(_task, tok, lang, _l, rng, ctx, control=control)

            probes = [gen(i, False) for i in range(n)]
            ctrl = [gen(i, True) for i in range(n)]
            r = score_probes(lm, probes, batch_size)
            c = score_probes(lm, ctrl, batch_size)
            out[task][int(length)] = {
                **r,
                "control_accuracy": c["accuracy"],
                "control_nll": c["nll"],
                "tokens": int(np.mean([len(p.tokens) for p in probes])),
            }
    return out


def plot(results: dict, path: str) -> str:
    """Accuracy per length and task (solid) with the no-needle control (dashed), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for task, per in results.items():
        xs = sorted(per)
        line = ax.plot(xs, [per[x]["accuracy"] for x in xs], marker="o", label=task)[0]
        ax.plot(xs, [per[x]["control_accuracy"] for x in xs], ls="--", color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("probe length (tokens)")
    ax.set_ylabel("top-1 accuracy of the planted value")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("synthetic long-context probes (dashed: needles removed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- short-context retention -------------------------------------------------------------------

HELDOUT_STREAM = 0x4C4D
"""Second word of the held-out documents' seed sequence ``[seed, HELDOUT_STREAM]``: the base
model's pretraining draws from ``default_rng(seed)`` (a one-word sequence), so no held-out text
is one it trained on."""


def heldout_documents(tok, n: int, seed: int = 0, path: str | None = None, max_tokens: int = 512):
    """``n`` short documents as token ids (each cut to ``max_tokens``): the first ``n`` of the
    corpus at ``path`` (any format ``corpus.read_documents`` reads) or, without one, fresh
    texts of the embedded base model's pretraining distribution."""
    if n <= 0:
        raise ConfigError(f"held-out documents: n = {n} must be > 0")
    if path is not None:
        docs = read_documents(path)[:n]
        texts = [d.text for d in docs]
    else:
        rng = np.random.default_rng([seed, HELDOUT_STREAM])
        lang = syn.build_language()
        texts = [syn.training_text(rng, lang) for _ in range(n)]
    out = [encode(tok, t)[:max_tokens] for t in texts]
    if any(len(ids) == 0 for ids in out):
        raise CorpusError(f"{path or 'held-out documents'}: a document has no tokens")
    return out


@torch.no_grad()
def heldout_loss(lm, docs: list[list[int]], batch_size: int = 4) -> dict:
    """Mean next-token NLL over every token of ``docs`` (each scored after the model's context
    token, as screening scores a root): ``{"loss": nats per token, "documents", "tokens"}``."""
    tok = lm.tokenizer
    ctx = lm.ctx_id if hasattr(lm, "ctx_id") else int(tok.bos_token_id or tok.eos_token_id)
    pad = getattr(lm, "eos_id", 0)
    per = root_entropies(lm, docs, ctx, pad, batch_size)
    nll = torch.cat([n.double() for _, n in per])
    return {"loss": float(nll.mean()), "documents": len(docs), "tokens": int(nll.numel())}
