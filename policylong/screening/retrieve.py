"""Step 3: query fragments around high-entropy positions, and candidate retrieval.

The fragment of position i is the decoded text of tokens ``[i - w, i + w]`` of A (clipped to
the document). All fragments of a batch of roots are embedded in one call and searched in one
FAISS call; a root's candidates are the union of its fragments' top-K, ranked by their best
score, without the root itself, capped at ``max_candidates``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def fragment_text(tokenizer, tokens: list[int], pos: int, window: int) -> str:
    lo, hi = max(0, pos - window), min(len(tokens), pos + window + 1)
    return tokenizer.decode(tokens[lo:hi])


@dataclass
class Candidates:
    rows: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


def rank_candidates(
    scores: np.ndarray, rows: np.ndarray, exclude: set[int], max_candidates: int
) -> Candidates:
    """Union of the rows of several queries' top-K, best score first (ties: lower row)."""
    best: dict[int, float] = {}
    for sc, rw in zip(scores.reshape(-1), rows.reshape(-1)):
        r = int(rw)
        if r < 0 or r in exclude:
            continue
        if r not in best or sc > best[r]:
            best[r] = float(sc)
    ranked = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:max_candidates]
    return Candidates([r for r, _ in ranked], [s for _, s in ranked])


def root_exclusions(index, root_id: str) -> set[int]:
    """Rows of the passage store that are the root itself (or its chunks)."""
    out = set()
    if root_id in index.row:
        out.add(index.row[root_id])
    prefix = root_id + "#"
    k = 0
    while f"{prefix}{k}" in index.row:
        out.add(index.row[f"{prefix}{k}"])
        k += 1
    return out
