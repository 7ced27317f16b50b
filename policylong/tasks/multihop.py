"""``multihop``: a variable-tracking chain of one attribute spread over a filler haystack.

``the A of E0 is V .`` then, later and in order, ``the A of E1 is the A of E0 .`` up to
``E_hops``; the question asks E_hops's A. Distractors: decoy chains of other entities (as many
links, ending in another value, so that being linked to does not single out the answer),
other attributes of the chain's entities, and facts of other entities.
"""

from __future__ import annotations

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
    link_sentence,
    ntok,
    question,
    weave,
)
from .records import Family, TaskRecord, exact_match

MULTIHOP_HOPS = 2
"""Links after the value fact (E0 = V, E1 = E0, E2 = E1: RULER's variable tracking)."""


def _chain_targets(rng: np.random.Generator, n: int, first: float | None) -> list[float]:
    """Ascending depths of an n-sentence chain; ``first`` fixes the first one."""
    if first is None:
        return sorted(float(x) for x in rng.random(n))
    rest = sorted(float(first + (1.0 - first) * x) for x in rng.random(n - 1))
    return [float(first)] + rest


def multihop_record(
    i: int,
    tok,
    lang: syn.Language,
    length: int,
    rng: np.random.Generator,
    depth: float | None = None,
    hops: int = MULTIHOP_HOPS,
    density: float = DISTRACTORS_PER_1K,
) -> TaskRecord:
    """One ``multihop`` prompt of about ``length`` tokens.

    ``depth`` places the value fact (the evidence farthest from the question; the links follow
    it at random depths); ``None`` draws every depth. ``density``: distractors per 1,000
    tokens (half of them decoy chains).
    """
    attrs = list(syn.ATTRIBUTES)
    attr = attrs[int(rng.integers(len(attrs)))]
    taken_e: set[str] = set()
    taken_v: set[str] = set()
    chain = draw_entities(rng, lang, hops + 1, taken_e)
    value = draw_value(rng, lang, attr, taken_v)
    needles = [syn.fact_sentence(attr, chain[0], value)]
    needles += [link_sentence(attr, chain[k + 1], chain[k]) for k in range(hops)]
    targets: list[float | None] = list(_chain_targets(rng, hops + 1, depth))
    stated = {e: {attr} for e in chain}
    planted = distractors(
        rng, lang, distractor_count(length, density), [attr], stated, taken_e, taken_v
    )
    kinds = []
    for d in planted:
        needles.append(d.sentence())
        if d.kind != "other_entity":
            targets.append(None)
            kinds.append(d.kind)
            continue
        links = draw_entities(rng, lang, hops, taken_e)
        path = [d.entity] + links
        needles += [link_sentence(attr, path[k + 1], path[k]) for k in range(hops)]
        targets += _chain_targets(rng, hops + 1, None)
        kinds.append("other_chain")
    ask = question(attr, chain[-1])
    budget = length - ntok(tok, ask) - sum(ntok(tok, n) for n in needles)
    woven = weave(tok, rng, budget, needles, targets)
    prompt = " ".join(woven.sentences + [ask])
    where = depths(tok, woven.sentences, woven.at[: hops + 1])
    meta = {
        "length": length,
        "tokens": count_tokens(tok, prompt),
        "depth": where[0],
        "depths": where,
        "hops": hops,
        "attribute": attr,
        "distractors": {k: kinds.count(k) for k in sorted(set(kinds))},
    }
    return TaskRecord(f"multihop-{i:06d}", "multihop", prompt, value, meta)


def verify_multihop(response: str, rec: TaskRecord) -> float:
    """Exact match of the response's first sentence with the value (normalised)."""
    return exact_match(response, rec.answer)


MULTIHOP = Family("multihop", verify_multihop, STOP)
