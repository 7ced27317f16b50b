"""The synthetic corpus: what the ground truth says is what the text says."""

from __future__ import annotations

import json
import os

from policylong import synthetic as syn
from policylong.corpus import load_tokenizer
from policylong.paths import ASSET_DIR


def load(d, name):
    with open(os.path.join(d, f"{name}.jsonl")) as f:
        return [json.loads(x) for x in f]


def test_the_shipped_tokenizer_is_the_language_s(tokenizer_dir):
    """The embedded model's tokenizer (committed) has exactly the vocabulary, ids included,
    that ``build_tokenizer`` makes from today's language: a change to the generator that adds or
    reorders words fails here until the base model is rebuilt (``policylong pretrain-base``)."""
    with open(os.path.join(ASSET_DIR, "tokenizer.json")) as f:
        shipped = json.load(f)["model"]["vocab"]
    with open(os.path.join(tokenizer_dir, "tokenizer.json")) as f:
        built = json.load(f)["model"]["vocab"]
    assert shipped == built
    assert len(shipped) == len(syn.build_language().vocab)


def test_ground_truth_matches_text(synth_corpus):
    docs = {d["id"]: d["text"] for d in load(synth_corpus, "docs")}
    passages = {p["id"]: p["text"] for p in load(synth_corpus, "passages")}
    shipped = load_tokenizer(ASSET_DIR)  # the embedded model's, not one built from the corpus
    unk = shipped.unk_token_id
    for t in list(docs.values()) + list(passages.values()):
        ids = shipped(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(t.split()) and unk not in ids  # every word is one known token
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
