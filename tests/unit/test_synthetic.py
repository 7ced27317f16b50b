"""The synthetic corpus: what the ground truth says is what the text says."""

from __future__ import annotations

import json
import os

from policylong import synthetic as syn


def load(d, name):
    with open(os.path.join(d, f"{name}.jsonl")) as f:
        return [json.loads(x) for x in f]


def test_ground_truth_matches_text(synth_corpus, tokenizer):
    docs = {d["id"]: d["text"] for d in load(synth_corpus, "docs")}
    passages = {p["id"]: p["text"] for p in load(synth_corpus, "passages")}
    vocab = tokenizer.get_vocab()
    for t in list(docs.values()) + list(passages.values()):
        assert all(w in vocab for w in t.split())  # every word is one known token
    used_entities = set()
    for g in load(synth_corpus, "ground_truth"):
        root = docs[g["root"]]
        assert len(g["passages"]) == len(g["facts"]) >= 2
        assert set(g["distractors"]) == set(g["distractor_kinds"])
        for f in g["facts"]:
            use = syn.fact_sentence(f["attribute"], f["entity"], f["value"])
            assert use in root and use in passages[f["passage"]]
            assert f["entity"] not in used_entities  # one root per entity: links unambiguous
            used_entities.add(f["entity"])
            # the definition is not in the root's own text beyond the use sentence
            assert root.count(f["value"]) == 1
            de, wv = passages[f["different_entity"]], passages[f["wrong_value"]]
            assert g["distractor_kinds"][f["different_entity"]] == "different_entity"
            assert g["distractor_kinds"][f["wrong_value"]] == "wrong_value"
            assert (
                f["entity"] not in de.split()
                and syn.ATTRIBUTES[f["attribute"]].split()[1] in de.split()
            )
            assert f["entity"] in wv.split() and f["value"] not in wv.split()
            # same style: the different-entity passage shares the theme line with the true one
            assert de.split(" . ")[0] == passages[f["passage"]].split(" . ")[0]


def test_generation_is_deterministic(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    syn.generate_corpus(a, 5, seed=1)
    syn.generate_corpus(b, 5, seed=1)
    syn.generate_corpus(c, 5, seed=2)
    for n in ("docs", "passages", "ground_truth"):
        assert load(a, n) == load(b, n)
    assert load(a, "docs") != load(c, "docs")


def test_language_is_fixed():
    assert syn.build_language().vocab == syn.build_language().vocab
