"""The embedded base model, for real: it copies facts from context, and screening with it (and
all-MiniLM-L6-v2) recovers the planted dependencies of a held-out synthetic corpus."""

from __future__ import annotations

import json
import os

import pytest

from policylong.basemodel import gap_probe
from policylong.corpus import load_tokenizer
from policylong.paths import ASSET_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm():
    from policylong.lm import HFLanguageModel

    return HFLanguageModel("embedded", device="cpu")


def test_tokenizer_loads_as_the_backend_loads_it(lm):
    tok = load_tokenizer(ASSET_DIR)
    assert type(tok).__name__ == type(lm.tokenizer).__name__
    text = "from the mill ledger . nobody was in a hurry ."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert lm.vocab_size == len(tok.get_vocab())


def test_content_based_copying(lm):
    """Value NLL with the defining passage in context is far below every other context; a
    model that copied by position, or copied any entity's value, would fail this."""
    vocab = lm.tokenizer.get_vocab()
    p = gap_probe(lm.model, vocab, n=48, seed=777)
    assert p["true"]["nll"] < 1.0
    assert p["none"]["nll"] > 3.0
    assert p["true"]["nll"] < 0.3 * p["none"]["nll"]
    # a different entity's value is not taken for this entity's
    assert p["different_entity"]["nll"] > 2.0 * p["true"]["nll"] + 1.0
    assert p["wrong_value"]["nll"] > p["true"]["nll"] + 2.0


def test_planted_dependency_recovery(tmp_path, lm):
    from policylong.config import load_config
    from policylong.retrieval import Embedder, PassageIndex, build_index
    from policylong.screening.pipeline import screen_stage
    from policylong.synthetic import generate_corpus

    cfg = load_config(None, [f"workdir={tmp_path}", "seed=5"])
    generate_corpus(str(tmp_path / "corpus"), num_roots=32, seed=2024)
    build_index(cfg)
    index = PassageIndex.load(str(tmp_path / "index"))
    m = screen_stage(cfg, lm, index, Embedder(), str(tmp_path / "stage_0"), progress=False)
    gt = m["stats"]["ground_truth"]
    print(json.dumps(gt, indent=1))
    assert gt["recall"] >= 0.8
    assert gt["precision"] >= 0.8
    # the guard rejects wrong-value passages that entropy alone lets through
    assert gt["admitted_with_guard"]["wrong_value"] <= gt["admitted_entropy_only"]["wrong_value"]
    assert gt["precision"] >= gt["precision_entropy_only"]
    # secondary retrieval finds the planted different-entity distractors as hard negatives
    assert gt["hard_negative_distractor_recall"] >= 0.5
    assert os.path.isfile(tmp_path / "stage_0" / "data.bin")


def test_sigkill_mid_stage_then_rerun_gives_the_same_bytes(tmp_path):
    """`policylong screen` killed with SIGKILL mid-stage leaves no stage folder; the rerun
    resumes from the partial progress and writes the bytes of an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    from policylong.config import load_config
    from policylong.datasets import load_manifest
    from policylong.retrieval import build_index
    from policylong.synthetic import generate_corpus

    wd = str(tmp_path)
    generate_corpus(os.path.join(wd, "corpus"), num_roots=40, seed=99)
    build_index(load_config(None, [f"workdir={wd}"]))
    cmd = [sys.executable, "-m", "policylong.cli", "screen", "--workdir", wd]

    def screen(out):
        subprocess.run(cmd + ["--out", out], check=True, capture_output=True)
        return load_manifest(out)["sha256"]

    ref = screen(os.path.join(wd, "ref"))
    out = os.path.join(wd, "killed")
    prog = os.path.join(out + ".partial", "progress.jsonl")
    p = subprocess.Popen(cmd + ["--out", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if os.path.isfile(prog) and os.path.getsize(prog) > 0:
            break
        time.sleep(0.05)
    assert p.poll() is None, "screening finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.exists(out)
    assert os.path.isfile(prog)
    assert screen(out) == ref
    assert not os.path.exists(out + ".partial")
