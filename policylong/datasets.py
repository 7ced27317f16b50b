"""The stage dataset on disk: Megatron indexed dataset + manifest + provenance.

One folder per stage (docs/formats.md)::

    data.bin, data.idx   megatron.core IndexedDataset: one document (= one sequence of exactly
                         L tokens) per training sequence; uint16 tokens when the vocabulary
                         fits (<= 65,500), else int32
    manifest.json        stage, model, seq_length, num_sequences, num_tokens, vocab_size, dtype,
                         sha256 {bin, idx}, config_hash, seed, stats {...}
    provenance.jsonl     one line per sequence, in dataset order

Written into ``<dir>.partial`` and renamed when complete: a stage folder either is complete or
absent. :func:`verify_stage_dataset` is what readers (training) call before trusting a folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from policylong.errors import OutputError, PolicyLongError

UINT16_MAX_VOCAB = 65_500


class StageDatasetError(PolicyLongError, ValueError):
    """A stage folder whose files do not match its manifest."""


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= UINT16_MAX_VOCAB else np.int32


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: str) -> str:
    """sha256 of a file, or of a folder's files (relative name and content, in name order)."""
    if not os.path.isdir(path):
        return sha256_file(path)
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for n in sorted(files):
            full = os.path.join(root, n)
            h.update(f"{os.path.relpath(full, path)}\0{sha256_file(full)}\n".encode())
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_stage_dataset(
    work_dir: str,
    sequences: Iterable[list[int]],
    provenance: list[dict],
    manifest: dict,
    vocab_size: int,
    seq_length: int,
) -> dict:
    """Write data.bin/.idx, provenance.jsonl and manifest.json into ``work_dir`` (the
    ``.partial`` folder). Checks every sequence is exactly ``seq_length`` tokens with ids below
    ``vocab_size``. Returns the completed manifest."""

    dtype = token_dtype(vocab_size)
    prefix = os.path.join(work_dir, "data")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    n = 0
    for toks in sequences:
        if len(toks) != seq_length:
            raise AssertionError(f"sequence {n} has {len(toks)} tokens, not L={seq_length}")
        arr = np.asarray(toks, dtype=np.int64)
        if arr.min(initial=0) < 0 or arr.max(initial=0) >= vocab_size:
            raise AssertionError(f"sequence {n} has token ids outside [0, {vocab_size})")
        builder.add_item(torch.from_numpy(arr))
        builder.end_document()
        n += 1
    builder.finalize(prefix + ".idx")
    if n != len(provenance):
        raise AssertionError(f"{n} sequences but {len(provenance)} provenance lines")
    with open(os.path.join(work_dir, "provenance.jsonl"), "w", encoding="utf-8") as f:
        for p in provenance:
            f.write(json.dumps(p) + "\n")
    manifest = dict(manifest)
    manifest.update(
        {
            "seq_length": seq_length,
            "num_sequences": n,
            "num_tokens": n * seq_length,
            "vocab_size": vocab_size,
            "dtype": np.dtype(dtype).name,
            "sha256": {"bin": sha256_file(prefix + ".bin"), "idx": sha256_file(prefix + ".idx")},
        }
    )
    with open(os.path.join(work_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def commit(work_dir: str, final_dir: str) -> None:
    """Rename the completed ``.partial`` folder to its final name (atomic on one filesystem)."""
    if os.path.exists(final_dir):
        raise OutputError(f"{final_dir} already exists")
    _fsync_dir(work_dir)
    os.replace(work_dir, final_dir)
    _fsync_dir(os.path.dirname(os.path.abspath(final_dir)))


def load_manifest(stage_dir: str) -> dict:
    path = os.path.join(stage_dir, "manifest.json")
    if not os.path.isfile(path):
        raise StageDatasetError(f"{stage_dir}: not a stage dataset (no manifest.json)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise StageDatasetError(f"{path}: corrupt ({e})") from e


def verify_stage_dataset(stage_dir: str, check_sha: bool = True) -> dict:
    """Check that a stage folder is complete and matches its manifest; returns the manifest."""
    m = load_manifest(stage_dir)
    for key in ("seq_length", "num_sequences", "vocab_size", "sha256"):
        if key not in m:
            raise StageDatasetError(f"{stage_dir}/manifest.json: missing field '{key}'")
    for ext in ("bin", "idx"):
        p = os.path.join(stage_dir, f"data.{ext}")
        if not os.path.isfile(p):
            raise StageDatasetError(f"{p}: missing")
        if check_sha:
            got = sha256_file(p)
            if got != m["sha256"][ext]:
                raise StageDatasetError(
                    f"{p}: sha256 {got[:12]}… does not match manifest.json "
                    f"({m['sha256'][ext][:12]}…)"
                )
    return m


def read_provenance(stage_dir: str) -> list[dict]:
    with open(os.path.join(stage_dir, "provenance.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
