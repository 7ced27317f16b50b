"""High-entropy position selection: adaptive percentile and the fixed mean + k·sigma rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from policylong.screening.positions import select_positions


def test_percentile_takes_the_top_k_percent():
    rng = np.random.default_rng(0)
    h = torch.tensor(rng.random(203))
    for pct in (1.0, 5.0, 12.5, 100.0):
        k = math.ceil(203 * pct / 100)
        got = select_positions(h, "percentile", pct, max_positions=1000)
        want = np.sort(np.argsort(-h.numpy(), kind="stable")[:k])
        assert got.tolist() == want.tolist()


def test_percentile_is_relative_to_the_current_model():
    """Scaling every entropy (a model that got better everywhere) selects the same positions:
    the threshold adapts, unlike a fixed one."""
    h = torch.tensor(np.random.default_rng(1).random(100) * 6)
    a = select_positions(h, "percentile", 10)
    b = select_positions(h * 0.3, "percentile", 10)
    assert a.tolist() == b.tolist()


def test_sigma_rule_matches_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=500)
    x[[3, 77, 410]] += 8
    got = select_positions(torch.tensor(x), "sigma", sigma=2.0, max_positions=1000)
    want = np.nonzero(x > x.mean() + 2 * x.std())[0]
    assert got.tolist() == want.tolist()
    assert {3, 77, 410} <= set(got.tolist())


def test_max_positions_keeps_the_highest():
    h = torch.arange(50, dtype=torch.float64)
    assert select_positions(h, "percentile", 100, max_positions=3).tolist() == [47, 48, 49]


def test_unknown_mode():
    with pytest.raises(ValueError, match="position_mode"):
        select_positions(torch.ones(3), "median")


def test_min_context_excludes_the_head_and_ranks_the_rest():
    """A document whose head carries the highest entropy (no context yet): with min_context m
    no position below m is chosen, and the choice equals numpy's over positions m.. alone, in
    both modes."""
    rng = np.random.default_rng(3)
    x = rng.random(300)
    x[:20] += 5.0  # title / header: high entropy only for want of context
    h = torch.tensor(x)
    assert set(select_positions(h, "percentile", 5.0, max_positions=1000).tolist()) & set(range(20))
    for m in (20, 32, 299):
        got = select_positions(h, "percentile", 5.0, max_positions=1000, min_context=m)
        k = math.ceil((300 - m) * 5.0 / 100)
        want = m + np.sort(np.argsort(-x[m:], kind="stable")[:k])
        assert got.tolist() == want.tolist(), m
        tail = x[m:]
        got = select_positions(h, "sigma", sigma=1.0, max_positions=1000, min_context=m)
        want = m + np.nonzero(tail > tail.mean() + tail.std())[0]
        assert got.tolist() == want.tolist(), m
    assert select_positions(h, "percentile", 5.0, min_context=300).numel() == 0
