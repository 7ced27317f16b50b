"""Passage index at scale: build time and peak memory, screening's memory to open the index
and fetch passages, and IVF-PQ recall@10 against exact search, for growing synthetic corpora.

    python benchmarks/bench_index.py --sizes 100000 1000000          # stand-in embedder
    python benchmarks/bench_index.py --real 256                      # the real embedder's rate

Passages are synthetic (~40 words drawn from one of 1,000 topics of 300 words each) and
embedded by the stand-in ``hash:<dim>`` (``retrieval.HashEmbedder``), so 10^6+ passages are
feasible on two cores; chunking is skipped (``build_index(passages=...)``). Each build and
each screening open runs in a fresh process so its memory is its own; memory is sampled every
0.1 s: ``anon`` is RssAnon (what needs RAM), ``rss`` is VmRSS (adds mapped file pages, which
the kernel can drop). Rows go to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rows import append_rows, run_meta  # noqa: E402

PER_TOPIC, TOPIC_WORDS, COMMON_WORDS, WORDS = 10, 60, 5000, 40


def passages(n: int, seed: int = 0, prefix: str = "p", topics: int | None = None):
    """``n`` synthetic ``(id, text)`` pairs, deterministic in ``seed``: passage i is about
    topic i // 10 (so ~10 passages share a topic whatever n); 3/4 of its 40 words come from its
    topic's 60 words, 1/4 from 5,000 common words. Exact top-10 of a query about a topic is
    its topic's passages: a neighbourhood an approximate index can find or miss."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_topics = topics or max(1, n // PER_TOPIC)
    for s in range(0, n, 10000):
        m = min(10000, n - s)
        if topics:  # queries: random topics of the corpus
            topic = rng.integers(0, n_topics, m)
        else:
            topic = (s + np.arange(m)) // PER_TOPIC
        words = rng.integers(0, TOPIC_WORDS, (m, WORDS))
        common = rng.integers(0, COMMON_WORDS, (m, WORDS))
        shared = rng.random((m, WORDS)) < 0.25
        for i in range(m):
            t = topic[i]
            text = " ".join(
                f"c{c}" if sh else f"t{t}w{w}" for w, c, sh in zip(words[i], common[i], shared[i])
            )
            yield f"{prefix}{s + i}", text


class MemSampler:
    """Peak RssAnon and VmRSS of this process, sampled every 0.1 s."""

    def __init__(self):
        self.peak = {"anon": 0.0, "rss": 0.0}
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @staticmethod
    def now() -> dict:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "VmRSS"):
                    out["anon" if k == "RssAnon" else "rss"] = int(v.split()[0]) / 1024
        return out

    def _run(self):
        while not self._stop:
            for k, v in self.now().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(0.1)

    def stop(self) -> dict:
        self._stop = True
        self._t.join()
        for k, v in self.now().items():
            self.peak[k] = max(self.peak[k], v)
        return {k: round(v, 1) for k, v in self.peak.items()}


def _cfg(wd: str, a):
    from policylong.config import load_config

    return load_config(
        None,
        [
            f"workdir={wd}",
            f"retrieval.embedder=hash:{a.dim}",
            f"retrieval.index_factory={a.factory}",
            f"retrieval.nprobe={a.nprobe}",
            f"retrieval.shard_size={a.shard_size}",
            f"retrieval.train_size={a.train_size}",
        ],
    )


def child_build(n: int, wd: str, a) -> dict:
    import faiss

    from policylong.retrieval import build_index

    faiss.omp_set_num_threads(a.threads)
    base = MemSampler.now()
    mem = MemSampler()
    t0 = time.time()
    out = build_index(
        _cfg(wd, a), keep_shards=True, passages=(f"synthetic:{n}", lambda: passages(n))
    )
    dt = time.time() - t0
    peak = mem.stop()
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    return {
        "build_seconds": round(dt, 1),
        "build_s_per_million": round(dt / (n / 1e6), 1),
        "build_peak_anon_mb": peak["anon"],
        "build_peak_rss_mb": peak["rss"],
        "build_base_rss_mb": round(base["rss"], 1),
        "index_bytes": meta["bytes"],
    }


