"""Task generators, verifiers and task files (policylong.tasks)."""

from __future__ import annotations

import json

import pytest

from policylong import synthetic as syn
from policylong.corpus import encode, load_tokenizer
from policylong.paths import embedded_model_dir
from policylong.tasks import (
    LOOKUP_KEYS,
    TaskError,
    TaskRecord,
    exact_match,
    generate_tasks,
    read_tasks,
    reward,
    tasks_jsonl,
    write_tasks,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(embedded_model_dir())


def test_lookup_records_hold_their_answer_and_are_seeded(tok):
    """The queried fact is in the context exactly once (so the answer is derivable from the
    context alone), next to K - 1 same-attribute distractors of other entities; the prompt
    ends with the question; the length is met within one filler sentence; same seed, same
    bytes, another seed, other records."""
    recs = generate_tasks(["lookup"], 12, 200, seed=5, tok=tok)
    assert tasks_jsonl(recs) == tasks_jsonl(generate_tasks(["lookup"], 12, 200, 5, tok))
    assert tasks_jsonl(recs) != tasks_jsonl(generate_tasks(["lookup"], 12, 200, 6, tok))
    for r in recs:
        q = r.prompt.rsplit(" later ", 1)[1]  # "E told us that the access code of E is"
        entity = q.split()[0]
        fact = syn.fact_sentence("code", entity, r.answer)
        assert r.prompt.count(fact) == 1, r.id
        assert r.prompt.count("the access code of") == LOOKUP_KEYS + 1
        assert r.prompt.endswith(f"the access code of {entity} is")
        n = len(encode(tok, r.prompt))
        assert 200 <= n <= 200 + 20, n
        assert 0.0 <= r.meta["depth"] <= 1.0


def test_verifier_cases():
    rec = TaskRecord("x", "lookup", "...", "zorvak")
    assert reward(rec, "zorvak .") == 1.0
    assert reward(rec, " Zorvak. and then more text") == 1.0  # case, punctuation, the rest
    assert reward(rec, "zorvak zorvak .") == 0.0  # the whole first sentence must match
    assert reward(rec, "kelmor .") == 0.0
    assert reward(rec, "") == 0.0
    assert reward(rec, ". zorvak") == 0.0  # the answer after the first sentence
    assert exact_match("The Zorvak!", "zorvak") == 1.0  # articles dropped (SQuAD)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_task_file_round_trips_and_bad_files_are_named(tmp_path, tok):
    recs = generate_tasks(["lookup"], 3, 64, 1, tok)
    write_tasks(str(tmp_path / "t.jsonl"), recs)
    assert read_tasks(str(tmp_path / "t.jsonl")) == recs
    good = {"id": "a", "task": "lookup", "prompt": "p", "answer": "v"}
    cases = [
        ([], "no records"),
        ([{**good, "task": "summarize"}], "t.jsonl:1 field 'task': unknown task family"),
        ([good, {**good, "question": "q", "prompt": ""}], "t.jsonl:2: field 'prompt'"),
        ([good, good], "t.jsonl:2: duplicate id 'a'"),
        ([{k: v for k, v in good.items() if k != "answer"}], "field 'answer' missing"),
    ]
    for rows, msg in cases:
        p = _write(tmp_path / "t.jsonl", rows)
        with pytest.raises(TaskError, match=msg.replace("(", r"\(")):
            read_tasks(p)
    (tmp_path / "t.jsonl").write_text('{"id": "a",\n')
    with pytest.raises(TaskError, match="t.jsonl:1: not JSON"):
        read_tasks(str(tmp_path / "t.jsonl"))
    with pytest.raises(TaskError, match="unknown task family 'qa'"):
        generate_tasks(["qa"], 2, 64, 1, tok)
