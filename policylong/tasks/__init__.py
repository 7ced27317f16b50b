"""Verifiable long-context tasks for the alignment loop: generators, task files, rewards.

A task record is one prompt with a reference answer; a *family* names how it was made and how
its responses are scored (its verifier, a deterministic function returning a reward in
[0, 1]). Records live in a JSON-lines task file, one per line::

    {"id": "lookup-000017", "task": "lookup", "prompt": "...", "answer": "ka417",
     "meta": {"length": 512, "depth": 0.41, ...}}

``policylong align`` reads such a file (``align.task_file``) or writes one from the families
named in ``align.tasks`` (seeded: the same seed gives the same bytes). Families (formats and
rewards in docs/tasks.md):

  lookup         one of K same-attribute facts in a filler haystack; answer the value.
  multihop       a variable-tracking chain ``the A of E2 is the A of E1`` over the context;
                 answer the last entity's value.
  grounding      numbered passages; answer ``V [k]`` (value, supporting passage), or
                 ``not stated`` when no passage states the fact.
  longform       every fact about one entity; answer the values, `` , ``-separated (set F1
                 less a penalty per invented value).
  longblocks_em  LongBlocks rows (``read_longblocks``), exact match; ``longblocks_f1``: token
                 F1. Read from Parquet, never generated.

The generated families are in the synthetic language of ``policylong.synthetic``; each
generator takes ``depth`` (where the key evidence sits, a fraction of the context) and records
``length``, ``depth`` and its own keys in ``meta``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict

import numpy as np

from policylong import synthetic as syn

from .grounding import ABSENT_FRACTION, GROUNDING, NOT_STATED, grounding_record
from .haystack import DISTRACTORS_PER_1K
from .longblocks import LONGBLOCKS, read_longblocks
from .longblocks import TEMPLATE as LONGBLOCKS_TEMPLATE
from .longform import LONGFORM, longform_record
from .lookup import LOOKUP, LOOKUP_KEYS, lookup_record
from .multihop import MULTIHOP, MULTIHOP_HOPS, multihop_record
from .records import (
    Family,
    TaskError,
    TaskRecord,
    exact_match,
    first_line,
    first_sentence,
    normalize_answer,
    token_f1,
)

log = logging.getLogger(__name__)

__all__ = [
    "ABSENT_FRACTION",
    "DISTRACTORS_PER_1K",
    "FAMILIES",
    "GENERATORS",
    "LONGBLOCKS_TEMPLATE",
    "LOOKUP_KEYS",
    "MULTIHOP_HOPS",
    "NOT_STATED",
    "Family",
    "TaskError",
    "TaskRecord",
    "exact_match",
    "family",
    "first_line",
    "first_sentence",
    "generate_tasks",
    "grounding_record",
    "longform_record",
    "lookup_record",
    "multihop_record",
    "normalize_answer",
    "read_longblocks",
    "read_tasks",
    "reward",
    "tasks_jsonl",
    "token_f1",
    "unspellable",
    "write_tasks",
]

FAMILIES: dict[str, Family] = {
    f.name: f for f in (LOOKUP, MULTIHOP, GROUNDING, LONGFORM, *LONGBLOCKS.values())
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

GENERATORS = {
    "lookup": lookup_record,
    "multihop": multihop_record,
    "grounding": grounding_record,
    "longform": longform_record,
}
"""Family -> ``record(i, tok, lang, length, rng, depth=None)``."""


def unspellable(tok, name: str) -> list[str]:
    """The texts of family ``name``'s ``needs`` that ``tok`` maps to its unknown token (a
    word-level tokenizer, such as the embedded model's, knows only its own words)."""
    unk = getattr(tok, "unk_token_id", None)
    if unk is None:
        return []
    return [t for t in family(name).needs if unk in tok(t, add_special_tokens=False)["input_ids"]]


def generate_tasks(
    names: list[str], n: int, length: int, seed: int, tok, depth: float | None = None
) -> list[TaskRecord]:
    """``n`` records cycling over the families ``names``, each about ``length`` tokens, the key
    evidence at ``depth`` (a fraction of the context; ``None``: drawn per record); the same
    arguments give the same records."""
    for name in names:
        family(name, "align.tasks")
        if name not in GENERATORS:
            raise TaskError(f"align.tasks: family {name!r} has no generator (use a task file)")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise TaskError(f"depth {depth} must lie in [0, 1]")
    for name in dict.fromkeys(names):
        if missing := unspellable(tok, name):
            log.warning(
                "align.tasks: the tokenizer cannot spell %s (unknown token), so %s responses "
                "never earn the full reward",
                ", ".join(repr(t) for t in missing),
                name,
            )
    lang = syn.build_language()
    rng = np.random.default_rng([seed, 0x7A5C])
    return [
        GENERATORS[names[i % len(names)]](i, tok, lang, length, rng, depth=depth) for i in range(n)
    ]


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
    with open(path, encoding="utf-8") as f:
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
            if not isinstance(row.get("meta", {}), dict):
                raise TaskError(f"{where}: field 'meta' must be a JSON object")
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