def child_screen(n: int, wd: str, a) -> dict:
    """Open the index as screening does, fetch 2,000 passages by row and 2,000 by id, run
    200 queries; memory over this process's baseline (after imports). recall@10 of the same
    queries against exact inner-product search over the kept embedding shards."""
    import faiss
    import numpy as np

    from policylong.retrieval import HashEmbedder, PassageIndex

    faiss.omp_set_num_threads(a.threads)
    emb = HashEmbedder(a.dim)
    queries = emb.encode(
        [t for _, t in passages(200, seed=1, prefix="q", topics=max(1, n // PER_TOPIC))]
    )
    base = MemSampler.now()
    mem = MemSampler()
    t0 = time.time()
    index = PassageIndex.load(os.path.join(wd, "index"), use_gpu="no")
    open_s = time.time() - t0
    rng = np.random.default_rng(2)
    rows = rng.integers(0, len(index), 2000)
    t0 = time.time()
    nchars = sum(len(index.texts[int(r)]) for r in rows)
    ids = [index.ids[int(r)] for r in rows]
    assert all(index.row[i] == int(r) for i, r in zip(ids, rows))
    fetch_ms = (time.time() - t0) / 4000 * 1e3
    opened = MemSampler.now()  # open + fetch: what must stay flat in the corpus size
    t0 = time.time()
    _, got = index.search(queries, 10)
    search_ms = (time.time() - t0) / len(queries) * 1e3
    after = MemSampler.now()
    peak = mem.stop()
    # exact top-10, shard by shard (never all vectors at once)
    shards = sorted(os.listdir(os.path.join(wd, "index.shards")))
    best_s = np.full((len(queries), 10), -np.inf, np.float32)
    best_r = np.zeros((len(queries), 10), np.int64)
    off = 0
    for name in (s for s in shards if s.endswith(".npy")):
        v = np.load(os.path.join(wd, "index.shards", name), mmap_mode="r")
        sc = queries @ np.asarray(v).T
        s = np.concatenate([best_s, sc], axis=1)
        r = np.concatenate([best_r, np.arange(off, off + len(v))[None].repeat(len(queries), 0)], 1)
        top = np.argsort(-s, axis=1, kind="stable")[:, :10]
        best_s, best_r = np.take_along_axis(s, top, 1), np.take_along_axis(r, top, 1)
        off += len(v)
    recall = float(np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got, best_r)]))
    recall1 = float(np.mean([e[0] in set(g) for g, e in zip(got, best_r)]))
    return {
        "open_seconds": round(open_s, 2),
        "fetch_ms": round(fetch_ms, 3),
        "search_ms": round(search_ms, 2),
        "fetched_chars": nchars,
        "screen_base_rss_mb": round(base["rss"], 1),
        "open_fetch_rss_mb": round(opened["rss"], 1),
        "open_fetch_delta_rss_mb": round(opened["rss"] - base["rss"], 1),
        "open_fetch_delta_anon_mb": round(opened["anon"] - base["anon"], 1),
        # searching maps the probed inverted lists: file pages, nprobe/nlist of the lists
        "after_search_delta_rss_mb": round(after["rss"] - base["rss"], 1),
        "after_search_delta_anon_mb": round(after["anon"] - base["anon"], 1),
        "screen_peak_delta_rss_mb": round(peak["rss"] - base["rss"], 1),
        "recall_at_10": round(recall, 3),
        "recall_1_at_10": round(recall1, 3),
        "nprobe": a.nprobe,
    }


def real_rate(n: int) -> dict:
    """passages/s of the real embedder (all-MiniLM-L6-v2) on ~256-word passages (it truncates
    at 256 word pieces: the paper's 512-token passages cost about what these cost)."""
    import torch

    from policylong.retrieval import Embedder

    texts = [
        " ".join(f"word{(i * 7 + k) % 5000} of the record" for k in range(64)) for i in range(n)
    ]
    e = Embedder()
    e.encode(texts[:16])
    t0 = time.time()
    e.encode(texts)
    dt = time.time() - t0
    return {
        "case": "real_embedder",
        "passages": n,
        "threads": torch.get_num_threads(),
        "device": str(e.model.device),
        "passages_per_s": round(n / dt, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--factory", default="IVF1024,PQ32np")
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=65536)
    ap.add_argument("--train-size", type=int, default=40960)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--real", type=int, default=0, help="passages for the real embedder's rate")
    ap.add_argument("--root", default="/tmp/bench_index")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args()
    if a.child:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        kind, n, wd = a.child
        fn = child_build if kind == "build" else child_screen
        print("ROW " + json.dumps(fn(int(n), wd, a)), flush=True)
        return
    rows = []
    if a.real:
        rows.append(real_rate(a.real))
        print(json.dumps(rows[-1]))
    flags = [
        f"--dim={a.dim}",
        f"--factory={a.factory}",
        f"--nprobe={a.nprobe}",
        f"--shard-size={a.shard_size}",
        f"--train-size={a.train_size}",
        f"--threads={a.threads}",
    ]
    for n in a.sizes:
        wd = os.path.join(a.root, str(n))
        os.makedirs(a.root, exist_ok=True)
        shutil.rmtree(wd, ignore_errors=True)
        os.makedirs(wd)
        row = {
            "case": "scale",
            "passages": n,
            "dim": a.dim,
            "factory": a.factory,
            "shard_size": a.shard_size,
            "train_size": a.train_size,
        }
        for kind in ("build", "screen"):
            r = subprocess.run(
                [sys.executable, __file__, *flags, "--child", kind, str(n), wd],
                capture_output=True,
                text=True,
            )
            line = [x for x in r.stdout.splitlines() if x.startswith("ROW ")]
            with open(os.path.join(a.root, f"{kind}_{n}.log"), "w") as f:
                f.write(r.stderr)
            if r.returncode != 0 or not line:
                raise SystemExit(f"{kind} {n} failed:\n{r.stderr[-4000:]}")
            row.update(json.loads(line[0][4:]))
            steps = [x for x in r.stderr.splitlines() if "seconds per step" in x]
            if steps:
                row["build_steps_s"] = json.loads(steps[-1].split("seconds per step: ")[1])
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(wd, ignore_errors=True)
    if not a.no_save:
        append_rows(rows, run_meta("index", cuda=False))


if __name__ == "__main__":
    main()
