"""`policylong index` sharded under torchrun (gloo, CPU) with the real embedder: the 2-process
build returns the same top-10 passages as the one-process build, and a build killed with
SIGKILL mid-way resumes to the same bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_megatron import _free_port

pytestmark = pytest.mark.distributed

FILES = ("faiss.index", "merged.ivfdata", "passages.arrow", "passages.ids.arrow", "meta.json")


def _cmd(wd: str, index_dir: str, nproc: int) -> list[str]:
    # 24 roots -> ~230 passages in shards of 32: 8 shards, so each rank embeds 4; IVF8 with
    # 4-bit PQ: trainable on 230 vectors, and the on-disk merge path of large corpora
    sets = [
        f"retrieval.index_dir={index_dir}",
        "retrieval.shard_size=32",
        "retrieval.index_factory=IVF8,PQ16x4np",
        "retrieval.nprobe=8",
    ]
    args = ["index", "--workdir", wd, *[x for s in sets for x in ("--set", s)]]
    if nproc == 1:
        return [sys.executable, "-m", "policylong.cli", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={_free_port()}",
        "-m",
        "policylong.cli",
        *args,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(cmd, log):
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, timeout=300)
    assert r.returncode == 0, open(log).read()[-6000:]


def _bytes(d: str) -> dict:
    return {n: open(os.path.join(d, n), "rb").read() for n in FILES}


def _one_process_build(wd: str) -> str:
    """The same build in this process, on one thread like each torchrun worker
    (OMP_NUM_THREADS=1): thread count changes the embedder's float rounding."""
    import faiss
    import torch

    from policylong.cli import _config, build_parser
    from policylong.retrieval import build_index

    args = build_parser().parse_args(_cmd(wd, "one", 1)[3:])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        return build_index(_config(args))
    finally:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (torchrun's workers run in sessions of their own)."""
    kids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [pid] + [q for c in kids.stdout.split() for q in _tree(int(c))]


def test_two_ranks_killed_and_resumed_equal_one_process(tmp_path):
    """The 2-rank build, SIGKILLed (launcher and both workers) after 3 of its 8 shards and
    rerun, writes the bytes of the uninterrupted one-process build: the same index, so the same
    top-10 for every query."""
    from policylong.retrieval import PassageIndex
    from policylong.synthetic import generate_corpus

    wd = str(tmp_path)
    generate_corpus(os.path.join(wd, "corpus"), num_roots=24, seed=11)
    one = _one_process_build(wd)

    killed = os.path.join(wd, "two")
    shard = os.path.join(killed + ".partial", "shards", "emb_00002.json")
    with open(tmp_path / "killed.log", "w") as f:
        p = subprocess.Popen(_cmd(wd, "two", 2), stdout=f, stderr=subprocess.STDOUT, env=ENV)
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None and not os.path.exists(shard):
            time.sleep(0.02)
        assert p.poll() is None, "the build finished before it could be killed"
        for pid in _tree(p.pid):
            os.kill(pid, signal.SIGKILL)
        p.wait()
    time.sleep(0.5)  # the workers' exit
    assert not os.path.exists(killed) and os.path.exists(shard)
    n_done = len([n for n in os.listdir(os.path.dirname(shard)) if n.endswith(".npy")])
    _run(_cmd(wd, "two", 2), tmp_path / "resumed.log")
    resumed_log = open(tmp_path / "resumed.log").read()
    assert "[rank 1/2] shard" in resumed_log  # both ranks embedded what was left

    a, b = PassageIndex.load(one), PassageIndex.load(killed)
    assert len(a) > 200 and n_done < len(a.meta["shards"]) == -(-len(a) // 32)
    assert _bytes(killed) == _bytes(one)
    assert not os.path.exists(killed + ".partial")
    rng = np.random.default_rng(0)
    q = rng.normal(size=(200, 384)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ra, rb = a.search(q, 10)[1], b.search(q, 10)[1]
    assert (ra >= 0).all()
    assert [[a.ids[r] for r in row] for row in ra] == [[b.ids[r] for r in row] for row in rb]
