"""Shared fixtures: a hand-written copy model, a hashing embedder, a small synthetic workdir."""

from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run on CPU tensors only under the interpreter; set before triton is imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")

from policylong import synthetic as syn  # noqa: E402


class CopyModel:
    """A `LanguageModel` whose entropy is low exactly where the context holds the answer.

    Hidden states live in logit space (d = vocab, head = identity). At position t:

    * if the pair (x_{t-1}, x_t) occurred earlier at (x_{j-1}, x_j), it copies x_{j+1} with
      logit 12 (most recent match): an induction head;
    * else if the grammar puts a value next (``the <attribute> of E is _``), it is uniform
      over every value word
      (entropy ln 800 ≈ 6.7): unpredictable without context;
    * else it is uniform over a fixed set of 8 words (entropy ln 8 ≈ 2.1): predictable text.
    """

    tp_group = None
    device = torch.device("cpu")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        lang = syn.build_language()
        vocab = tokenizer.get_vocab()
        self.V = len(vocab)
        self.vocab_size = self.V
        self.values = torch.tensor(sorted(vocab[v] for a in lang.values.values() for v in a))
        self.w = {w: vocab[w] for w in ("is", "of")}
        self.attr_words = {vocab[t.split()[-6]] for t in syn.ATTRIBUTES.values()}
        self.generic = torch.arange(len(syn.SPECIAL_TOKENS), len(syn.SPECIAL_TOKENS) + 8)
        self.calls = 0

    def head_weight(self) -> torch.Tensor:
        return torch.eye(self.V)

    def final_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        b, s = tokens.shape
        out = torch.full((b, s, self.V), -30.0)
        for i in range(b):
            x = tokens[i].tolist()
            last: dict[tuple[int, int], int] = {}
            for t in range(s):
                key = (x[t - 1] if t else -1, x[t])
                j = last.get(key)
                if j is not None and j + 1 < s:
                    out[i, t, :] = 0.0
                    out[i, t, x[j + 1]] = 12.0
                elif self._value_next(x, t):
                    out[i, t, self.values] = 0.0
                else:
                    out[i, t, self.generic] = 0.0
                last[key] = t
        return out

    def _value_next(self, x: list[int], t: int) -> bool:
        """``the <attribute> of E is _``: the grammar puts a value next."""
        w = self.w
        return x[t] == w["is"] and t >= 3 and x[t - 2] == w["of"] and x[t - 3] in self.attr_words


class HashingEmbedder:
    """Bag-of-words hashing embedder (deterministic, no model): enough for retrieval on the
    synthetic language, where passages and fragments share entity and value words."""

    name = "hashing"
    path = "hashing"

    def __init__(self, dim: int = 4096):
        self.dim = dim

    def encode(self, texts, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                if len(w) < 3 or w in ("the", "and", "was"):
                    continue
                h = int(hashlib.md5(w.encode()).hexdigest()[:8], 16)
                out[i, h % self.dim] += 1.0
        n = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(n, 1e-12)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    syn.build_tokenizer(str(d))
    return str(d)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from policylong.corpus import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    syn.generate_corpus(str(d), num_roots=12, seed=3)
    return str(d)


@pytest.fixture()
def copy_model(tokenizer):
    return CopyModel(tokenizer)


@pytest.fixture(scope="session")
def embedder():
    return HashingEmbedder()


@pytest.fixture(scope="session")
def index(synth_corpus, embedder):
    from policylong.corpus import read_documents
    from policylong.retrieval import PassageIndex

    docs = read_documents(os.path.join(synth_corpus, "passages.jsonl"))
    return PassageIndex.build([d.id for d in docs], [d.text for d in docs], embedder)


@pytest.fixture(scope="session")
def make_cfg(synth_corpus):
    """Config for the 12-root synthetic corpus; keyword overrides are dotted keys."""
    from policylong.config import load_config

    def make(workdir, **over):
        c = synth_corpus
        sets = [
            f"workdir={workdir}",
            f"corpus.docs={c}/docs.jsonl",
            f"corpus.passages={c}/passages.jsonl",
            f"corpus.ground_truth={c}/ground_truth.jsonl",
            "screening.position_mode=sigma",
            "screening.top_k=16",
            "data.seq_length=700",
        ]
        sets += [f"{k}={v}" for k, v in over.items()]
        return load_config(None, sets)

    return make
