"""Task generators, verifiers and task files (policylong.tasks)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from policylong import synthetic as syn
from policylong.corpus import encode, load_tokenizer
from policylong.paths import embedded_model_dir
from policylong.tasks import (
    LONGBLOCKS_TEMPLATE,
    LOOKUP_KEYS,
    NOT_STATED,
    TaskError,
    TaskRecord,
    exact_match,
    generate_tasks,
    grounding_record,
    read_longblocks,
    read_tasks,
    reward,
    tasks_jsonl,
    unspellable,
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


# -- the generated families --------------------------------------------------------------------

GENERATED = ["lookup", "multihop", "grounding", "longform"]


def _question(rec: TaskRecord) -> str:
    """The text after the context: the instruction (if any) and the cloze."""
    cut = {"grounding": "\nanswer with", "longform": " list every value"}.get(rec.task, " later ")
    return rec.prompt[rec.prompt.rindex(cut) :].strip()


def _context(rec: TaskRecord) -> str:
    return rec.prompt[: len(rec.prompt) - len(_question(rec))].strip()


def _asked(rec: TaskRecord) -> tuple[str, str]:
    """(entity, attribute) of a lookup / multihop / grounding question."""
    q = _question(rec)
    for attr in syn.ATTRIBUTES:
        head = syn.fact_sentence(attr, "@E", "@V").split("@V")[0].strip()  # "the ... of @E is"
        pre, _, _ = head.partition("@E")
        if pre in q and q.endswith(" is"):
            entity = q.rsplit(pre, 1)[1].split()[0]
            if q.endswith(head.replace("@E", entity)):
                return entity, attr
    raise AssertionError(f"no question in {q!r}")


def _sentences(text: str) -> list[str]:
    """The sentences of a context (passage labels and line ends dropped)."""
    return [x.strip() for x in re.findall(r"[^.\]\n]+\.", text)]


def _depth(tok, context: str, sentence: str) -> float:
    """Tokens of ``context`` before ``sentence``, as a fraction of the context's tokens."""
    return len(encode(tok, context[: context.index(sentence)])) / len(encode(tok, context))


def test_generated_families_are_seeded_and_score_their_own_answer(tmp_path, tok):
    """Same seed, same bytes (another seed, other bytes); names cycle; the reference answer
    earns reward 1; a task file of every family reads back equal."""
    recs = generate_tasks(GENERATED, 8, 256, seed=5, tok=tok)
    assert tasks_jsonl(recs) == tasks_jsonl(generate_tasks(GENERATED, 8, 256, 5, tok))
    assert tasks_jsonl(recs) != tasks_jsonl(generate_tasks(GENERATED, 8, 256, 6, tok))
    assert [r.task for r in recs] == GENERATED * 2
    for r in recs:
        assert reward(r, r.answer + " .") == 1.0, r.id
        assert 0.0 <= r.meta["depth"] <= 1.0 and r.meta["length"] == 256
    write_tasks(str(tmp_path / "t.jsonl"), recs)
    assert read_tasks(str(tmp_path / "t.jsonl")) == recs


def _follow(sentences: list[str], attr: str, entity: str) -> tuple[str, list[str]]:
    """The value reached from ``entity`` through ``the A of E is the A of E' .`` sentences,
    and the entities on the way; each must have exactly one sentence of ``attr``."""
    head = syn.fact_sentence(attr, "@E", "@V").split("@V")[0]  # "the A of @E is "
    path = [entity]
    while True:
        mine = [s for s in sentences if s.startswith(head.replace("@E", entity))]
        assert len(mine) == 1, (entity, mine)
        rest = mine[0][len(head.replace("@E", entity)) :].removesuffix(" .")
        if not rest.startswith(head.split("@E")[0]):
            return rest, path
        entity = rest.split()[-1]
        path.append(entity)


def test_a_tokenizer_that_cannot_spell_the_answer_format_is_named(tok, caplog):
    """The embedded model's word-level tokenizer has no ``[1]``, ``not`` or ``stated``: a
    grounding response can then earn the value's half only, and generating says so."""
    assert unspellable(tok, "grounding") == ["[1]", NOT_STATED]
    assert unspellable(tok, "multihop") == unspellable(tok, "longform") == []
    with caplog.at_level("WARNING", logger="policylong.tasks"):
        generate_tasks(["grounding", "lookup"], 2, 64, 0, tok)
    assert "cannot spell '[1]', 'not stated' (unknown token), so grounding" in caplog.text


