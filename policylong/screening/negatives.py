"""Step 5: what fills the rest of the L tokens.

* ``onpolicy`` (PolicyLong §3.3): every verified positive B queries the index again; its
  nearest passages C (not a positive, not A) are hard negatives. The depth k per positive is
  dynamic: ``k = max(min_k, ceil(need / (m * mean_len)))`` for m positives, doubled while the
  neighbours run out, so the chunks fill the target length whatever m is. Neighbours are
  taken round-robin over positives (C_1^(1), C_2^(1), ..., C_1^(2), ...), so each positive gets
  about k of them.
* ``nearest`` (NExtLong): passages nearest to A's own query fragments, unverified.
* ``random``: random passages (EntropyLong-style padding).

Each returns passage rows in the order taken, stopping as soon as ``need`` tokens are covered
(each chunk costs its length plus the separator).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def _take(candidates, exclude: set[int], need: int, cost: Callable[[int], int]):
    taken, have = [], 0
    for r in candidates:
        if have >= need:
            break
        if r < 0 or r in exclude:
            continue
        exclude.add(r)
        taken.append(r)
        have += cost(r)
    return taken, have


def onpolicy_negatives(
    search: SearchFn,
    pos_vectors: np.ndarray,
    exclude: set[int],
    need: int,
    cost: Callable[[int], int],
    mean_len: float,
    min_k: int,
    max_depth: int,
    n_total: int,
) -> tuple[list[int], int]:
    """Hard negatives by secondary retrieval seeded by the positives. Returns (rows, depth k)."""
    m = len(pos_vectors)
    if m == 0 or need <= 0:
        return [], 0
    k = max(min_k, math.ceil(need / (m * max(mean_len, 1.0))))
    while True:
        depth = min(k + len(exclude) + 1, max_depth, n_total)
        _, rows = search(pos_vectors, depth)
        order = [int(rows[j, d]) for d in range(rows.shape[1]) for j in range(m)]
        ex = set(exclude)
        taken, have = _take(order, ex, need, cost)
        if have >= need or depth >= min(max_depth, n_total):
            exclude |= set(taken)
            return taken, k
        k *= 2


def nearest_negatives(
    search: SearchFn,
    query_vectors: np.ndarray,
    exclude: set[int],
    need: int,
    cost: Callable[[int], int],
    max_depth: int,
    n_total: int,
) -> list[int]:
    """Passages nearest to A's queries (best score over queries first), unverified."""
    if need <= 0 or len(query_vectors) == 0:
        return []
    depth = 16
    while True:
        depth = min(depth, max_depth, n_total)
        scores, rows = search(query_vectors, depth)
        best: dict[int, float] = {}
        for sc, r in zip(scores.reshape(-1), rows.reshape(-1)):
            r = int(r)
            if r >= 0 and (r not in best or sc > best[r]):
                best[r] = float(sc)
        order = [r for r, _ in sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))]
        ex = set(exclude)
        taken, have = _take(order, ex, need, cost)
        if have >= need or depth >= min(max_depth, n_total):
            exclude |= set(taken)
            return taken
        depth *= 2


def random_fill(
    rng: np.random.Generator, n_total: int, exclude: set[int], need: int, cost: Callable[[int], int]
) -> list[int]:
    if need <= 0:
        return []
    taken, _ = _take((int(r) for r in rng.permutation(n_total)), exclude, need, cost)
    return taken
