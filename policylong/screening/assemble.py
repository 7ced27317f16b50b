"""Step 6: one training sequence of exactly L tokens, A whole at the end (paper Eq. 2).

``[globally shuffled {B_1..B_m, C_1^(1)..C_m^(k)} ; A]``, every chunk closed by the separator
(EOS, Megatron's end-of-document). The chunks cover at least ``L - len(A) - 1`` tokens. The
surplus goes to negatives only: taking the negatives in shuffled order, one the surplus covers
entirely is dropped, and the first one it does not is moved to the head and cut there. A
positive is never cut, since the positives alone fit in front of A (the pipeline keeps only
those that do).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Assembled:
    tokens: list[int]
    order: list[str]  # chunk ids in sequence order, root id last
    negatives: list[str]  # negatives that made it into the sequence
    head_trim: int  # tokens cut from the head of the first chunk


class CannotFill(ValueError):
    """The chunks are too few to reach L."""


def assemble(
    root_id: str,
    root: list[int],
    chunks: list[tuple[str, list[int], bool]],
    L: int,
    sep: list[int],
    rng: np.random.Generator,
) -> Assembled:
    """``chunks``: (id, tokens, is_positive). Shuffled with ``rng``."""
    tail = root + sep
    budget = L - len(tail)
    if budget < 0:
        raise ValueError(f"root {root_id}: {len(tail)} tokens do not fit in L={L}")
    order = [chunks[i] for i in rng.permutation(len(chunks))]
    parts = [(cid, toks + sep, pos) for cid, toks, pos in order]
    excess = sum(len(p[1]) for p in parts) - budget
    if excess < 0:
        raise CannotFill(f"root {root_id}: chunks cover {budget + excess} of {budget} tokens")
    while excess > 0:
        i = next((i for i, p in enumerate(parts) if not p[2]), None)
        if i is None:
            raise ValueError(
                f"root {root_id}: the positives alone exceed the {budget} tokens in front of A"
            )
        if len(parts[i][1]) <= excess:
            excess -= len(parts.pop(i)[1])
        else:
            parts.insert(0, parts.pop(i))
            break
    head_trim = excess
    toks = [t for _, p, _ in parts for t in p][head_trim:] + tail
    assert len(toks) == L, (len(toks), L)
    return Assembled(
        toks,
        [cid for cid, _, _ in parts] + [root_id],
        [cid for cid, _, pos in parts if not pos],
        head_trim,
    )
