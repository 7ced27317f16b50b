"""``grounding``: a fact asked over numbered passages, answered with the value and a citation.

The context is P passages ``[1] ...`` to ``[P] ...`` (one per line) cut from a filler haystack
that holds the evidence and distractors; the question asks the A of E. The answer is
``V [k]``, k the passage stating ``the A of E is V``; for a fraction of the records
(``ABSENT_FRACTION``) no passage states E's A (other attributes of E do) and the answer is
``not stated``.
"""

from __future__ import annotations

import re

import numpy as np

from policylong import synthetic as syn

from .haystack import (
    DISTRACTORS_PER_1K,
    STOP,
    count_tokens,
    depths,
    distractor_count,
    distractors,
    draw_entities,
    draw_value,
    kind_counts,
    ntok,
    question,
    weave,
)
from .records import Family, TaskRecord, first_sentence, normalize_answer

ABSENT_FRACTION = 0.25
"""Probability that a record asks a fact no passage states (answer ``NOT_STATED``)."""

NOT_STATED = "not stated"
"""The answer when no passage states the asked fact."""

INSTRUCTION = (
    "answer with the value and the number of its passage in brackets , "
    f"or with {NOT_STATED} if no passage gives it ."
)
"""Said before the question: the answer format is not guessable from the cloze alone."""

_CITATION = re.compile(r"\[\s*(\d+)\s*\]")


def passage_count(length: int) -> int:
    """Passages of a ``length``-token prompt: one per 128 tokens, from 3 to 16."""
    return min(16, max(3, length // 128))


def split_citations(text: str) -> tuple[str, frozenset[int]]:
    """``text`` without its ``[k]`` citations, and the cited passage numbers."""
    cites = frozenset(int(m) for m in _CITATION.findall(text))
    return _CITATION.sub(" ", text), cites


def _cut(tok, sentences: list[str], p: int) -> list[int]:
    """Start indices of ``p`` passages of about equal tokens, cut between sentences."""
    p = max(1, min(p, len(sentences)))
    sizes = [ntok(tok, s) for s in sentences]
    total = sum(sizes)
    starts, used, k = [0], 0, 1
    for j, n in enumerate(sizes[:-1]):
        used += n
        # a cut once the tokens so far reach the next k/p, leaving a sentence per passage left
        if k < p and used >= k * total / p and len(sentences) - (j + 1) >= p - k:
            starts.append(j + 1)
            k += 1
    while len(starts) < p:  # too few tokens early: the last passages take one sentence each
        starts.append(len(sentences) - (p - len(starts)))
    return starts


def grounding_record(
    i: int,
    tok,
    lang: syn.Language,
    length: int,
    rng: np.random.Generator,
    depth: float | None = None,
    passages: int | None = None,
    density: float = DISTRACTORS_PER_1K,
    absent_fraction: float = ABSENT_FRACTION,
) -> TaskRecord:
    """One ``grounding`` prompt of about ``length`` tokens.

    ``depth`` places the evidence (for an absent fact, the first distractor about the asked
    entity); ``None`` draws it. ``passages``: P (default ``passage_count(length)``).
    ``density``: distractors per 1,000 tokens, alternating another attribute of the asked
    entity and the asked attribute of another entity.
    """
    attrs = list(syn.ATTRIBUTES)
    attr = attrs[int(rng.integers(len(attrs)))]
    taken_e: set[str] = set()
    taken_v: set[str] = set()
    (ent,) = draw_entities(rng, lang, 1, taken_e)
    value = draw_value(rng, lang, attr, taken_v)
    absent = bool(rng.random() < absent_fraction)
    n = distractor_count(length, density)
    planted = distractors(
        rng,
        lang,
        max(n, 1) if absent else n,  # an absent fact needs a same-entity trap
        [attr],
        {ent: {attr}},
        taken_e,
        taken_v,
        kinds=("other_attribute", "other_entity"),
    )
    needles = [d.sentence() for d in planted]
    targets: list[float | None] = [None] * len(needles)
    if absent:
        targets[0] = depth
    else:
        needles.insert(0, syn.fact_sentence(attr, ent, value))
        targets.insert(0, depth)
    p = passages or passage_count(length)
    ask = INSTRUCTION + " " + question(attr, ent)
    labels = sum(ntok(tok, f"[{k}]") for k in range(1, p + 1))
    budget = length - ntok(tok, ask) - labels - sum(ntok(tok, s) for s in needles)
    woven = weave(tok, rng, budget, needles, targets)
    starts = _cut(tok, woven.sentences, p)
    bounds = starts + [len(woven.sentences)]
    lines = [
        f"[{k + 1}] " + " ".join(woven.sentences[bounds[k] : bounds[k + 1]])
        for k in range(len(starts))
    ]
    prompt = "\n".join(lines + [ask])
    label_tokens = {s: ntok(tok, f"[{k + 1}]") for k, s in enumerate(starts)}
    evidence = woven.at[0]
    cited = max(k for k, s in enumerate(starts) if s <= evidence) + 1
    meta = {
        "length": length,
        "tokens": count_tokens(tok, prompt),
        "depth": depths(tok, woven.sentences, [evidence], label_tokens)[0],
        "absent": absent,
        "passage": None if absent else cited,
        "passages": len(starts),
        "attribute": attr,
        "distractors": kind_counts(planted),
    }
    answer = NOT_STATED if absent else f"{value} [{cited}]"
    return TaskRecord(f"grounding-{i:06d}", "grounding", prompt, answer, meta)


def verify_grounding(response: str, rec: TaskRecord) -> float:
    """Scores the response's first sentence: the asked fact absent, 1 for ``not stated``
    (citations ignored) and 0 otherwise; present, 0.5 for the value (the sentence less its
    citations, normalised) plus 0.5 when the citations are exactly the supporting passage."""
    want, want_cites = split_citations(rec.answer)
    got, got_cites = split_citations(first_sentence(response))
    if normalize_answer(want) == NOT_STATED:
        return float(normalize_answer(got) == NOT_STATED)
    value = normalize_answer(got) == normalize_answer(want)
    return 0.5 * value + 0.5 * (got_cites == want_cites)


GROUNDING = Family("grounding", verify_grounding, STOP, ("[1]", NOT_STATED))
