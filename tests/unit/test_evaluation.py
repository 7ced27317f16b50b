"""Synthetic long-context probes: structure against the planted needles, and scores of the
embedded model against the no-needle control."""

from __future__ import annotations

import numpy as np
import pytest

from policylong import evaluation as ev
from policylong import synthetic as syn


@pytest.fixture(scope="module")
def lm():
    from policylong.lm import HFLanguageModel

    return HFLanguageModel("embedded")


@pytest.mark.parametrize("task", ev.TASKS)
def test_probe_holds_its_needles_and_the_control_does_not(task, lm):
    tok, lang = lm.tokenizer, syn.build_language()
    p = ev.build_probe(task, tok, lang, 300, np.random.default_rng(4), lm.ctx_id)
    c = ev.build_probe(task, tok, lang, 300, np.random.default_rng(4), lm.ctx_id, control=True)
    assert abs(len(p.tokens) - 300) <= 12 and len(c.tokens) == len(p.tokens)
    assert [t for _, t in p.targets] == [t for _, t in c.targets]
    for row, value in p.targets:
        assert p.tokens[row + 1] == value  # the answer follows the query in the sequence
        # the value occurs earlier in the probe (the needle) but not in the control
        assert value in p.tokens[: row - 8] and value not in c.tokens[: row - 8]
    want = {"niah_single": 1, "niah_multikey": 1, "variable_tracking": 1}.get(task, ev.NEEDLES)
    assert len(p.targets) == want


def test_variable_tracking_is_a_chain_in_order(lm):
    """VT: the value is stated for the first variable only; each later one is assigned from the
    previous one, in order; the query asks for the last one."""
    tok, lang = lm.tokenizer, syn.build_language()
    p = ev.build_probe("variable_tracking", tok, lang, 400, np.random.default_rng(5), lm.ctx_id)
    words = tok.decode(p.tokens[1:]).split()
    text = " ".join(words)
    row, value = p.targets[0]
    v = tok.decode([value]).strip()
    assert text.count(f" is {v} .") == 2  # the first assignment and the answer after the query
    first = text.index(f" is {v} .")
    e1 = words[len(text[:first].split()) - 1]
    chain, e = [], e1
    for _ in range(ev.VT_HOPS):
        hop = f"is the access code of {e} ."
        i = text.index(hop)
        nxt = text[:i].split()[-1]
        assert i > first
        chain.append(nxt)
        first, e = i, nxt
    q = " ".join(tok.decode(p.tokens[: row + 1]).split()[-11:])
    assert q == f"later {e} told us that the access code of {e} is", q
    assert len(set([e1, *chain])) == ev.VT_HOPS + 1


def test_embedded_model_finds_short_needles_and_not_missing_ones(lm):
    """At 128 tokens the embedded model copies the planted value (measured 1.00 for the single
    and multi-key tasks) and never guesses it without the needle (0.00)."""
    res = ev.evaluate(lm, [128], n=10, tasks=("niah_single", "niah_multikey"))
    for task in ("niah_single", "niah_multikey"):
        r = res[task][128]
        assert r["accuracy"] >= 0.9 and r["control_accuracy"] <= 0.1, (task, r)
        assert r["nll"] < 1.0 < r["control_nll"] - 4.0, (task, r)


def test_same_seed_same_probes(lm):
    tok, lang = lm.tokenizer, syn.build_language()
    a = ev.build_probe("niah_multiquery", tok, lang, 200, np.random.default_rng(9), lm.ctx_id)
    b = ev.build_probe("niah_multiquery", tok, lang, 200, np.random.default_rng(9), lm.ctx_id)
    assert a == b
    with pytest.raises(ValueError, match="evaluation task 'vt'"):
        ev.build_probe("vt", tok, lang, 200, np.random.default_rng(0), lm.ctx_id)


def test_heldout_loss_is_the_float64_cross_entropy(lm, tmp_path):
    """heldout_loss averages every token's NLL after the context token, as a float64
    cross-entropy of the Hugging Face logits does; documents come from a seed stream of their
    own (not the pretraining one) or from a corpus file, and the embedded model, trained on
    this distribution, predicts them far better than chance (ln 1519 = 7.3 nats)."""
    import json

    import torch

    docs = ev.heldout_documents(lm.tokenizer, 3, seed=5, max_tokens=200)
    assert docs == ev.heldout_documents(lm.tokenizer, 3, seed=5, max_tokens=200)
    assert docs != ev.heldout_documents(lm.tokenizer, 3, seed=6, max_tokens=200)
    assert all(0 < len(d) <= 200 for d in docs)
    unk = lm.tokenizer.unk_token_id
    assert all(unk not in d for d in docs)
    got = ev.heldout_loss(lm, docs, batch_size=2)
    nll = []
    for d in docs:
        ids = torch.tensor([[lm.ctx_id] + d])
        with torch.no_grad():
            logits = lm.model(ids).logits[0, :-1].double()
        nll.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none"))
    ref = torch.cat(nll)
    assert got["tokens"] == ref.numel() and got["documents"] == 3
    assert got["loss"] == pytest.approx(float(ref.mean()), rel=1e-6)
    assert got["loss"] < 3.0
    path = tmp_path / "short.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": str(i), "text": t}) + "\n"
            for i, t in enumerate(["the weather was cold that day .", "we met at noon ."])
        )
    )
    assert len(ev.heldout_documents(lm.tokenizer, 5, path=str(path))) == 2
    with pytest.raises(ValueError, match="n = 0"):
        ev.heldout_documents(lm.tokenizer, 0)


def test_planted_probe_chunks_end_with_eos_as_in_training(tokenizer, synth_corpus):
    """Each chunk before the root is closed by EOS (as assemble closes training chunks), the
    root follows an EOS, every target is the planted value, and the control holds no defining
    passage."""
    eos = tokenizer.eos_token_id
    roots = [f"root{i:05d}" for i in range(4)]
    probes = ev.planted_probes(tokenizer, tokenizer.bos_token_id, synth_corpus, roots, [300])
    ps, ctrl = probes[300]
    gt = syn.read_ground_truth(f"{synth_corpus}/ground_truth.jsonl")
    for p, c, r in zip(ps, ctrl, roots):
        root_len = len(p.tokens) - p.tokens[::-1].index(eos)  # index of the root's first token
        assert p.tokens[root_len - 1] == eos and eos not in p.tokens[root_len:]
        assert p.tokens[0] == tokenizer.bos_token_id
        values = {tokenizer.convert_tokens_to_ids(f["value"]) for f in gt[r]["facts"]}
        assert {t for _, t in p.targets} == values
        assert c.tokens.count(eos) >= 1 and len(c.targets) == len(p.targets)


def test_wilson_interval_covers_95_percent():
    """Exact coverage of the Wilson interval, summed over the binomial distribution (float64),
    stays near 95% for the probe counts the report uses; 8 of 12 is [0.391, 0.862]."""
    from math import comb

    assert ev.wilson(8, 12) == pytest.approx([0.3906, 0.8619], abs=1e-4)
    assert ev.wilson(0, 0) == [0.0, 1.0]
    for n in (12, 48, 61):
        for p in (0.2, 0.5, 0.7):
            cover = sum(
                comb(n, k) * p**k * (1 - p) ** (n - k)
                for k in range(n + 1)
                if ev.wilson(k, n)[0] <= p <= ev.wilson(k, n)[1]
            )
            assert 0.90 <= cover <= 0.99, (n, p, cover)
