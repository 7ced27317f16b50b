"""Verifiable long-context tasks for the alignment loop: generators, task files, rewards.

A task record is one prompt with a reference answer; a *family* names how it was made and how
its responses are scored (its verifier, a deterministic function returning a reward in
[0, 1]). Records live in a JSON-lines task file, one per line::

    {"id": "lookup-000017", "task": "lookup", "prompt": "...", "answer": "zorvak",
     "meta": {"length": 512, "depth": 0.41, ...}}

``policylong align`` reads such a file (``align.task_file``) or writes one from the families
named in ``align.tasks`` (seeded: the same seed gives the same bytes). Families so far:

  lookup   K facts ``the access code of E_k is V_k`` at random depths of a filler haystack in
           the synthetic language, one of them queried (``later E told us that the access code
           of E is``); the response must start with V (exact match after normalisation). The
           other K - 1 facts are same-theme distractors (other entity, same attribute).
"""

from __future__ import annotations

import json
import os
import re
import string
from dataclasses import asdict, dataclass, field

import numpy as np

from policylong import synthetic as syn


class TaskError(ValueError):
    """A task file or task name is unusable; raised before any model work, naming the file,
    row or value."""


@dataclass
class TaskRecord:
    id: str
    """Unique within the file."""
    task: str
    """The family whose verifier scores the responses (a key of ``FAMILIES``)."""
    prompt: str
    """The text the policy continues: context and question."""
    answer: str
    """The reference answer."""
    meta: dict = field(default_factory=dict)
    """How it was made (length, depth of the evidence, ...), for per-bucket metrics."""


# -- verifiers ---------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def first_sentence(text: str) -> str:
    """The response up to its first sentence end (``.``, ``?``, ``!`` or a newline)."""
    return re.split(r"[.?!\n]", text, maxsplit=1)[0]


def exact_match(response: str, answer: str) -> float:
    """1.0 when the response's first sentence equals the answer after normalisation."""
    return float(normalize_answer(first_sentence(response)) == normalize_answer(answer))


@dataclass(frozen=True)
class Family:
    name: str
    verify: object
    """``verify(response_text, record) -> reward in [0, 1]``."""
    stop: tuple[str, ...]
    """Texts that end a response (besides the model's EOS) when each is one token."""


def _verify_lookup(response: str, rec: TaskRecord) -> float:
    return exact_match(response, rec.answer)


FAMILIES: dict[str, Family] = {
    "lookup": Family("lookup", _verify_lookup, (".",)),
}


def family(name: str, where: str = "task") -> Family:
    """The family ``name``; TaskError naming ``where`` and the known families otherwise."""
    if name not in FAMILIES:
        raise TaskError(f"{where}: unknown task family {name!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def reward(rec: TaskRecord, response: str) -> float:
    """The verifier's reward of ``response`` to ``rec``."""
    return float(family(rec.task).verify(response, rec))


# -- generators --------------------------------------------------------------------------------

LOOKUP_KEYS = 4
"""Facts per lookup prompt (one queried, the rest same-attribute distractors; RULER's 4)."""


def _ntok(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def lookup_record(
    i: int, tok, lang: syn.Language, length: int, rng: np.random.Generator
) -> TaskRecord:
    """One ``lookup`` prompt of about ``length`` tokens (haystack, K facts, the question)."""
    attr = "code"
    idx = rng.choice(len(lang.entities), size=LOOKUP_KEYS, replace=False)
    ents = [lang.entities[int(j)] for j in idx]
    vals = [lang.values[attr][int(rng.integers(len(lang.values[attr])))] for _ in ents]
    facts = [syn.fact_sentence(attr, e, v) for e, v in zip(ents, vals)]
    q = int(rng.integers(LOOKUP_KEYS))
    lead = syn.use_sentence(attr, ents[q], "@@")
    question = lead[: lead.index("@@")].strip()
    budget = length - _ntok(tok, question) - sum(_ntok(tok, f) for f in facts)
    hay: list[str] = []
    used = 0
    while used < budget:
        s = syn._fill(syn.FILLER[int(rng.integers(len(syn.FILLER)))], rng)
        hay.append(s)
        used += _ntok(tok, s)
    slots = sorted(int(rng.integers(0, len(hay) + 1)) for _ in facts)
    order = [int(j) for j in rng.permutation(LOOKUP_KEYS)]
    parts, k = [], 0
    depth = 0.0
    for pos in range(len(hay) + 1):
        while k < len(facts) and slots[k] == pos:
            if order[k] == q:
                depth = pos / max(len(hay), 1)
            parts.append(facts[order[k]])
            k += 1
        if pos < len(hay):
            parts.append(hay[pos])
    prompt = " ".join(parts + [question])
    meta = {"length": length, "depth": round(depth, 4), "keys": LOOKUP_KEYS}
    return TaskRecord(f"lookup-{i:06d}", "lookup", prompt, vals[q], meta)


GENERATORS = {"lookup": lookup_record}


def generate_tasks(names: list[str], n: int, length: int, seed: int, tok) -> list[TaskRecord]:
    """``n`` records cycling over the families ``names``, each about ``length`` tokens; the
    same arguments give the same records."""
    for name in names:
        family(name, "align.tasks")
        if name not in GENERATORS:
            raise TaskError(f"align.tasks: family {name!r} has no generator (use a task file)")
    lang = syn.build_language()
    rng = np.random.default_rng([seed, 0x7A5C])
    return [GENERATORS[names[i % len(names)]](i, tok, lang, length, rng) for i in range(n)]


# -- task files --------------------------------------------------------------------------------


def tasks_jsonl(records: list[TaskRecord]) -> bytes:
    """The task-file bytes of ``records`` (one sorted-key JSON object per line)."""
    return "".join(json.dumps(asdict(r), sort_keys=True) + "\n" for r in records).encode()


def write_tasks(path: str, records: list[TaskRecord]) -> None:
    """Write ``records`` as a task file (beside, then renamed)."""
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(tasks_jsonl(records))
    os.replace(tmp, path)


def read_tasks(path: str) -> list[TaskRecord]:
    """The records of a task file, checked: every row a JSON object with non-empty ``id``,
    ``task`` (a known family), ``prompt`` and ``answer``; ids unique; at least one row."""
    if not os.path.isfile(path):
        raise TaskError(f"{path}: task file not found")
    out, seen = [], set()
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{ln}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TaskError(f"{where}: a row must be a JSON object")
            for k in ("id", "task", "prompt", "answer"):
                if not isinstance(row.get(k), str) or not row[k].strip():
                    raise TaskError(f"{where}: field {k!r} missing or empty")
            family(row["task"], f"{where} field 'task'")
            if row["id"] in seen:
                raise TaskError(f"{where}: duplicate id {row['id']!r}")
            seen.add(row["id"])
            out.append(
                TaskRecord(
                    row["id"], row["task"], row["prompt"], row["answer"], row.get("meta") or {}
                )
            )
    if not out:
        raise TaskError(f"{path}: the task file has no records")
    return out
