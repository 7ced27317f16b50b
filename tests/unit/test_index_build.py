"""`policylong index` at scale, in one process with the stand-in embedder: the sharded build
against the in-memory one, the memory-mapped passage store, bad shards and inputs refused
before any merge, resume, the index folder's safety, and the embedder fingerprint."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from policylong.cli import main
from policylong.config import load_config
from policylong.passage_store import Column, RowLookup, StoreError, write_lookup, write_store
from policylong.retrieval import (
    HashEmbedder,
    IndexError_,
    PassageIndex,
    ShardedBuild,
    _Group,
    build_index,
    embedder_identity,
    swap_in,
)
from policylong.synthetic import generate_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("idxcorpus")
    generate_corpus(str(d / "corpus"), num_roots=20, seed=1)  # 187 passages
    return str(d / "corpus")


def _cfg(wd, corpus, index_dir="index", **retrieval):
    sets = [
        f"workdir={wd}",
        f"corpus.passages={corpus}/passages.jsonl",
        "retrieval.embedder=hash:64",
        f"retrieval.index_dir={index_dir}",
    ] + [f"retrieval.{k}={v}" for k, v in retrieval.items()]
    return load_config(None, sets)


def _top10(index, texts):
    q = HashEmbedder(64).encode(texts)
    return [[index.ids[r] for r in row] for row in index.search(q, 10)[1]]


@pytest.mark.parametrize("factory", ["IVF4,PQ8x4np", "Flat"])
def test_sharded_build_equals_in_memory_build(tmp_path, corpus, factory):
    """Shards of 32 (6 shards; IVF: 6 blocks merged on disk) return the in-memory build's top-10
    for every passage as query; the store is memory-mapped and looks ids up by binary search."""
    mem = PassageIndex.load(build_index(_cfg(tmp_path, corpus, "mem", index_factory=factory)))
    sh = PassageIndex.load(
        build_index(_cfg(tmp_path, corpus, "sh", index_factory=factory, shard_size=32))
    )
    assert "shards" not in mem.meta and len(sh.meta["shards"]) == 6
    assert ("merged.ivfdata" in os.listdir(tmp_path / "sh")) == factory.startswith("IVF")
    assert sorted(os.listdir(tmp_path)) == ["mem", "sh"]  # no work folder left behind
    texts = list(mem.texts)
    assert _top10(sh, texts) == _top10(mem, texts)
    if factory.startswith("IVF"):
        assert sh.meta["train"] == mem.meta["train"] and sh.meta["train"]["rows"] == 187
    # the store: memory-mapped columns, id -> row by binary search, rows as in the corpus
    assert isinstance(sh.texts, Column) and isinstance(sh.row, RowLookup)
    src = [json.loads(x) for x in open(os.path.join(corpus, "passages.jsonl"))]
    assert list(sh.ids) == [o["id"] for o in src] and sh.texts[5] == src[5]["text"].strip()
    assert all(sh.row[o["id"]] == i for i, o in enumerate(src))
    assert "nope" not in sh.row and sh.texts[-1] == sh.texts[len(sh) - 1]
    ident = sh.meta["embedder_identity"]
    assert ident["name"] == "hash:64" and ident == embedder_identity(HashEmbedder(64))


def _work(tmp_path, n=150, dup=None):
    """A work folder with a passage store of ``n`` passages (``dup``: rows given one id)."""
    work = str(tmp_path / "w.partial")
    os.makedirs(work)
    ids = [f"p{i}" for i in range(n)]
    if dup:
        ids[dup[1]] = ids[dup[0]]
    texts = [f"topic{i % 7} word{i} word{i * 3 % 11}" for i in range(n)]
    write_store(os.path.join(work, "passages.arrow"), zip(ids, texts))
    write_lookup(os.path.join(work, "passages.arrow"), os.path.join(work, "passages.ids.arrow"), 32)
    return work


def _build(work, emb, factory="IVF4,Flat", n=150):
    return ShardedBuild(
        work, emb, embedder_identity(emb), factory, 0, 32, 1000, 4, n, "store", _Group()
    )


def test_bad_shards_are_refused_before_any_merge(tmp_path):
    work = _work(tmp_path)
    a = _build(work, HashEmbedder(64))
    a.embed_shards()
    a.check_shards()
    # a shard written by another embedder of the same name and dimension
    other = _work(tmp_path / "o")
    b = _build(other, HashEmbedder(64, seed=1))
    b.embed_shards()
    for ext in ("npy", "json"):
        shutil.copy(b.emb_path(1)[:-3] + ext, a.emb_path(1)[:-3] + ext)
    with pytest.raises(IndexError_, match=r"emb_00001.npy: embedded by hash:64 \(fingerprint"):
        a.check_shards()
    with pytest.raises(IndexError_, match="emb_00001.npy: embedded by .* delete it"):
        a.embed_shards()  # a rerun does not embed over it either
    # a missing shard, and one rewritten since its sidecar
    a2 = _build(other, HashEmbedder(64, seed=1))
    os.remove(a2.emb_path(2))
    with pytest.raises(IndexError_, match=r"emb_00002.npy: missing \(embedding shard 2, rows 64"):
        a2.check_shards()
    a2.embed_shards()  # the rerun re-embeds exactly the missing shard
    np.save(a2.emb_path(3), np.zeros((32, 64), np.float32))
    with pytest.raises(IndexError_, match="emb_00003.npy: sha256 does not match"):
        a2.check_shards()
    # blocks of another factory
    w3 = _work(tmp_path / "f")
    c = _build(w3, HashEmbedder(64), "IVF4,Flat")
    c.embed_shards()
    c.train()
    c.add_blocks()
    c.check_blocks()
    d = _build(w3, HashEmbedder(64), "IVF4,PQ8x4np")
    with pytest.raises(IndexError_, match="block_00000.index: built for factory 'IVF4,Flat'"):
        d.check_blocks()


def test_repeated_passage_id_names_both_shards(tmp_path, corpus):
    with pytest.raises(
        StoreError,
        match=r"'p3' is repeated: rows 3 and 70 \(embedding shards 0 "
        r"and 2\)",
    ):
        _work(tmp_path, dup=(3, 70))
    # through `policylong index`: refused when the store is written, before any embedding
    wd = tmp_path / "wd"
    os.makedirs(wd / "corpus")
    words = "the archive of the northern valley keeps records of every harvest and flood"
    rows = [{"id": f"d{i}", "text": f"{words} ({i}). " * 3} for i in range(40)]
    rows[33]["id"] = "d5"
    with open(wd / "corpus" / "passages.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    cfg = _cfg(wd, str(wd / "corpus"), shard_size=16)
    with pytest.raises(
        IndexError_,
        match=r"'d5' is repeated: rows 5 and 33 \(embedding shards "
        r"0 and 2\)",
    ):
        build_index(cfg)
    assert not os.path.exists(wd / "index.partial" / "shards")


def test_interrupted_build_resumes_to_the_same_bytes_and_refuses_changed_inputs(
    tmp_path, corpus, monkeypatch
):
    ref = build_index(_cfg(tmp_path, corpus, "ref", index_factory="IVF4,PQ8x4np", shard_size=32))
    calls = []

    def interrupted(self):
        calls.append(1)
        raise KeyboardInterrupt  # as if killed after embedding and training

    cfg = _cfg(tmp_path, corpus, "idx", index_factory="IVF4,PQ8x4np", shard_size=32)
    with monkeypatch.context() as m:
        m.setattr(ShardedBuild, "add_blocks", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build_index(cfg)
    assert calls and os.path.isdir(tmp_path / "idx.partial" / "shards")
    changed = _cfg(tmp_path, corpus, "idx", index_factory="IVF8,PQ8x4np", shard_size=32)
    with pytest.raises(
        IndexError_,
        match=r"idx.partial: an interrupted build with other inputs "
        r"\(factory: 'IVF4,PQ8x4np', now 'IVF8,PQ8x4np'\)",
    ):
        build_index(changed)
    out = build_index(cfg)
    for n in os.listdir(ref):
        assert open(os.path.join(out, n), "rb").read() == open(os.path.join(ref, n), "rb").read()


def test_index_folder_safety(tmp_path, corpus, caplog):
    base = [
        "index",
        "--workdir",
        str(tmp_path),
        "--set",
        f"corpus.passages={corpus}/passages.jsonl",
        "--set",
        "retrieval.embedder=hash:64",
    ]
    os.makedirs(tmp_path / "index")
    (tmp_path / "index" / "notes.txt").write_text("mine")
    assert main(base) == 2
    assert "index: not a passage index (holds notes.txt); refusing to replace it" in caplog.text
    assert (tmp_path / "index" / "notes.txt").read_text() == "mine"
    os.remove(tmp_path / "index" / "notes.txt")
    assert main(base) == 0
    caplog.clear()
    assert main(base) == 2
    assert "holds a passage index (187 passages, Flat, hash:64); pass --overwrite" in caplog.text
    before = open(tmp_path / "index" / "meta.json").read()
    # a bad factory and an unwritable folder: found before any passage is embedded
    calls = []
    orig = HashEmbedder.encode
    HashEmbedder.encode = lambda self, t, progress=False: calls.append(len(t)) or orig(self, t)
    try:
        caplog.clear()
        assert main([*base, "--overwrite", "--set", "retrieval.index_factory=IVF4,Nope"]) == 2
        assert "retrieval.index_factory = 'IVF4,Nope': FAISS rejected it" in caplog.text
        (tmp_path / "afile").write_text("x")
        caplog.clear()
        assert main([*base, "--set", "retrieval.index_dir=afile/index"]) == 2
        assert "afile/index.partial: cannot write the index here" in caplog.text
    finally:
        HashEmbedder.encode = orig
    assert calls == [1]  # only the fingerprint probe
    assert open(tmp_path / "index" / "meta.json").read() == before
    assert main([*base, "--overwrite", "--set", "retrieval.index_factory=IVF4,Flat"]) == 0
    assert PassageIndex.load(str(tmp_path / "index")).meta["factory"] == "IVF4,Flat"
    assert sorted(os.listdir(tmp_path)) == ["afile", "index"]


def test_swap_never_leaves_no_index(tmp_path, index):
    d = str(tmp_path / "index")
    index.save(d)
    index.save(d)  # replaces
    # a kill between the two renames of a swap: only DIR.old is left
    os.replace(d, d + ".old")
    with pytest.raises(IndexError_, match=r"index.old holds the previous index"):
        PassageIndex.load(d)
    os.makedirs(d + ".partial")
    with open(os.path.join(d + ".partial", "x"), "w") as f:
        f.write("new")
    swap_in(d + ".partial", d)  # the next swap restores it first, then replaces it
    assert os.listdir(d) == ["x"] and not os.path.exists(d + ".old")


def test_legacy_jsonl_store_is_read(tmp_path, index):
    """An index folder of the previous format (passages.jsonl, no fingerprint) still opens."""
    d = tmp_path / "old"
    index.save(str(d))
    with open(d / "passages.jsonl", "w") as f:
        for pid, text in zip(index.ids, index.texts):
            f.write(json.dumps({"id": pid, "text": text}) + "\n")
    meta = json.loads((d / "meta.json").read_text())
    for n in ("passages.arrow", "passages.ids.arrow"):
        os.remove(d / n)
        del meta["sha256"][n], meta["bytes"][n]
    del meta["embedder_identity"]
    (d / "meta.json").write_text(json.dumps(meta))
    old = PassageIndex.load(str(d))
    assert isinstance(old.ids, list) and old.ids == list(index.ids)
    assert old.row[index.ids[4]] == 4


def test_screening_refuses_an_index_of_another_embedder(index, embedder, make_cfg, tmp_path):
    from policylong.screening.pipeline import Screener, ScreeningError

    cfg = make_cfg(str(tmp_path))
    tok = type("Tok", (), {})  # the check comes before any use of the tokenizer
    other = HashEmbedder(embedder.dim)  # same dimension, another model
    with pytest.raises(
        ScreeningError,
        match=r"built with embedder hashing \(hashing, fingerprint "
        r"\w+\) but retrieval.embedder is hash:4096",
    ):
        Screener(cfg, None, index, other, tok)