def test_multihop_chain_in_the_text_yields_the_answer(tok):
    """Following ``the A of E is the A of E'`` from the asked entity through the context's
    sentences reaches ``the A of E_0 is V``, V the answer, after ``hops`` links; every entity
    on the way has exactly one sentence of that attribute. Every other link starts a decoy
    chain that ends in another value."""
    for r in generate_tasks(["multihop"], 6, 512, seed=2, tok=tok):
        entity, attr = _asked(r)
        sentences = _sentences(_context(r))
        value, path = _follow(sentences, attr, entity)
        assert value == r.answer and len(path) == r.meta["hops"] + 1 == 3, r.id
        ref = syn.fact_sentence(attr, "@E", "@V").split("@V")[0].split("@E")[0]
        decoys = [s.split()[len(ref.split())] for s in sentences if s.count(ref) == 2]
        decoys = [e for e in decoys if e not in path]
        assert len(decoys) == 2 * r.meta["distractors"]["other_chain"] > 0, r.id
        assert all(_follow(sentences, attr, e)[0] != r.answer for e in decoys), r.id


def test_grounding_cites_the_passage_that_states_the_fact(tok):
    """Present: the fact sits in the cited passage and nowhere else, and the value occurs once
    in the prompt; absent (``not stated``): no passage states the asked attribute of the
    entity, while some passage states another attribute of it."""
    recs = generate_tasks(["grounding"], 16, 256, seed=3, tok=tok)
    assert {r.meta["absent"] for r in recs} == {True, False}
    for r in recs:
        entity, attr = _asked(r)
        lines = _context(r).split("\n")
        assert [ln.split()[0] for ln in lines] == [f"[{k}]" for k in range(1, len(lines) + 1)]
        assert len(lines) == r.meta["passages"] == 3
        about = syn.fact_sentence(attr, entity, "@V").split("@V")[0]
        if r.meta["absent"]:
            assert r.answer == NOT_STATED
            assert not any(about in ln for ln in lines), r.id
            assert any(f" of {entity} is " in ln for ln in lines), r.id
            continue
        value, cite = r.answer.split()
        fact = syn.fact_sentence(attr, entity, value)
        assert cite == f"[{r.meta['passage']}]"
        assert [fact in ln for ln in lines].index(True) + 1 == r.meta["passage"]
        assert r.prompt.count(fact) == 1 and r.prompt.count(value) == 1, r.id


def test_longform_lists_every_fact_of_the_entity_in_order(tok):
    """Each listed value's fact is in the context once, in the answer's order; the context
    states nothing else about the entity; the other facts are other entities'."""
    for r in generate_tasks(["longform"], 6, 256, seed=4, tok=tok):
        entity = _question(r).split()[-2]  # "... the values of E are"
        values = r.answer.split(" , ")
        assert 2 <= len(values) == r.meta["facts"] <= 4
        ctx = _context(r)
        facts = [syn.fact_sentence(a, entity, v) for a, v in zip(r.meta["attributes"], values)]
        assert [ctx.count(f) for f in facts] == [1] * len(facts)
        assert [ctx.index(f) for f in facts] == sorted(ctx.index(f) for f in facts)
        assert ctx.count(f" of {entity} is ") == len(values), r.id
        assert r.meta["distractors"]["other_entity"] >= 2


def _evidence(rec: TaskRecord) -> list[str]:
    """The sentences that must sit at the requested depth (any one of them, for an absent
    grounding question: the distractors about the asked entity)."""
    if rec.task == "longform":
        entity = _question(rec).split()[-2]
        values = rec.answer.split(" , ")
        return [syn.fact_sentence(a, entity, v) for a, v in zip(rec.meta["attributes"], values)]
    entity, attr = _asked(rec)
    if rec.task == "multihop":  # the value fact, farthest from the question
        return [s for s in _sentences(_context(rec)) if s.endswith(f" is {rec.answer} .")]
    if rec.task == "grounding" and rec.meta["absent"]:
        return [s for s in _sentences(_context(rec)) if f" of {entity} is " in s][:1]
    return [syn.fact_sentence(attr, entity, rec.answer.split()[0])]


