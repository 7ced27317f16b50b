"""Task records, families and the text comparisons the verifiers share."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from policylong.errors import PolicyLongError


class TaskError(PolicyLongError, ValueError):
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


@dataclass(frozen=True)
class Family:
    name: str
    """The name records carry in their ``task`` field."""
    verify: Callable[[str, TaskRecord], float]
    """``verify(response_text, record) -> reward in [0, 1]``."""
    stop: tuple[str, ...]
    """Texts that end a response (besides the model's EOS) when each is one token."""
    needs: tuple[str, ...] = ()
    """Texts beyond the prompt's words that a full-reward response contains (a tokenizer that
    cannot spell them caps the reward)."""


_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def first_sentence(text: str) -> str:
    """The response up to its first sentence end (``.``, ``?``, ``!`` or a newline)."""
    return re.split(r"[.?!\n]", text, maxsplit=1)[0]


def first_line(text: str) -> str:
    """The response up to its first newline (free-text answers may hold periods)."""
    return text.split("\n", 1)[0]


def exact_match(response: str, answer: str) -> float:
    """1.0 when the response's first sentence equals the answer after normalisation."""
    return float(normalize_answer(first_sentence(response)) == normalize_answer(answer))


def token_f1(prediction: str, answer: str) -> float:
    """SQuAD's token F1 of two texts after normalisation (1.0 when both are empty)."""
    p, a = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not p or not a:
        return float(p == a)
    common = sum((Counter(p) & Counter(a)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(a)
    return 2 * precision * recall / (precision + recall)
