"""Megatron's own readers take the stage dataset: IndexedDataset and GPTDataset."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from policylong.datasets import (
    StageDatasetError,
    read_provenance,
    sha256_file,
    verify_stage_dataset,
)
from policylong.screening import pipeline as pl


@pytest.fixture()
def stage(tmp_path, make_cfg, copy_model, index, embedder):
    cfg = make_cfg(tmp_path)
    out = str(tmp_path / "runs" / "stage_0")
    pl.screen_stage(cfg, copy_model, index, embedder, out, progress=False)
    return cfg, out


def test_indexed_dataset_reads_back(stage, tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    cfg, out = stage
    man = json.load(open(os.path.join(out, "manifest.json")))
    ds = IndexedDataset(os.path.join(out, "data"))
    assert len(ds) == man["num_sequences"] == len(read_provenance(out))
    assert (ds.sequence_lengths == cfg.data.seq_length).all()
    assert ds.index.dtype == np.uint16  # vocab 1518 <= 65,500
    vocab = len(tokenizer.get_vocab())
    assert man["vocab_size"] == vocab
    for i in range(len(ds)):
        assert int(ds[i].max()) < vocab
    assert man["sha256"]["bin"] == sha256_file(os.path.join(out, "data.bin"))
    assert man["sha256"]["idx"] == sha256_file(os.path.join(out, "data.idx"))
    for key in (
        "stage",
        "model",
        "seq_length",
        "num_sequences",
        "num_tokens",
        "vocab_size",
        "dtype",
        "sha256",
        "config_hash",
        "seed",
        "stats",
    ):
        assert key in man
    for key in (
        "positions_examined",
        "candidates_retrieved",
        "positives",
        "negatives",
        "mean_delta_h",
        "skipped",
    ):
        assert key in man["stats"]


def test_gpt_dataset_samples_are_the_sequences(stage, tokenizer, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from policylong.megatron_ext.data import build_gpt_dataset

    cfg, out = stage
    L = cfg.data.seq_length
    ds = build_gpt_dataset(
        [out], L, eod=tokenizer.eos_token_id, seed=5, cache_dir=str(tmp_path / "cache")
    )
    raw = IndexedDataset(os.path.join(out, "data"))
    seqs = {tuple(raw[i].tolist()) for i in range(len(raw))}
    assert len(ds) == len(raw)
    got = set()
    for i in range(len(ds)):
        s = ds[i]
        assert s["tokens"].shape == (L,)
        assert s["loss_mask"][:-1].all() and s["loss_mask"][-1] == 0
        assert (s["labels"][:-1] == s["tokens"][1:]).all()
        got.add(tuple(s["tokens"].tolist()))
    assert got == seqs  # every sample is exactly one stage sequence, each used once


def test_tampered_folder_is_rejected(stage, tmp_path):
    from policylong.megatron_ext.data import build_gpt_dataset

    cfg, out = stage
    bad = str(tmp_path / "bad")
    shutil.copytree(out, bad)
    with open(os.path.join(bad, "data.bin"), "r+b") as f:
        f.seek(10)
        f.write(b"\x01\x02")
    with pytest.raises(StageDatasetError, match="sha256"):
        verify_stage_dataset(bad)
    with pytest.raises(StageDatasetError, match="exceeds"):
        build_gpt_dataset([out], cfg.data.seq_length + 1, eod=3)
    os.remove(os.path.join(bad, "manifest.json"))
    with pytest.raises(StageDatasetError, match="no manifest"):
        verify_stage_dataset(bad)