@pytest.mark.parametrize("depth", [0.05, 0.5, 0.9])
def test_the_evidence_sits_at_the_requested_depth(tok, depth):
    """With ``depth`` the key evidence starts within 0.1 of it (tokens before it over the
    context's tokens; longform: every fact; an absent grounding fact: the distractor about the
    asked entity), and ``meta["depth"]`` says where."""
    rng = np.random.default_rng(0)
    recs = generate_tasks(GENERATED, 8, 512, seed=7, tok=tok, depth=depth)
    for r in recs:
        ctx = _context(r)
        for s in _evidence(r):
            assert abs(_depth(tok, ctx, s) - depth) <= 0.1, (r.id, s)
        assert abs(r.meta["depth"] - depth) <= 0.1, r.id
    absent = grounding_record(0, tok, syn.build_language(), 512, rng, depth, absent_fraction=1)
    assert absent.answer == NOT_STATED
    (trap,) = _evidence(absent)
    assert abs(_depth(tok, _context(absent), trap) - depth) <= 0.1
    assert abs(absent.meta["depth"] - depth) <= 0.1
    with pytest.raises(TaskError, match="depth 1.5"):
        generate_tasks(["multihop"], 1, 256, 0, tok, depth=1.5)


@pytest.mark.parametrize("length", [256, 2048])
def test_prompt_length_is_met(tok, length):
    """Every family reaches the requested tokens and overshoots by at most one filler
    sentence; ``meta["tokens"]`` is the prompt's count."""
    for r in generate_tasks(GENERATED, 4, length, seed=8, tok=tok):
        n = len(encode(tok, r.prompt))
        assert length <= n <= length + 16, (r.id, n)
        assert r.meta.get("tokens", n) == n


def test_the_answer_is_not_in_the_question(tok):
    """The no-context chance check, cheaply: a model that sees only the question can do no
    better than a constant answer per question form. The question names the entity (drawn
    uniformly, unrelated to the value) and never a value of the answer; values are drawn
    uniformly from pools of >= 100 words (200 per attribute), so a constant value is right
    about once in 200. Grounding adds two constants: ``not stated`` earns the absent fraction
    (0.25 in expectation), a constant citation half of 1/P of the present questions (P = 3
    passages here: 0.125). Measured over 48 records per family: the best constant answer
    (every reference answer of the family, and ``not stated``) stays under 0.1 (lookup,
    multihop, longform: at most a few repeated values) and 0.35 (grounding)."""
    lang = syn.build_language()
    assert min(len(v) for v in lang.values.values()) >= 100
    recs = generate_tasks(GENERATED, 4 * 48, 128, seed=9, tok=tok)
    for r in recs:
        words = set(_question(r).split())
        values = [w for w in r.answer.replace(",", " ").split() if not w.startswith("[")]
        assert not (set(values) - {"not", "stated"}) & words, r.id
    for name in GENERATED:
        mine = [r for r in recs if r.task == name]
        constants = {r.answer for r in mine} | {NOT_STATED, "x [1]", "x [2]", "x [3]"}
        best = max(sum(reward(r, a) for r in mine) / len(mine) for a in constants)
        assert best <= (0.35 if name == "grounding" else 0.1), (name, best)


def test_verifiers_multihop_grounding_longform():
    hop = TaskRecord("m", "multihop", "...", "ka417")
    assert [reward(hop, t) for t in ("ka417 .", " KA417. more", "ku849 .", "", ". ka417")] == [
        1.0,
        1.0,
        0.0,
        0.0,
        0.0,
    ]
    cited = TaskRecord("g", "grounding", "...", "ka417 [2]")
    cases = {
        "ka417 [2] .": 1.0,
        "[2] ka417": 1.0,  # the order does not matter
        "ka417 [3]": 0.5,  # the wrong passage
        "ka417": 0.5,  # the value without a citation
        "ka417 [2] [3]": 0.5,  # the citations must be exactly the supporting passage
        "ka417 . [2]": 0.5,  # a citation after the first sentence does not count
        "ku849 [2]": 0.5,  # the right passage, the wrong value
        "not stated [2]": 0.5,
        "not stated": 0.0,
        "": 0.0,
    }
    assert {t: reward(cited, t) for t in cases} == cases
    absent = TaskRecord("g", "grounding", "...", NOT_STATED)
    cases = {"not stated .": 1.0, "Not stated [2]": 1.0, "ka417 [2]": 0.0, "not": 0.0, "": 0.0}
    assert {t: reward(absent, t) for t in cases} == cases
    prompt = (
        "the access code of rubo is ka417 . the pet of rubo is duling . the locker of x is 4411 ."
    )
    listed = TaskRecord("l", "longform", prompt + " later rubo told us", "ka417 , duling")
    cases = {
        "ka417 , duling .": 1.0,
        "duling,ka417": 1.0,  # order and spacing do not matter
        "ka417 and duling": 1.0,
        "ka417 , ka417 , duling": 1.0,  # a repeat counts once
        "ka417": pytest.approx(2 / 3),  # recall 1/2
        "ka417 , 4411": 0.5,  # a value of the context, but not of rubo: precision only
        "ka417 , zorvak": 0.25,  # F1 0.5, less 0.25 for a word the context does not hold
        "ka417 , duling , zorvak": pytest.approx(0.8 - 0.25),
        "zorvak , kelmor": 0.0,  # floored
        "": 0.0,
    }
    assert {t: reward(listed, t) for t in cases} == cases


