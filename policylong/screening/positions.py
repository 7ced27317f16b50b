"""Step 2: high-entropy positions of a root document.

* ``percentile`` (PolicyLong, §3.2): the top-k% positions by entropy, re-computed with M_t at
  every stage, so the threshold follows the model's current frontier;
* ``sigma`` (EntropyLong): a fixed rule ``H > mean + sigma * std`` over the document.

Only positions with at least ``min_context`` tokens before them are candidates (both modes
rank and threshold over those alone): at the head of a document entropy is high because there
is no context yet, and a passage sharing a title or a header line lowers it there without any
long-range dependency. At least one position is kept in percentile mode (``ceil``), at most
``max_positions`` (highest entropy first); the result is sorted by position.
"""

from __future__ import annotations

import math

import torch


def select_positions(
    entropy: torch.Tensor,
    mode: str = "percentile",
    percentile: float = 5.0,
    sigma: float = 2.0,
    max_positions: int = 32,
    min_context: int = 0,
) -> torch.Tensor:
    """Indices (long, ascending) of the selected positions of ``entropy [n]``; position i has
    i tokens of the document before it."""
    first = min(max(min_context, 0), entropy.shape[0])
    n = entropy.shape[0] - first
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    h = entropy[first:].double()
    if mode == "percentile":
        k = max(1, math.ceil(n * percentile / 100.0))
        k = min(k, max_positions, n)
        # stable order: highest entropy first, ties broken by position
        order = sorted(range(n), key=lambda i: (-float(h[i]), i))
        chosen = order[:k]
    elif mode == "sigma":
        thr = float(h.mean() + sigma * h.std(unbiased=False))
        chosen = [i for i in range(n) if float(h[i]) > thr]
        chosen = sorted(chosen, key=lambda i: (-float(h[i]), i))[:max_positions]
    else:
        raise ValueError(f"screening.position_mode = {mode!r}: must be percentile or sigma")
    return torch.tensor(sorted(chosen), dtype=torch.long) + first
