"""A synthetic corpus with planted long-range dependencies, and its ground truth.

The world is a small word-level language (every word is one token of the embedded base model's
tokenizer; the same text is what the sentence-transformers embedder reads):

* **fact passages** define one attribute of one entity, e.g.
  ``from the mill ledger . the access code of zorvak is ka417 . zorvak works at the mill ...``;
* **root documents** introduce a few entities (``we met zorvak near the bridge .``) and, far
  from any definition, *use* their facts (``... the access code of zorvak is ka417 .``). The value
  token is unpredictable from the root alone (≈ ln 200 nats) and copyable when the defining
  passage is in context: a planted long-range dependency;
* two kinds of **distractors** per used fact: ``different_entity`` (same theme, same attribute,
  another entity: what a hard negative should look like) and ``wrong_value`` (same entity, same
  attribute, another value: misleading context that lowers entropy but raises the NLL);
* background passages: facts of entities no root uses, and fact-free filler passages.

The same module generates the base model's training sequences (``training_sequence``,
``induction_sequence``) from fresh random entity/value pairings, so nothing can be memorised:
the model must learn to copy from context.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from policylong.errors import ConfigError

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>", "<sep>"]

_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gl",
    "kr",
    "pl",
    "st",
    "tr",
    "sk",
]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["", "n", "r", "k", "s", "l", "x", "m"]
_CITY_ENDS = ["burg", "ford", "ton", "ville", "mouth", "dale", "port", "wick"]
_PET_ENDS = ["ling", "moth", "wing", "fin", "paw"]

PLACES = [
    "harbor",
    "mill",
    "archive",
    "garden",
    "tower",
    "market",
    "school",
    "library",
    "station",
    "forge",
    "farm",
    "bridge",
]
BOOKS = ["ledger", "register", "notebook", "logbook"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday"]
ROLES = ["clerk", "keeper", "guard", "baker", "teacher", "miller"]
WEATHER = ["calm", "cold", "warm", "dry", "wet"]
ADJS = ["slow", "quiet", "long", "easy", "hard"]
OBJECTS = ["lamp", "chair", "basket", "rope", "kettle", "map"]

# attribute -> (sentence template, value pool name). {E} entity, {V} value.
ATTRIBUTES = {
    "code": "the access code of {E} is {V} .",
    "city": "the home city of {E} is {V} .",
    "pet": "the pet of {E} is {V} .",
    "locker": "the locker of {E} is {V} .",
}

FILLER = [
    "the weather was {w} that day .",
    "we walked to the {p} and back .",
    "the {r} said that the work was {a} .",
    "nobody was in a hurry .",
    "the {o} stood by the door of the {p} .",
    "it was a {a} afternoon at the {p} .",
    "later we had tea with the {r} .",
    "the road to the {p} was {w} and {a} .",
    "everyone agreed to meet again on {d} .",
    "the {r} fixed the {o} before noon .",
    "then we sat down and rested for a while .",
    "the day ended as it had started .",
]
INTROS = [
    "we met {E} near the {p} .",
    "on {d} we saw {E} at the {p} .",
    "a visitor named {E} came by the {p} .",
]
USE_LEAD_IN = "later {E} told us that"
PASSAGE_DETAILS = [
    "{E} works at the {p} every {d} .",
    "the {b} was kept by the old {r} .",
    "{E} once carried a {o} across the {p} .",
    "the {r} wrote this down on a {w} {d} .",
]


def _gen_words(rng: np.random.Generator, n: int, make, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = make(rng)
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


@dataclass
class Language:
    """Every word the generator can emit; fixed (seed 0) so the tokenizer never changes."""

    entities: list[str]
    values: dict[str, list[str]]
    filler_words: list[str]
    vocab: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        words: list[str] = []
        seen: set[str] = set()
        for w in (
            self.filler_words + self.entities + [v for a in ATTRIBUTES for v in self.values[a]]
        ):
            if w not in seen:
                seen.add(w)
                words.append(w)
        self.vocab = SPECIAL_TOKENS + words


def build_language(num_entities: int = 600, values_per_attribute: int = 200) -> Language:
    rng = np.random.default_rng(0)
    taken: set[str] = set()
    fixed = set()
    templates = list(ATTRIBUTES.values()) + FILLER + INTROS + PASSAGE_DETAILS
    for t in templates + ["from the {p} {b} .", USE_LEAD_IN]:
        for w in t.split():
            if not w.startswith("{"):
                fixed.add(w)
    fixed |= set(PLACES + BOOKS + DAYS + ROLES + WEATHER + ADJS + OBJECTS)
    taken |= fixed

    def syl(r):
        return r.choice(_ONSETS) + r.choice(_VOWELS)

    entities = _gen_words(rng, num_entities, lambda r: syl(r) + syl(r) + r.choice(_CODAS), taken)
    values = {
        "code": _gen_words(
            rng,
            values_per_attribute,
            lambda r: r.choice(list("kqxz")) + r.choice(_VOWELS) + str(r.integers(100, 1000)),
            taken,
        ),
        "city": _gen_words(
            rng, values_per_attribute, lambda r: syl(r) + r.choice(_CITY_ENDS), taken
        ),
        "pet": _gen_words(rng, values_per_attribute, lambda r: syl(r) + r.choice(_PET_ENDS), taken),
        "locker": _gen_words(
            rng, values_per_attribute, lambda r: str(r.integers(1000, 10000)), taken
        ),
    }
    return Language(entities=entities, values=values, filler_words=sorted(fixed))


# -- rendering ---------------------------------------------------------------------------------


def _fill(template: str, rng: np.random.Generator, **slots: str) -> str:
    pools = {"p": PLACES, "b": BOOKS, "d": DAYS, "r": ROLES, "w": WEATHER, "a": ADJS, "o": OBJECTS}
    out = []
    for w in template.split():
        if w.startswith("{") and w.endswith("}"):
            key = w[1:-1]
            out.append(slots[key] if key in slots else str(rng.choice(pools[key])))
        else:
            out.append(w)
    return " ".join(out)


def fact_sentence(attribute: str, entity: str, value: str) -> str:
    return ATTRIBUTES[attribute].replace("{E}", entity).replace("{V}", value)


def use_sentence(attribute: str, entity: str, value: str) -> str:
    """How a root document uses a fact: the entity is named first, so that in ``... of E is``
    the entity is predictable from the document itself and only the value depends on the
    defining passage (without the lead-in, a wrong-value passage "explains" the entity token
    after ``the home city of`` as well as the true one does: measured ΔH 0.79, NLL drop 2.9)."""
    return USE_LEAD_IN.replace("{E}", entity) + " " + fact_sentence(attribute, entity, value)


def fact_passage(
    rng: np.random.Generator,
    attribute: str,
    entity: str,
    value: str,
    theme: tuple[str, str],
    detail_seed: int | None = None,
) -> str:
    """``from the <place> <book> . <fact> . <2-3 details>``; ``detail_seed`` fixes the details
    so that a distractor can share them with the passage it imitates."""
    place, book = theme
    drng = np.random.default_rng(detail_seed) if detail_seed is not None else rng
    n_details = int(drng.integers(2, 4))
    idx = drng.permutation(len(PASSAGE_DETAILS))[:n_details]
    details = [_fill(PASSAGE_DETAILS[i], drng, E=entity, p=place, b=book) for i in idx]
    return " ".join(
        [f"from the {place} {book} .", fact_sentence(attribute, entity, value)] + details
    )


def filler_passage(rng: np.random.Generator, n_sentences: int) -> str:
    return " ".join(_fill(FILLER[int(rng.integers(len(FILLER)))], rng) for _ in range(n_sentences))


@dataclass
class Fact:
    entity: str
    attribute: str
    value: str


def root_document(
    rng: np.random.Generator,
    facts: list[Fact],
    target_words: int,
    extra_entities: tuple[str, ...] | list[str] = (),
) -> str:
    """Introduce every entity early, then use each fact far from its introduction, with
    low-entropy filler in between, until ``target_words`` words.

    ``extra_entities`` are introduced too but have no fact: a document names more entities than
    the retrieval corpus knows about, so an entity named in context is only sometimes the one a
    document introduces (without them the model learns to copy entity names at introductions,
    and any passage naming the entity, a wrong-value one included, "explains" the intro).
    """
    n = len(facts)
    names = [f.entity for f in facts] + list(extra_entities)
    names = [names[i] for i in rng.permutation(len(names))]
    intros = [_fill(INTROS[int(rng.integers(len(INTROS)))], rng, E=e) for e in names]
    uses = [use_sentence(f.attribute, f.entity, f.value) for f in facts]
    fixed_words = sum(len(s.split()) for s in intros + uses)
    budget = max(target_words - fixed_words, 0)
    fillers: list[str] = []
    while sum(len(s.split()) for s in fillers) < budget:
        fillers.append(_fill(FILLER[int(rng.integers(len(FILLER)))], rng))
    # layout: filler, intros (with filler between), filler block, uses (with filler between)
    cut = len(fillers) // 2
    head, tail = fillers[:cut], fillers[cut:]
    parts: list[str] = []
    parts.append(head.pop(0) if head else "")
    for s in intros:
        parts.append(s)
        if head:
            parts.append(head.pop(0))
    parts.extend(head)
    per_use = max(len(tail) // max(n, 1), 0)
    for s in uses:
        for _ in range(per_use):
            if tail:
                parts.append(tail.pop(0))
        parts.append(s)
    parts.extend(tail)
    return " ".join(p for p in parts if p)


# -- the corpus --------------------------------------------------------------------------------


def generate_corpus(
    out_dir: str,
    num_roots: int = 60,
    seed: int = 0,
    facts_per_root: tuple[int, int] = (2, 3),
    root_words: int = 200,
    background_facts: int | None = None,
    filler_passages: int | None = None,
    language: Language | None = None,
) -> dict:
    """Write ``docs.jsonl``, ``passages.jsonl`` and ``ground_truth.jsonl`` into ``out_dir``.

    Every entity used by a root is used by that root only, so its planted links are
    unambiguous. Passage order is shuffled (ids carry no hint of their role).
    Returns counts.
    """
    lang = language or build_language()
    rng = np.random.default_rng(seed)
    themes = [(p, b) for p in PLACES for b in BOOKS]
    lo, hi = facts_per_root
    k_per_root = rng.integers(lo, hi + 1, size=num_roots)
    need = int(k_per_root.sum())
    if need + 16 > len(lang.entities):
        raise ConfigError(
            f"synthetic corpus: {num_roots} roots need {need} distinct entities but the "
            f"language has {len(lang.entities)}; lower num_roots"
        )
    perm = rng.permutation(len(lang.entities))
    root_entities = [lang.entities[i] for i in perm[:need]]
    spare = [lang.entities[i] for i in perm[need:]]
    spare_entities = spare[: len(spare) // 2]  # different-entity distractors, background facts
    extra_pool = spare[len(spare) // 2 :]  # introduced by roots, never in any passage
    attrs = list(ATTRIBUTES)

    passages: list[tuple[str, str]] = []  # (role-free id assigned later, text)
    records = []  # (root_id, text, gt)
    ent_iter = iter(root_entities)
    pid = 0

    def new_passage(text: str) -> str:
        nonlocal pid
        i = f"p{pid:06d}"
        pid += 1
        passages.append((i, text))
        return i

    for r in range(num_roots):
        root_id = f"root{r:05d}"
        facts, gt_facts = [], []
        used_attrs = rng.permutation(attrs)[: int(k_per_root[r])]
        for attr in used_attrs:
            ent = next(ent_iter)
            value = str(rng.choice(lang.values[attr]))
            theme = themes[int(rng.integers(len(themes)))]
            dseed = int(rng.integers(2**31))
            true_id = new_passage(fact_passage(rng, attr, ent, value, theme, dseed))
            other = str(rng.choice(spare_entities))
            other_val = str(rng.choice(lang.values[attr]))
            diff_id = new_passage(fact_passage(rng, attr, other, other_val, theme, dseed))
            wrong_val = str(rng.choice([v for v in lang.values[attr] if v != value]))
            wrong_id = new_passage(fact_passage(rng, attr, ent, wrong_val, theme))
            facts.append(Fact(ent, str(attr), value))
            gt_facts.append(
                {
                    "entity": ent,
                    "attribute": str(attr),
                    "value": value,
                    "passage": true_id,
                    "different_entity": diff_id,
                    "wrong_value": wrong_id,
                }
            )
        extras = rng.choice(extra_pool, size=int(rng.integers(1, 4)), replace=False).tolist()
        text = root_document(rng, facts, root_words, extras)
        gt = {
            "root": root_id,
            "passages": [f["passage"] for f in gt_facts],
            "distractors": [x for f in gt_facts for x in (f["different_entity"], f["wrong_value"])],
            "distractor_kinds": {
                **{f["different_entity"]: "different_entity" for f in gt_facts},
                **{f["wrong_value"]: "wrong_value" for f in gt_facts},
            },
            "facts": gt_facts,
        }
        records.append((root_id, text, gt))

    n_bg = num_roots if background_facts is None else background_facts
    for _ in range(n_bg):
        attr = str(rng.choice(attrs))
        new_passage(
            fact_passage(
                rng,
                attr,
                str(rng.choice(spare_entities)),
                str(rng.choice(lang.values[attr])),
                themes[int(rng.integers(len(themes)))],
            )
        )
    n_fill = num_roots if filler_passages is None else filler_passages
    for _ in range(n_fill):
        new_passage(filler_passage(rng, int(rng.integers(4, 8))))

    # shuffle passage order and rename, so neither position nor id reveals a role
    order = rng.permutation(len(passages))
    rename = {passages[j][0]: f"p{i:06d}" for i, j in enumerate(order)}
    os.makedirs(out_dir, exist_ok=True)
    tmp = {n: os.path.join(out_dir, f".{n}.tmp") for n in ("docs", "passages", "ground_truth")}
    with open(tmp["passages"], "w", encoding="utf-8") as f:
        for j in order:
            old, text = passages[j]
            f.write(json.dumps({"id": rename[old], "text": text}) + "\n")
    with (
        open(tmp["docs"], "w", encoding="utf-8") as fd,
        open(tmp["ground_truth"], "w", encoding="utf-8") as fg,
    ):
        for root_id, text, gt in records:
            fd.write(json.dumps({"id": root_id, "text": text}) + "\n")
            gt["passages"] = [rename[x] for x in gt["passages"]]
            gt["distractors"] = [rename[x] for x in gt["distractors"]]
            gt["distractor_kinds"] = {rename[k]: v for k, v in gt["distractor_kinds"].items()}
            for fct in gt["facts"]:
                for key in ("passage", "different_entity", "wrong_value"):
                    fct[key] = rename[fct[key]]
            fg.write(json.dumps(gt) + "\n")
    for n, t in tmp.items():
        os.replace(t, os.path.join(out_dir, f"{n}.jsonl"))
    return {"roots": num_roots, "passages": len(passages), "facts": need}


# -- training data for the embedded base model -------------------------------------------------


def read_ground_truth(path: str) -> dict[str, dict]:
    """``ground_truth.jsonl`` (as :func:`generate_corpus` writes it) keyed by root id."""
    gt = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                o = json.loads(line)
                gt[o["root"]] = o
    return gt


def _ratio(a: int, b: int):
    return round(a / b, 4) if b else None


def planted_recovery(records: list[dict], gt_path: str) -> dict:
    """Score what screening found (provenance records) against ``ground_truth.jsonl``:

    * recall: planted root→passage links recovered as positives, over all planted links of the
      screened roots (a root skipped for lack of positives counts its links as missed);
    * precision with the NLL guard (the configured criterion) and with entropy alone
      (positives ∪ rejected_by_guard);
    * how many ``wrong_value`` and ``different_entity`` distractors each criterion admitted,
      over how many of them were retrieved as candidates;
    * hard negatives: of the planted ``different_entity`` distractors whose true passage was
      recovered, the fraction that ended up among the root's hard negatives;
    * contradictions: written sequences holding a root fact's passage and its ``wrong_value``
      twin (the model is then trained on a target its context makes ambiguous), how many of
      those twins came in as admitted positives, and guard-rejected passages among the
      root's negatives (none by construction).
    """
    gt = read_ground_truth(gt_path)
    links = tp_g = n_g = tp_e = n_e = 0
    admitted = {
        "guard": {"wrong_value": 0, "different_entity": 0},
        "entropy": {"wrong_value": 0, "different_entity": 0},
    }
    retrieved = {"wrong_value": 0, "different_entity": 0}
    hn_hit = hn_total = 0
    roots = written = contradicted = twin_positive = rejected_neg = 0
    for r in records:
        g = gt.get(r["root"])
        if g is None:
            continue
        roots += 1
        true = set(g["passages"])
        kinds = g.get("distractor_kinds", {})
        links += len(true)
        guard = {p["passage"] for p in r.get("positives", [])}
        ent = guard | set(r.get("rejected_by_guard", []))
        tp_g += len(guard & true)
        n_g += len(guard)
        tp_e += len(ent & true)
        n_e += len(ent)
        for pid in r.get("candidates", []):
            if pid in kinds:
                retrieved[kinds[pid]] += 1
        for name, s in (("guard", guard), ("entropy", ent)):
            for pid in s:
                if pid in kinds:
                    admitted[name][kinds[pid]] += 1
        if r.get("status", "ok") == "ok":  # provenance rows (written sequences) carry none
            negs = set(r.get("negatives", []))
            for fct in g.get("facts", []):
                if fct["passage"] in guard:
                    hn_total += 1
                    hn_hit += fct["different_entity"] in negs
            seq = set(r.get("order", [])[:-1])
            twins = [
                f["wrong_value"]
                for f in g.get("facts", [])
                if {f["passage"], f["wrong_value"]} <= seq
            ]
            written += 1
            contradicted += bool(twins)
            twin_positive += sum(t in guard for t in twins)
            rejected_neg += len(negs & set(r.get("rejected_by_guard", [])))
    return {
        "roots": roots,
        "planted_links": links,
        "recall": _ratio(tp_g, links),
        "precision": _ratio(tp_g, n_g),
        "recall_entropy_only": _ratio(tp_e, links),
        "precision_entropy_only": _ratio(tp_e, n_e),
        "distractors_retrieved": retrieved,
        "admitted_with_guard": admitted["guard"],
        "admitted_entropy_only": admitted["entropy"],
        "wrong_value_admit_rate_guard": _ratio(
            admitted["guard"]["wrong_value"], retrieved["wrong_value"]
        ),
        "wrong_value_admit_rate_entropy_only": _ratio(
            admitted["entropy"]["wrong_value"], retrieved["wrong_value"]
        ),
        "different_entity_admit_rate_guard": _ratio(
            admitted["guard"]["different_entity"], retrieved["different_entity"]
        ),
        "different_entity_admit_rate_entropy_only": _ratio(
            admitted["entropy"]["different_entity"], retrieved["different_entity"]
        ),
        "hard_negative_distractor_recall": _ratio(hn_hit, hn_total),
        "sequences": written,
        "sequences_with_contradiction": contradicted,
        "contradiction_rate": _ratio(contradicted, written),
        "contradicting_twins_as_positives": twin_positive,
        "rejected_among_negatives": rejected_neg,
    }


def induction_sequence(
    rng: np.random.Generator,
    vocab_ids: np.ndarray,
    bos: int,
    sep: int,
    eos: int,
    n_range: tuple[int, int] = (16, 48),
):
    """``<bos> x1..xn <sep> x1..xn <eos>`` and the loss mask (the repeat only)."""
    n = int(rng.integers(n_range[0], n_range[1] + 1))
    x = rng.choice(vocab_ids, size=n).tolist()
    toks = [bos] + x + [sep] + x + [eos]
    mask = [0] * (n + 2) + [1] * (n + 1)
    return toks, mask


def training_text(rng: np.random.Generator, lang: Language, max_words: int = 360) -> str:
    """Context passages then a root segment, with fresh random entity/value pairings.

    Each of the root's facts has its defining passage in context with probability 0.75;
    passages about other entities (same style) are mixed in, so the model learns to copy the
    value *of the right entity*, and that an entity named in context is not necessarily the
    one a document talks about. One sequence in six is a root document alone: screening scores
    ``[bos ; A]``, which must be in distribution, or any prepended passage lowers the entropy of
    A's structural tokens (measured: ΔH ≈ 0.99 at ``a visitor [named]`` for every passage).
    """
    themes = [(p, b) for p in PLACES for b in BOOKS]
    k = int(rng.integers(1, 4))
    if rng.random() < 1 / 6:
        ents = rng.choice(lang.entities, size=k, replace=False).tolist()
        attrs = rng.permutation(list(ATTRIBUTES))[:k]
        facts = [Fact(e, str(a), str(rng.choice(lang.values[a]))) for e, a in zip(ents, attrs)]
        extras = rng.choice(lang.entities, size=int(rng.integers(1, 4)), replace=False).tolist()
        return root_document(rng, facts, int(rng.integers(40, 200)), extras)
    ents = rng.choice(lang.entities, size=k + 7, replace=False).tolist()
    attrs = rng.permutation(list(ATTRIBUTES))[:k]
    facts = [Fact(ents[i], str(a), str(rng.choice(lang.values[a]))) for i, a in enumerate(attrs)]
    ctx = []
    for f in facts:
        if rng.random() < 0.75:
            ctx.append(
                fact_passage(
                    rng, f.attribute, f.entity, f.value, themes[int(rng.integers(len(themes)))]
                )
            )
    for e in ents[k : k + int(rng.integers(1, 5))]:
        a = str(rng.choice(list(ATTRIBUTES)))
        ctx.append(
            fact_passage(
                rng, a, e, str(rng.choice(lang.values[a])), themes[int(rng.integers(len(themes)))]
            )
        )
    if rng.random() < 0.3:
        ctx.append(filler_passage(rng, int(rng.integers(2, 5))))
    order = rng.permutation(len(ctx))
    ctx_words = sum(len(ctx[i].split()) for i in order)
    root_words = int(np.clip(max_words - ctx_words - len(ctx) - 2, 30, 200))
    extras = ents[k + 4 : k + 4 + int(rng.integers(1, 4))]
    root = root_document(rng, facts, int(rng.integers(min(40, root_words), root_words + 1)), extras)
    return " <eos> ".join([ctx[i] for i in order] + [root])


# -- tokenizer ---------------------------------------------------------------------------------


def build_tokenizer(out_dir: str, language: Language | None = None):
    """Word-level tokenizer of the synthetic language, saved in Hugging Face format.

    ``tokenizer_config.json`` declares ``PreTrainedTokenizerFast``: ``AutoTokenizer`` routes a
    Qwen2 folder to ``Qwen2Tokenizer`` by model type and would split the text wrongly, so
    :func:`policylong.corpus.load_tokenizer` honours the declared class.
    """

    lang = language or build_language()
    vocab = {w: i for i, w in enumerate(lang.vocab)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    os.makedirs(out_dir, exist_ok=True)
    tk.save(os.path.join(out_dir, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "sep_token": "<sep>",
        "model_max_length": 1 << 20,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(
            {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token")},
            f,
            indent=2,
        )
    return vocab