# -- LongBlocks --------------------------------------------------------------------------------

TEACHER = "response_Qwen3-Next-80B-A3B"


def _longblocks(tmp_path, **columns):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = {
        "id": ["lb-0", "lb-1", "lb-2"],
        "document": ["Paris is the capital of France.", "Bern is in Switzerland.", "Doc three."],
        "source": ["wiki", "wiki", "news"],
        "language": ["en", "en", "en"],
        "question": ["What is the capital of France?", "Where is Bern?", "What is three?"],
        "answer": ["Paris", "Switzerland", "a number"],
        TEACHER: ["Paris.", "In Switzerland.", "A number."],
    }
    rows.update(columns)
    path = tmp_path / "lb.parquet"
    pq.write_table(pa.table({k: v for k, v in rows.items() if v is not None}), str(path))
    return str(path)


def test_longblocks_reads_into_task_records(tmp_path, tok):
    """Prompt = the documented template; the teacher column lands in meta; ``limit`` keeps the
    first rows; a task file of the records reads back equal; both verifiers."""
    path = _longblocks(tmp_path)
    recs = read_longblocks(path, family="longblocks_f1", teacher_column=TEACHER, tok=tok)
    assert [r.id for r in recs] == ["lb-0", "lb-1", "lb-2"]
    r = recs[0]
    assert r.task == "longblocks_f1" and r.answer == "Paris"
    assert r.prompt == LONGBLOCKS_TEMPLATE.format(
        document="Paris is the capital of France.", question="What is the capital of France?"
    )
    assert r.prompt.endswith("\n\nQuestion: What is the capital of France?\nAnswer:")
    assert r.meta["teacher_response"] == "Paris." and r.meta["source"] == "wiki"
    assert r.meta["language"] == "en" and r.meta["length"] == len(encode(tok, r.prompt))
    assert reward(r, " Paris, France\nmore") == pytest.approx(2 / 3)
    assert reward(r, "London") == 0.0
    em = read_longblocks(path, limit=2)
    assert [x.task for x in em] == ["longblocks_em"] * 2 and "teacher_response" not in em[0].meta
    assert reward(em[0], " The paris.\nwhy") == 1.0 and reward(em[0], "Paris, France") == 0.0
    write_tasks(str(tmp_path / "t.jsonl"), recs)
    assert read_tasks(str(tmp_path / "t.jsonl")) == recs


@pytest.mark.parametrize(
    "columns, kwargs, msg",
    [
        ({"question": None}, {}, "lb.parquet: column 'question' missing"),
        ({}, {"teacher_column": "response_x"}, "column 'response_x' missing"),
        ({"question": ["q", "", "q"]}, {}, r"lb.parquet: row 1 \(id 'lb-1'\): column 'question'"),
        ({"answer": ["a", "b", None]}, {}, r"row 2 \(id 'lb-2'\): column 'answer' is empty"),
        ({TEACHER: ["a", " ", "c"]}, {"teacher_column": TEACHER}, f"column '{TEACHER}' is empty"),
        ({"id": ["a", "b", "a"]}, {}, "row 2: duplicate id 'a'"),
        ({}, {"family": "longblocks"}, "family 'longblocks' is not one of longblocks_em"),
    ],
)
def test_longblocks_bad_input_is_named(tmp_path, columns, kwargs, msg):
    path = _longblocks(tmp_path, **columns)
    with pytest.raises(TaskError, match=msg):
        read_longblocks(path, **kwargs)
