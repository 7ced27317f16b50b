"""PassageIndex over FAISS (flat, IVF, HNSW), its on-disk round trip, approximate indexes
recall against exact search, and the offline embedder."""

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


class ClusteredVectors:
    """An embedder over fixed vectors: ``n`` unit vectors around 40 random centres in 32-d, so
    approximate indexes have neighbourhoods to miss. Text ``p<i>`` is vector i."""

    name = path = "clustered"
    dim = 32

    def __init__(self, n: int = 3000, seed: int = 0):
        rng = np.random.default_rng(seed)
        centres = rng.normal(size=(40, self.dim))
        x = centres[rng.integers(0, 40, n)] + 0.6 * rng.normal(size=(n, self.dim))
        self.vectors = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def encode(self, texts, progress: bool = False) -> np.ndarray:
        # any other text (the index's fingerprint probe) is vector 0
        return self.vectors[[int(t[1:]) if t[1:].isdigit() else 0 for t in texts]]


def _recall_at_5(index, exact, queries) -> float:
    _, got = index.search(queries, 5)
    _, ref = exact.search(queries, 5)
    return float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got, ref)]))


@pytest.mark.parametrize("factory, breadth", [("IVF32,Flat", 8), ("HNSW16", 32)])
def test_approximate_indexes_find_the_exact_neighbours(tmp_path, factory, breadth):
    """recall@5 against a flat index on 300 perturbed queries: >= 0.9 at the configured search
    breadth (``retrieval.nprobe``: IVF lists probed, HNSW efSearch; measured 0.97 and 0.92),
    kept across save/load, and well below at breadth 1 (0.69 for IVF: the knob is applied)."""
    emb = ClusteredVectors()
    ids = [f"p{i}" for i in range(len(emb.vectors))]
    exact = PassageIndex.build(ids, ids, emb, factory="Flat")
    rng = np.random.default_rng(1)
    q = emb.vectors[:300] + 0.3 * rng.normal(size=(300, emb.dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    approx = PassageIndex.build(ids, ids, emb, factory=factory, nprobe=breadth)
    assert _recall_at_5(approx, exact, q) >= 0.9
    approx.save(str(tmp_path / "index"))
    assert _recall_at_5(PassageIndex.load(str(tmp_path / "index")), exact, q) >= 0.9
    narrow = PassageIndex.build(ids, ids, emb, factory=factory, nprobe=1)
    assert _recall_at_5(narrow, exact, q) < 0.85


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
