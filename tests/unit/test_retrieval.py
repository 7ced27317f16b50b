"""PassageIndex over FAISS (flat and IVF), its on-disk round trip, and the offline embedder."""

from __future__ import annotations

import numpy as np
import pytest

from policylong.corpus import read_documents
from policylong.retrieval import Embedder, PassageIndex


@pytest.fixture(scope="module")
def passages(synth_corpus):
    import os

    docs = read_documents(os.path.join(synth_corpus, "passages.jsonl"))
    return [d.id for d in docs], [d.text for d in docs]


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW16"])
def test_build_search_save_load(tmp_path, passages, embedder, factory):
    ids, texts = passages
    idx = PassageIndex.build(ids, texts, embedder, factory=factory, nprobe=4)
    q = embedder.encode(texts[:20])
    s1, r1 = idx.search(q, 5)
    assert r1.shape == (20, 5)
    if factory == "Flat":  # exact search: each passage is its own nearest neighbour
        assert (r1[:, 0] == np.arange(20)).all()
        # scores are cosines, descending
        assert (np.diff(s1, axis=1) <= 1e-6).all() and np.allclose(s1[:, 0], 1.0, atol=1e-5)
    idx.save(str(tmp_path / "index"))
    back = PassageIndex.load(str(tmp_path / "index"))
    s2, r2 = back.search(q, 5)
    assert (r1 == r2).all() and np.allclose(s1, s2)
    assert back.ids == ids and back.texts == texts
    assert back.meta["factory"] == factory


def test_bad_factory_names_the_field(passages, embedder):
    ids, texts = passages
    with pytest.raises(ValueError, match="retrieval.index_factory"):
        PassageIndex.build(ids, texts, embedder, factory="NotAnIndex")


def test_duplicate_or_empty_passages(embedder):
    with pytest.raises(ValueError, match="unique"):
        PassageIndex.build(["a", "a"], ["x", "y"], embedder)
    with pytest.raises(ValueError, match="zero passages"):
        PassageIndex.build([], [], embedder)


def test_default_embedder_is_offline_and_normalised():
    e = Embedder("default")
    v = e.encode(
        [
            "the access code of zorvak is ka417",
            "zorvak has the access code ka417",
            "the weather was calm that day",
        ]
    )
    assert v.shape == (3, e.dim) and e.dim == 384
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # a paraphrase is nearer than an unrelated sentence
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    with pytest.raises(FileNotFoundError, match="embedder model directory"):
        Embedder("/nonexistent/model")
