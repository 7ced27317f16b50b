"""Bad input stops with a message that names the file / field, and writes nothing partial."""

from __future__ import annotations

import json
import os

import pytest

from policylong.cli import main
from policylong.passage_store import write_lookup, write_store
from policylong.retrieval import IndexError_, PassageIndex
from policylong.screening import pipeline as pl


def test_cli_names_the_bad_field(capsys, caplog):
    assert main(["screen", "--set", "screening.tau_pos=1.5", "--out", "/tmp/x"]) == 2
    assert "screening.tau_pos" in caplog.text
    caplog.clear()
    assert main(["screen", "--set", "data.seq_length=100"]) == 2
    assert "data.seq_length" in caplog.text


def test_cli_missing_model_dir(tmp_path, caplog):
    rc = main(
        [
            "screen",
            "--workdir",
            str(tmp_path),
            "--model",
            str(tmp_path / "no_model"),
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert rc == 2
    assert "no_model: model directory not found" in caplog.text
    assert not os.path.exists(tmp_path / "s")


def test_cli_missing_and_empty_corpus(tmp_path, tokenizer_dir, caplog):
    base = ["index", "--workdir", str(tmp_path), "--set", f"model.path={tokenizer_dir}"]
    assert main(base) == 2
    assert "passages.jsonl: corpus not found" in caplog.text
    os.makedirs(tmp_path / "corpus")
    (tmp_path / "corpus" / "passages.jsonl").write_text("\n")
    caplog.clear()
    assert main(base) == 2
    assert "passages.jsonl: the corpus is empty" in caplog.text
    assert not os.path.exists(tmp_path / "index")


def test_corrupt_index(tmp_path, index):
    d = str(tmp_path / "index")
    index.save(d)
    PassageIndex.load(d)  # intact
    with open(os.path.join(d, "faiss.index"), "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xff\xff")
    with pytest.raises(IndexError_, match="faiss.index: sha256 .* corrupt"):
        PassageIndex.load(d)
    # a store that no longer matches the vectors, even with verification off
    store = os.path.join(d, "passages.arrow")
    write_store(store, [*zip(index.ids, index.texts), ("extra", "x")])
    write_lookup(store, os.path.join(d, "passages.ids.arrow"))
    with pytest.raises(IndexError_, match="holds .* vectors but the store"):
        PassageIndex.load(d, verify=False)
    os.remove(os.path.join(d, "meta.json"))
    with pytest.raises(IndexError_, match="meta.json is missing"):
        PassageIndex.load(d)
    with pytest.raises(IndexError_, match="no passage index"):
        PassageIndex.load(str(tmp_path / "nothing"))


def test_documents_shorter_than_the_query_window(
    tmp_path, make_cfg, copy_model, index, embedder, synth_corpus
):
    docs = tmp_path / "short.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"id": f"d{i}", "text": "nobody was in a hurry ."}) + "\n" for i in range(3)
        )
    )
    cfg = make_cfg(tmp_path, **{"corpus.docs": str(docs)})
    with pytest.raises(
        pl.ScreeningError,
        match=r"short.jsonl: no root document has the 25 "
        r"tokens a query window \(screening.window=12\)",
    ):
        pl.screen_stage(cfg, copy_model, index, embedder, str(tmp_path / "s"), progress=False)
    assert not os.path.exists(tmp_path / "s")


def test_too_few_roots(tmp_path, make_cfg, copy_model, index, embedder):
    cfg = make_cfg(tmp_path, **{"data.num_roots": 50})
    with pytest.raises(pl.ScreeningError, match="needs 50 documents but the corpus has 12"):
        pl.screen_stage(cfg, copy_model, index, embedder, str(tmp_path / "s"), progress=False)


def test_embedder_index_mismatch(tmp_path, make_cfg, copy_model, index):
    from conftest import HashingEmbedder

    with pytest.raises(pl.ScreeningError, match="128-d vectors but the index"):
        pl.Screener(make_cfg(tmp_path), copy_model, index, HashingEmbedder(128))


def test_short_documents_are_skipped_and_counted(
    tmp_path, make_cfg, copy_model, index, embedder, synth_corpus
):
    docs = tmp_path / "mixed.jsonl"
    lines = open(os.path.join(synth_corpus, "docs.jsonl")).read().splitlines()[:4]
    lines.append(json.dumps({"id": "tiny", "text": "nobody was in a hurry ."}))
    docs.write_text("\n".join(lines) + "\n")
    cfg = make_cfg(tmp_path, **{"corpus.docs": str(docs)})
    m = pl.screen_stage(cfg, copy_model, index, embedder, str(tmp_path / "s"), progress=False)
    assert m["stats"]["skipped"]["too_short"] == 1
    assert m["stats"]["roots"] == 5
