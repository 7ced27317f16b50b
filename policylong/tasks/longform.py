"""``longform``: list every fact the context states about one entity.

The context states N (2 to 4) attributes of E among facts of other entities with the same
attributes; the question asks for all of E's values. The answer lists them in the order they
appear, separated by `` , ``. The reward is the set F1 of the listed values minus
``HALLUCINATION_PENALTY`` for each listed word the context does not hold at all.
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
    weave,
)
from .records import Family, TaskRecord, first_sentence, normalize_answer

FACTS = (2, 4)
"""Least and most facts stated about the asked entity."""

HALLUCINATION_PENALTY = 0.25
"""Subtracted per listed value found nowhere in the prompt (the reward is floored at 0)."""

SEPARATOR = " , "
"""Between the values of a reference answer."""

INSTRUCTION = "list every value the text gives for {E} , separated by commas ."
"""Said before the question (``{E}``: the entity)."""

SPREAD = 0.08
"""With a requested depth, each fact lands within this fraction of it."""


def list_items(text: str) -> list[str]:
    """The values listed in ``text``: split on commas and white space, normalised, ``and``
    dropped (every value of the synthetic language is one word), duplicates once."""
    out: list[str] = []
    for word in re.split(r"[,\s]+", text):
        w = normalize_answer(word)
        if w and w != "and" and w not in out:
            out.append(w)
    return out


def longform_record(
    i: int,
    tok,
    lang: syn.Language,
    length: int,
    rng: np.random.Generator,
    depth: float | None = None,
    facts: tuple[int, int] = FACTS,
    density: float = DISTRACTORS_PER_1K,
) -> TaskRecord:
    """One ``longform`` prompt of about ``length`` tokens.

    ``depth`` places every fact within ``SPREAD`` of it; ``None`` draws each depth.
    ``density``: distractors per 1,000 tokens, facts of other entities with the asked
    attributes (another attribute of E would belong in the answer, so none is planted).
    """
    n = int(rng.integers(facts[0], facts[1] + 1))
    attrs = [str(a) for a in rng.permutation(list(syn.ATTRIBUTES))[:n]]
    taken_e: set[str] = set()
    taken_v: set[str] = set()
    (ent,) = draw_entities(rng, lang, 1, taken_e)
    values = [draw_value(rng, lang, a, taken_v) for a in attrs]
    needles = [syn.fact_sentence(a, ent, v) for a, v in zip(attrs, values)]
    if depth is None:
        targets: list[float | None] = [None] * n
    else:
        lo, hi = max(0.0, depth - SPREAD), min(1.0, depth + SPREAD)
        targets = [float(lo + (hi - lo) * x) for x in rng.random(n)]
    planted = distractors(
        rng,
        lang,
        distractor_count(length, density),
        attrs,
        {},
        taken_e,
        taken_v,
        kinds=("other_entity",),
    )
    needles += [d.sentence() for d in planted]
    targets += [None] * len(planted)
    lead = syn.USE_LEAD_IN.replace("{E}", ent)  # "later E told us that", as in every family
    ask = f"{INSTRUCTION.replace('{E}', ent)} {lead} the values of {ent} are"
    budget = length - ntok(tok, ask) - sum(ntok(tok, s) for s in needles)
    woven = weave(tok, rng, budget, needles, targets)
    prompt = " ".join(woven.sentences + [ask])
    order = sorted(range(n), key=lambda k: woven.at[k])
    where = depths(tok, woven.sentences, [woven.at[k] for k in order])
    meta = {
        "length": length,
        "tokens": count_tokens(tok, prompt),
        "depth": round(sum(where) / n, 4),
        "depths": where,
        "facts": n,
        "attributes": [attrs[k] for k in order],
        "distractors": kind_counts(planted),
    }
    answer = SEPARATOR.join(values[k] for k in order)
    return TaskRecord(f"longform-{i:06d}", "longform", prompt, answer, meta)


def verify_longform(response: str, rec: TaskRecord) -> float:
    """Set F1 of the values listed in the response's first sentence against the answer's,
    minus ``HALLUCINATION_PENALTY`` per listed value that is no word of the prompt; in
    [0, 1]."""
    got = list_items(first_sentence(response))
    want = set(list_items(rec.answer))
    if not got or not want:
        return float(not got and not want)
    hit = len(want.intersection(got))
    f1 = 2 * hit / (len(got) + len(want))
    context = {normalize_answer(w) for w in rec.prompt.split()}
    invented = sum(w not in context for w in got)
    return max(0.0, f1 - HALLUCINATION_PENALTY * invented)


LONGFORM = Family("longform", verify_longform, STOP)
