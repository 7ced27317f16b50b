"""The screening pipeline end to end with the copy-model fixture and a hashing embedder.

The copy model has low entropy exactly where the context holds the answer, so the planted
ground truth must come back: every true passage a positive, the wrong-value passages rejected
by the NLL guard (entropy falls, NLL rises), the sequence exactly L tokens with A at the end.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from policylong.corpus import encode, read_documents
from policylong.datasets import read_provenance, verify_stage_dataset
from policylong.errors import ModelError, OutputError, ResumeError
from policylong.screening import pipeline as pl


def run(cfg, model, index, embedder, out):
    return pl.screen_stage(cfg, model, index, embedder, out, model_desc="copy", progress=False)


def test_planted_dependencies_recovered(
    tmp_path, make_cfg, synth_corpus, copy_model, index, embedder
):
    cfg = make_cfg(tmp_path)
    out = str(tmp_path / "stage_0")
    m = run(cfg, copy_model, index, embedder, out)
    gt = m["stats"]["ground_truth"]
    assert gt["recall"] == 1.0
    assert gt["precision"] == 1.0
    # the wrong-value passages lower entropy (the model copies) but raise the NLL
    assert gt["distractors_retrieved"]["wrong_value"] > 0
    assert gt["admitted_entropy_only"]["wrong_value"] > 0
    assert gt["admitted_with_guard"]["wrong_value"] == 0
    assert gt["precision_entropy_only"] < 1.0
    # a different entity's value is copied on ("is", "a") / ("is", "number"): the entropy
    # drops, the NLL of the true value does not
    assert gt["admitted_with_guard"]["different_entity"] == 0
    # the random-passage control, verified at the same positions by the same criterion, is
    # (almost) never accepted: the false-positive rate where no ground truth exists
    st = m["stats"]
    assert st["control_forwards"] == cfg.screening.control_passages * st["roots_screened"]
    assert st["control_acceptance_rate"] < st["candidate_acceptance_rate"] / 4, st

    man = verify_stage_dataset(out)
    prov = read_provenance(out)
    assert man["num_sequences"] == len(prov) == m["stats"]["sequences"] > 0
    gtl = {
        json.loads(x)["root"]: json.loads(x)
        for x in open(os.path.join(synth_corpus, "ground_truth.jsonl"))
    }
    rejected_total = 0
    for p in prov:
        assert p["order"][-1] == p["root"]
        assert {q["passage"] for q in p["positives"]} <= set(gtl[p["root"]]["passages"])
        assert set(p["negatives"]).isdisjoint({q["passage"] for q in p["positives"]})
        # a passage the guard rejected for this root (a wrong-value twin) is never a negative
        assert set(p["negatives"]).isdisjoint(p["rejected_by_guard"])
        rejected_total += len(p["rejected_by_guard"])
        assert all(dh > cfg.screening.tau_pos for q in p["positives"] for dh in q["delta_h"])
    assert rejected_total > 0


def test_sequences_are_L_tokens_with_root_at_end(
    tmp_path, make_cfg, synth_corpus, copy_model, index, embedder, tokenizer
):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    cfg = make_cfg(tmp_path)
    out = str(tmp_path / "s")
    run(cfg, copy_model, index, embedder, out)
    ds = IndexedDataset(os.path.join(out, "data"))
    docs = {d.id: d for d in read_documents(os.path.join(synth_corpus, "docs.jsonl"))}
    eos = tokenizer.eos_token_id
    texts = dict(zip(index.ids, index.texts))
    for i, p in enumerate(read_provenance(out)):
        seq = ds[i].tolist()
        assert len(seq) == cfg.data.seq_length
        root = encode(tokenizer, docs[p["root"]].text)[: cfg.screening.screen_length]
        assert seq[-len(root) - 1 :] == root + [eos]
        # every positive appears whole in the sequence
        for q in p["positives"]:
            toks = encode(tokenizer, texts[q["passage"]]) + [eos]
            assert any(seq[k : k + len(toks)] == toks for k in range(len(seq) - len(toks)))


def test_same_seed_same_bytes_and_seed_changes_order(
    tmp_path, make_cfg, synth_corpus, copy_model, index, embedder
):
    shas = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        cfg = make_cfg(tmp_path / name, seed=seed)
        shas.append(run(cfg, copy_model, index, embedder, str(tmp_path / name / "st"))["sha256"])
    assert shas[0] == shas[1]
    assert shas[0]["bin"] != shas[2]["bin"]


def test_killed_run_leaves_no_stage_folder_and_resumes(
    tmp_path, make_cfg, synth_corpus, copy_model, index, embedder, monkeypatch
):
    cfg = make_cfg(tmp_path)
    monkeypatch.setattr(pl, "ROOTS_PER_BATCH", 4)
    ref = run(cfg, copy_model, index, embedder, str(tmp_path / "ref"))

    out = str(tmp_path / "killed")
    real = pl.Screener.screen_batch
    calls = {"n": 0}

    def dying(self, roots):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-stage")
        return real(self, roots)

    monkeypatch.setattr(pl.Screener, "screen_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, copy_model, index, embedder, out)
    assert not os.path.exists(out)
    assert os.path.isdir(out + ".partial")
    # a torn line from a kill during the write is ignored
    with open(os.path.join(out + ".partial", "progress.jsonl"), "ab") as f:
        f.write(b'{"batch": 1, "recor')
    monkeypatch.setattr(pl.Screener, "screen_batch", real)
    seen = []
    monkeypatch.setattr(
        pl.Screener,
        "screen_batch",
        lambda self, roots: seen.append(len(roots)) or real(self, roots),
    )
    res = run(cfg, copy_model, index, embedder, out)
    assert res["sha256"] == ref["sha256"]
    assert sum(seen) == 12 - 4  # the first batch was not screened again
    assert not os.path.exists(out + ".partial")


def _tree_hash(d) -> dict:
    """relative path -> sha256 of every file under ``d`` (what a command must not touch)."""
    out = {}
    for root, _, files in os.walk(d):
        for n in files:
            p = os.path.join(root, n)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _interrupt_at(monkeypatch, batch: int):
    """Screen_batch raises KeyboardInterrupt on its ``batch``-th call (1-based)."""
    real = pl.Screener.screen_batch
    calls = {"n": 0}

    def dying(self, roots):
        calls["n"] += 1
        if calls["n"] == batch:
            raise KeyboardInterrupt("killed mid-stage")
        return real(self, roots)

    monkeypatch.setattr(pl.Screener, "screen_batch", dying)
    return real


def test_existing_stage_folder_contract(
    tmp_path, make_cfg, synth_corpus, copy_model, index, embedder, monkeypatch
):
    """An existing stage is refused without --overwrite; a folder that is not a stage dataset
    is refused even with it (untouched); --overwrite swaps the new stage in only when it is
    complete (an interrupted overwrite leaves the old one whole)."""
    monkeypatch.setattr(pl, "ROOTS_PER_BATCH", 2)
    cfg = make_cfg(tmp_path, **{"data.num_roots": 4})
    out = str(tmp_path / "st")
    first = run(cfg, copy_model, index, embedder, out)
    with pytest.raises(OutputError, match=r"st: already holds a stage dataset; pass --overwrite"):
        run(cfg, copy_model, index, embedder, out)

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own file")
    for ow in (False, True):
        with pytest.raises(
            OutputError, match=r"mine: holds other files \(notes.txt\), not a stage"
        ):
            pl.screen_stage(cfg, copy_model, index, embedder, str(mine), overwrite=ow)
    assert _tree_hash(mine) == {"notes.txt": hashlib.sha256(b"the user's own file").hexdigest()}
    assert not os.path.exists(str(mine) + ".partial")

    before = _tree_hash(out)
    real = _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        pl.screen_stage(cfg, copy_model, index, embedder, out, model_desc="copy", overwrite=True)
    assert _tree_hash(out) == before  # the old stage is whole until the new one is complete
    monkeypatch.setattr(pl.Screener, "screen_batch", real)
    again = pl.screen_stage(
        cfg, copy_model, index, embedder, out, model_desc="copy", overwrite=True, progress=False
    )
    assert again["sha256"] == first["sha256"]
    assert sorted(os.listdir(tmp_path)) == ["mine", "st"]  # no .partial, .old or .lock left


def test_resume_refused_when_an_input_changed(
    tmp_path, make_cfg, synth_corpus, copy_model, index, embedder, monkeypatch
):
    """A .partial stage is resumed only from the inputs it was screened from: a changed
    model, index, corpus text or config is refused, naming that input; the partial stays."""
    monkeypatch.setattr(pl, "ROOTS_PER_BATCH", 2)
    docs = tmp_path / "docs.jsonl"
    shutil.copy(os.path.join(synth_corpus, "docs.jsonl"), docs)
    cfg = make_cfg(tmp_path, **{"data.num_roots": 4, "corpus.docs": str(docs)})
    out = str(tmp_path / "k")
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        pl.screen_stage(cfg, copy_model, index, embedder, out, model_desc="m", model_id="w1")
    partial = _tree_hash(out + ".partial")

    def resume(c=cfg, idx=index, model_id="w1"):
        pl.screen_stage(c, copy_model, idx, embedder, out, model_desc="m", model_id=model_id)

    with pytest.raises(ResumeError, match=r"k.partial: .*\(the model \(its weights"):
        resume(model_id="w2")
    other = copy.copy(index)
    other.meta = {**index.meta, "sha256": {"faiss.index": "0" * 64}}
    with pytest.raises(ResumeError, match=r"\(the passage index \(.*\) changed\)"):
        resume(idx=other)
    with pytest.raises(ResumeError, match=r"\(the config \(its hash\) changed\)"):
        resume(c=make_cfg(tmp_path, **{"data.num_roots": 4, "corpus.docs": str(docs), "seed": 9}))
    rows = [json.loads(ln) for ln in docs.read_text().splitlines()]
    rows[0]["text"] = rows[0]["text"].replace(" .", " !", 1)  # one root's text edited
    docs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ResumeError, match=r"\(the corpus \(.*docs.jsonl\) changed\)"):
        resume()
    assert _tree_hash(out + ".partial") == partial and not os.path.exists(out)
    os.remove(os.path.join(out + ".partial", "state.json"))  # batches of unknown inputs
    with pytest.raises(ResumeError, match=r"\(the resume key \(state.json is missing"):
        resume()
    for n in os.listdir(out + ".partial"):  # no key and no batch: nothing to mix
        os.remove(os.path.join(out + ".partial", n))
    resume()
    assert os.path.isfile(os.path.join(out, "manifest.json"))


def test_model_with_nan_weights_is_refused_before_screening(
    tmp_path, make_cfg, copy_model, index, embedder
):
    """A model whose weights hold NaN is an error before any screening, not "no positives"
    (and never a manifest holding NaN)."""
    nan_model = copy.copy(copy_model)
    nan_model.head_weight = lambda: torch.full((copy_model.V, copy_model.V), float("nan"))
    cfg = make_cfg(tmp_path, **{"data.num_roots": 2})
    with pytest.raises(ModelError, match="nan-model: the output head's weights hold NaN"):
        pl.screen_stage(cfg, nan_model, index, embedder, str(tmp_path / "s"), "nan-model")
    real = copy_model.final_hidden
    nan_model = copy.copy(copy_model)
    nan_model.final_hidden = lambda t: real(t) * float("nan")
    with pytest.raises(ModelError, match="hidden states of a probe batch are NaN"):
        pl.screen_stage(cfg, nan_model, index, embedder, str(tmp_path / "s"), "nan-model")
    assert os.listdir(tmp_path) == []
    assert pl.non_finite({"a": 1.0, "b": {"c": float("nan"), "d": [0.5, float("inf")]}}) == [
        "b.c",
        "b.d[1]",
    ]


def test_entropylong_and_nextlong_modes(
    tmp_path, make_cfg, synth_corpus, copy_model, index, embedder
):
    # EntropyLong: positives + random fill; NExtLong: no verification, nearest passages only
    el = run(
        make_cfg(tmp_path / "el", **{"screening.negatives": "random"}),
        copy_model,
        index,
        embedder,
        str(tmp_path / "el" / "s"),
    )
    assert el["stats"]["ground_truth"]["recall"] == 1.0
    nx = run(
        make_cfg(
            tmp_path / "nx", **{"screening.verify": "false", "screening.negatives": "nearest"}
        ),
        copy_model,
        index,
        embedder,
        str(tmp_path / "nx" / "s"),
    )
    assert nx["stats"]["positives"] == 0
    assert nx["num_sequences"] == 12
    assert nx["stats"]["candidate_forwards"] == 0


def test_onpolicy_depth_grows_when_positives_are_few(
    tmp_path, make_cfg, synth_corpus, copy_model, index, embedder
):
    short = run(
        make_cfg(tmp_path / "a", **{"data.seq_length": 500}),
        copy_model,
        index,
        embedder,
        str(tmp_path / "a" / "s"),
    )
    long = run(
        make_cfg(tmp_path / "b", **{"data.seq_length": 1400}),
        copy_model,
        index,
        embedder,
        str(tmp_path / "b" / "s"),
    )
    assert long["stats"]["mean_depth_k"] > short["stats"]["mean_depth_k"]
    assert (
        long["stats"]["mean_negatives_per_sequence"] > short["stats"]["mean_negatives_per_sequence"]
    )


def test_no_positives_at_all_is_a_clear_error(
    tmp_path, make_cfg, synth_corpus, index, embedder, tokenizer
):
    class Flat:  # uniform everywhere: nothing reduces entropy
        tp_group = None
        device = __import__("torch").device("cpu")

        def __init__(self):
            self.tokenizer, self.vocab_size = tokenizer, len(tokenizer.get_vocab())

        def head_weight(self):
            import torch

            return torch.eye(self.vocab_size)

        def final_hidden(self, x):
            import torch

            return torch.zeros(*x.shape, self.vocab_size)

    cfg = make_cfg(tmp_path)
    with pytest.raises(pl.ScreeningError, match="no_positives: 12"):
        run(cfg, Flat(), index, embedder, str(tmp_path / "s"))
    assert not os.path.exists(tmp_path / "s")


def test_materialize_matches_assemble(tokenizer):
    from policylong.screening.assemble import assemble

    rng = np.random.default_rng(0)
    root = list(range(10, 40))
    chunks = [
        ("b1", list(range(100, 120)), True),
        ("c1", list(range(200, 250)), False),
        ("c2", list(range(300, 340)), False),
    ]
    a = assemble("r", root, chunks, 100, [3], rng)
    rec = {"root": "r", "order": a.order, "head_trim": a.head_trim}
    toks = {c[0]: c[1] for c in chunks}
    assert pl.materialize(rec, root, toks.__getitem__, 100, [3]) == a.tokens


def test_assemble_never_cuts_a_positive():
    """Random chunk sets whose positives fit in front of A: every positive appears whole and
    contiguous, A sits whole at the end, the length is exactly L, and only negatives are cut
    or dropped. Chunk tokens are unique, so a cut shows as a missing token. The layouts where
    the first negative is dropped and a positive would lead include the case the old head trim
    cut into."""
    from policylong.screening.assemble import assemble

    seen_drop_then_positive = 0
    for trial in range(400):
        rng = np.random.default_rng(trial)
        L, sep = int(rng.integers(120, 400)), [3]
        root = list(range(10, 10 + int(rng.integers(10, 60))))
        budget = L - len(root) - 1
        nxt, chunks = 1000, []
        n_pos, n_neg = int(rng.integers(1, 4)), int(rng.integers(0, 6))
        for j in range(n_pos + n_neg):
            n = int(rng.integers(5, 80))
            chunks.append((f"{'bc'[j >= n_pos]}{j}", list(range(nxt, nxt + n)), j < n_pos))
            nxt += n + 1
        pos_len = sum(len(c[1]) + 1 for c in chunks if c[2])
        total = sum(len(c[1]) + 1 for c in chunks)
        if pos_len > budget or total < budget:
            continue
        a = assemble("r", root, chunks, L, sep, np.random.default_rng(trial + 10_000))
        assert len(a.tokens) == L and a.tokens[-len(root) - 1 :] == root + sep
        head = a.tokens[: L - len(root) - 1]
        for cid, toks, pos in chunks:
            if pos:
                i = head.index(toks[0])
                assert head[i : i + len(toks) + 1] == toks + sep, (trial, cid)
                assert cid in a.order
        if a.head_trim:
            first = next(c for c in chunks if c[0] == a.order[0])
            assert not first[2] and a.head_trim < len(first[1]) + 1, trial
        dropped = [c for c in chunks if c[0] not in a.order]
        assert all(not c[2] for c in dropped), trial
        seen_drop_then_positive += bool(dropped) and a.head_trim > 0
    assert seen_drop_then_positive > 10


def test_verify_negatives_replaces_contradicting_twins(
    tmp_path, make_cfg, synth_corpus, copy_model, index, embedder
):
    """With the copy model, a fact's wrong-value twin among the negatives makes the true value
    less likely at the verified position: verify_negatives replaces it (reason
    ``contradiction``), so no written sequence holds a fact and its twin (counted against the
    planted ground truth), and provenance and the manifest say what was replaced."""
    # two candidates per root: most twins are never verified (so never guard-rejected) and
    # reach the sequence through the positives' secondary retrieval
    few = {"screening.max_candidates": "2"}
    plain = run(make_cfg(tmp_path / "a", **few), copy_model, index, embedder, str(tmp_path / "a/s"))
    cfg = make_cfg(tmp_path / "b", **few, **{"screening.verify_negatives": "true"})
    m = run(cfg, copy_model, index, embedder, str(tmp_path / "b" / "s"))
    before, after = plain["stats"]["ground_truth"], m["stats"]["ground_truth"]
    assert before["sequences_with_contradiction"] > 0, before
    assert after["sequences_with_contradiction"] == 0, after
    assert after["recall"] == before["recall"]
    assert "negatives_replaced" not in plain["stats"]
    got = m["stats"]["negatives_replaced"]
    assert got["contradiction"] > 0
    prov = read_provenance(str(tmp_path / "b" / "s"))
    gtl = {
        json.loads(x)["root"]: json.loads(x)
        for x in open(os.path.join(synth_corpus, "ground_truth.jsonl"))
    }
    twins = {f["wrong_value"] for g in gtl.values() for f in g["facts"]}
    replaced = [x for p in prov for x in p["replaced_negatives"]]
    assert len(replaced) == sum(got.values())
    assert any(x["passage"] in twins and x["reason"] == "contradiction" for x in replaced)
    for p in prov:
        assert set(p["negatives"]).isdisjoint(x["passage"] for x in p["replaced_negatives"])
