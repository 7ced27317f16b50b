"""What the generated families share: token counts, the filler haystack with evidence woven in
at chosen depths, fact and link sentences, questions, and distractor facts.

Everything is in the synthetic language of ``policylong.synthetic`` and drawn from one
``numpy`` generator, so a record is a function of the generator's state alone.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from policylong import synthetic as syn

STOP = (".", "\n")
"""Stop texts of the generated families: every answer is one sentence on one line."""

DISTRACTORS_PER_1K = 4.0
"""Default distractor density: distractor facts per 1,000 prompt tokens (at least 2 unless
the density is 0), so longer prompts hide their evidence among proportionally more facts."""

KINDS = ("other_entity", "other_attribute")
"""The corpus's distractor kinds that leave the reference answer unambiguous: a fact of the
same attribute about another entity (the corpus's ``different_entity``), and another attribute
of a queried entity. A same-entity, same-attribute fact with another value (the corpus's
``wrong_value``) would contradict the evidence, so no family plants it."""


@lru_cache(maxsize=1 << 16)
def ntok(tok, text: str) -> int:
    """Tokens of ``text`` alone (cached: filler sentences repeat; the tokenizer is hashed by
    identity)."""
    return count_tokens(tok, text)


def count_tokens(tok, text: str) -> int:
    """Tokens of ``text`` without special tokens (uncached, for whole prompts)."""
    return len(tok(text, add_special_tokens=False)["input_ids"])


def question(attribute: str, entity: str) -> str:
    """The lookup cloze ``later E told us that the <attribute> of E is`` (the value follows)."""
    lead = syn.use_sentence(attribute, entity, "@@")
    return lead[: lead.index("@@")].strip()


def link_sentence(attribute: str, entity: str, source: str) -> str:
    """``the <attribute> of <entity> is the <attribute> of <source> .`` (variable tracking)."""
    template = syn.ATTRIBUTES[attribute]
    head = template[: template.index("{V}")]  # "the access code of {E} is "
    ref = head.rstrip()[: -len(" is")]  # "the access code of {E}"
    return head.replace("{E}", entity) + ref.replace("{E}", source) + " ."


def filler(tok, rng: np.random.Generator, budget: int) -> list[str]:
    """Filler sentences until they hold at least ``budget`` tokens (at most one sentence
    more)."""
    hay: list[str] = []
    used = 0
    while used < budget:
        s = syn._fill(syn.FILLER[int(rng.integers(len(syn.FILLER)))], rng)
        hay.append(s)
        used += ntok(tok, s)
    return hay


@dataclass
class Woven:
    """A context as sentences: filler with the evidence and distractor sentences woven in."""

    sentences: list[str]
    """Every sentence of the context, in order."""
    at: list[int]
    """For each needle (in the caller's order), its index in ``sentences``."""


def weave(
    tok,
    rng: np.random.Generator,
    budget: int,
    needles: list[str],
    targets: list[float | None],
) -> Woven:
    """Filler of about ``budget`` tokens with ``needles`` at ``targets`` (``arrange``);
    ``None`` draws a target uniformly."""
    hay = filler(tok, rng, budget)
    want = [float(rng.random()) if t is None else float(t) for t in targets]
    return arrange(tok, hay, needles, want)


def arrange(tok, hay: list[str], needles: list[str], want: list[float]) -> Woven:
    """``needles`` inserted between the sentences of ``hay``.

    Needle k lands where the tokens before it are closest to ``want[k]`` (a fraction of the
    context's tokens, needles included). Needles keep the order of their targets (ties: the
    caller's order), so a chain given ascending targets stays in order.
    """
    off = [0]
    for s in hay:
        off.append(off[-1] + ntok(tok, s))
    sizes = [ntok(tok, n) for n in needles]
    total = off[-1] + sum(sizes)
    order = sorted(range(len(needles)), key=lambda k: (want[k], k))
    slot = [0] * len(needles)
    lo, before = 0, 0
    for k in order:
        goal = want[k] * total - before
        j = bisect.bisect_left(off, goal, lo)
        cands = [c for c in (j - 1, j) if lo <= c < len(off)]
        slot[k] = min(cands, key=lambda c: (abs(off[c] - goal), c))
        lo = slot[k]
        before += sizes[k]
    by_slot: dict[int, list[int]] = {}
    for k in order:
        by_slot.setdefault(slot[k], []).append(k)
    sentences: list[str] = []
    at = [0] * len(needles)
    for j in range(len(hay) + 1):
        for k in by_slot.get(j, []):
            at[k] = len(sentences)
            sentences.append(needles[k])
        if j < len(hay):
            sentences.append(hay[j])
    return Woven(sentences, at)


def depths(tok, sentences: list[str], at: list[int], label_tokens: dict[int, int] | None = None):
    """The depth of each sentence in ``at``: the fraction of the context's tokens before it.
    ``label_tokens`` adds tokens before given sentence indices (passage labels)."""
    label_tokens = label_tokens or {}
    starts, used = [], 0
    for i, s in enumerate(sentences):
        used += label_tokens.get(i, 0)
        starts.append(used)
        used += ntok(tok, s)
    return [round(starts[i] / max(used, 1), 4) for i in at]


def distractor_count(length: int, density: float) -> int:
    """Distractor facts in a prompt of ``length`` tokens at ``density`` per 1,000 tokens."""
    if density <= 0:
        return 0
    return max(2, int(round(density * length / 1000)))


def draw_entities(rng: np.random.Generator, lang: syn.Language, k: int, taken: set[str]):
    """``k`` distinct entities, uniform over those not in ``taken`` (which they join)."""
    free = [e for e in lang.entities if e not in taken]
    out = [free[int(j)] for j in rng.choice(len(free), size=k, replace=False)]
    taken.update(out)
    return out


def draw_value(rng: np.random.Generator, lang: syn.Language, attribute: str, taken: set[str]):
    """A value of ``attribute``, uniform over the pool less ``taken`` (which it joins)."""
    free = [v for v in lang.values[attribute] if v not in taken]
    v = free[int(rng.integers(len(free)))]
    taken.add(v)
    return v


@dataclass
class Distractor:
    """One planted distractor fact."""

    kind: str
    """One of ``KINDS``."""
    entity: str
    """The entity it is about."""
    attribute: str
    """The attribute it states."""
    value: str
    """The value it states (never a value of the evidence)."""

    def sentence(self) -> str:
        """The fact as a sentence of the synthetic language."""
        return syn.fact_sentence(self.attribute, self.entity, self.value)


def distractors(
    rng: np.random.Generator,
    lang: syn.Language,
    n: int,
    attributes: list[str],
    stated: dict[str, set[str]],
    taken_entities: set[str],
    taken_values: set[str],
    kinds: tuple[str, ...] = KINDS,
) -> list[Distractor]:
    """``n`` distractor facts, cycling over ``kinds``.

    ``other_entity``: an attribute of ``attributes`` about a fresh entity. ``other_attribute``:
    a fresh attribute of an entity of ``stated`` (entity -> attributes already stated or
    asked about it, updated here); where none is left, an ``other_entity`` one instead. Every
    value is fresh.
    """
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        free = {e: [a for a in syn.ATTRIBUTES if a not in s] for e, s in stated.items()}
        free = {e: a for e, a in free.items() if a}
        if kind == "other_attribute" and free:
            names = sorted(free)
            e = names[int(rng.integers(len(names)))]
            a = free[e][int(rng.integers(len(free[e])))]
            stated[e].add(a)
        else:
            kind = "other_entity"
            (e,) = draw_entities(rng, lang, 1, taken_entities)
            a = attributes[int(rng.integers(len(attributes)))]
        out.append(Distractor(kind, e, a, draw_value(rng, lang, a, taken_values)))
    return out


def kind_counts(items: list[Distractor]) -> dict[str, int]:
    """How many distractors of each kind (for ``meta``)."""
    out: dict[str, int] = {}
    for d in items:
        out[d.kind] = out.get(d.kind, 0) + 1
    return out
