"""``lookup``: one of K same-attribute facts in a filler haystack, queried by its entity."""

from __future__ import annotations

import numpy as np

from policylong import synthetic as syn

from .haystack import arrange, depths, ntok, question
from .records import Family, TaskRecord, exact_match

LOOKUP_KEYS = 4
"""Facts per lookup prompt (one queried, the rest same-attribute distractors; RULER's 4)."""


def lookup_record(
    i: int,
    tok,
    lang: syn.Language,
    length: int,
    rng: np.random.Generator,
    depth: float | None = None,
) -> TaskRecord:
    """One ``lookup`` prompt of about ``length`` tokens (haystack, K facts, the question).

    ``depth`` (a fraction of the context's tokens) places the queried fact; ``None`` puts every
    fact in a random slot between filler sentences, and ``meta["depth"]`` then counts filler
    sentences: that layout is part of the bytes of generated task files, which a run's
    fingerprint holds, so it stays as it is.
    """
    attr = "code"
    idx = rng.choice(len(lang.entities), size=LOOKUP_KEYS, replace=False)
    ents = [lang.entities[int(j)] for j in idx]
    vals = [lang.values[attr][int(rng.integers(len(lang.values[attr])))] for _ in ents]
    facts = [syn.fact_sentence(attr, e, v) for e, v in zip(ents, vals)]
    q = int(rng.integers(LOOKUP_KEYS))
    ask = question(attr, ents[q])
    budget = length - ntok(tok, ask) - sum(ntok(tok, f) for f in facts)
    hay: list[str] = []
    used = 0
    while used < budget:
        s = syn._fill(syn.FILLER[int(rng.integers(len(syn.FILLER)))], rng)
        hay.append(s)
        used += ntok(tok, s)
    slots = sorted(int(rng.integers(0, len(hay) + 1)) for _ in facts)
    order = [int(j) for j in rng.permutation(LOOKUP_KEYS)]
    meta = {"length": length, "keys": LOOKUP_KEYS}
    if depth is not None:
        # the other facts keep their drawn slots, as fractions of the haystack
        want = [0.0] * LOOKUP_KEYS
        for s, k in zip(slots, order):
            want[k] = s / max(len(hay), 1)
        want[q] = float(depth)
        woven = arrange(tok, hay, facts, want)
        prompt = " ".join(woven.sentences + [ask])
        meta["depth"] = depths(tok, woven.sentences, [woven.at[q]])[0]
        return TaskRecord(f"lookup-{i:06d}", "lookup", prompt, vals[q], meta)
    parts, k = [], 0
    at = 0.0
    for pos in range(len(hay) + 1):
        while k < len(facts) and slots[k] == pos:
            if order[k] == q:
                at = pos / max(len(hay), 1)
            parts.append(facts[order[k]])
            k += 1
        if pos < len(hay):
            parts.append(hay[pos])
    prompt = " ".join(parts + [ask])
    meta["depth"] = round(at, 4)
    return TaskRecord(f"lookup-{i:06d}", "lookup", prompt, vals[q], meta)


def verify_lookup(response: str, rec: TaskRecord) -> float:
    """Exact match of the response's first sentence with the value (normalised)."""
    return exact_match(response, rec.answer)


LOOKUP = Family("lookup", verify_lookup, (".",))
