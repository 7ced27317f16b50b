"""Step 4: entropy-reduction verification of candidates (paper Eq. 1), with the NLL guard.

For a root A with selected positions P and candidates B_1..B_K, one forward of
``[ctx ; B_k ; sep ; A]`` per candidate scores every position of A at once (causality): the row
predicting A[i] is ``len(prefix) + i - 1``. The K×|P| gathered rows go through one
``entropy_reduction`` call. A candidate is a positive when some position has ``ΔH > tau_pos``
and, with the guard on, the actual token's NLL drops by more than ``nll_margin`` at that same
position (a passage that makes the model confidently wrong lowers entropy but raises NLL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policylong.kernels import entropy_reduction

from .entropy import gather_rows


@dataclass
class Verdict:
    """Verification of one candidate against one root."""

    row: int
    delta_h: torch.Tensor  # [p] float32
    nll_drop: torch.Tensor  # [p] float32, NLL(x_i | x_<i) - NLL(x_i | B, x_<i)
    by_entropy: torch.Tensor  # [p] bool, ΔH > tau_pos
    by_guard: torch.Tensor  # [p] bool, ΔH > tau_pos and nll_drop > nll_margin

    def positive(self, guard: bool) -> bool:
        return bool((self.by_guard if guard else self.by_entropy).any())


def candidate_sequence(ctx_id: int, sep: list[int], cand: list[int], root: list[int]):
    """``[ctx ; B ; sep ; A]`` and the row predicting A[0]."""
    prefix = [ctx_id] + cand + sep
    return prefix + root, len(prefix) - 1


def verify_root(
    lm,
    root: list[int],
    positions: torch.Tensor,
    h0: torch.Tensor,
    nll0: torch.Tensor,
    cand_rows: list[int],
    cand_tokens: list[list[int]],
    ctx_id: int,
    sep: list[int],
    pad_id: int,
    batch_size: int,
    tau_pos: float,
    nll_margin: float,
    tp_group=None,
) -> list[Verdict]:
    if len(cand_rows) == 0 or positions.numel() == 0:
        return []
    seqs, rows = [], []
    for toks in cand_tokens:
        s, first = candidate_sequence(ctx_id, sep, toks, root)
        seqs.append(s)
        rows.append(first + positions)
    hidden = gather_rows(lm, seqs, rows, pad_id, batch_size)
    k, p = len(cand_rows), positions.numel()
    hidden = hidden.view(k, p, -1)
    tgt = torch.tensor([root[int(i)] for i in positions], dtype=torch.long, device=hidden.device)
    dh, ok, nll_b = entropy_reduction(
        h0[positions].to(hidden.device),
        hidden,
        lm.head_weight(),
        tau_pos,
        tp_group if tp_group is not None else lm.tp_group,
        targets=tgt,
        return_nll=True,
    )
    drop = nll0[positions].to(nll_b.device)[None, :] - nll_b
    guard = ok & (drop > nll_margin)
    return [
        Verdict(r, dh[j].cpu(), drop[j].cpu(), ok[j].cpu(), guard[j].cpu())
        for j, r in enumerate(cand_rows)
    ]
