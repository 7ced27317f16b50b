"""Step 1: entropy (and the NLL of the actual token) at every position of root documents.

A root document A is scored as ``[ctx ; A]`` (ctx = BOS, or EOS for models without one), so
the hidden state at sequence index i predicts token i of A: every token of A, the first
included, gets ``H(x_i | x_<i)``. Documents are batched (right-padded; the model is causal, so
padding never reaches a scored row), and all rows of a batch go through one
``fused_linear_entropy_nll`` call.
"""

from __future__ import annotations

import torch

from policylong.kernels import fused_linear_entropy_nll


def pad_batch(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    L = max(len(s) for s in seqs)
    x = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return x


def gather_rows(
    lm, seqs: list[list[int]], rows: list[torch.Tensor], pad_id: int, batch_size: int
) -> torch.Tensor:
    """Final hidden states of ``seqs`` at the given row indices, concatenated ``[Σ rows, d]``.

    Sequences are processed in batches of ``batch_size`` in the given order (the order, hence
    the floating-point result, is a function of the input alone).
    """
    out = []
    for b in range(0, len(seqs), batch_size):
        x = pad_batch(seqs[b : b + batch_size], pad_id)
        hid = lm.final_hidden(x.to(lm.device))
        for j, r in enumerate(rows[b : b + batch_size]):
            out.append(hid[j, r.to(hid.device)])
    return torch.cat(out, 0)


def root_entropies(
    lm, roots: list[list[int]], ctx_id: int, pad_id: int, batch_size: int, tp_group=None
):
    """Per root: (entropy float32 [n], NLL float32 [n]) at every token of the root."""
    seqs = [[ctx_id] + r for r in roots]
    rows = [torch.arange(0, len(r)) for r in roots]  # row i of [ctx;A] predicts A[i]
    hidden = gather_rows(lm, seqs, rows, pad_id, batch_size)
    targets = torch.tensor([t for r in roots for t in r], dtype=torch.long, device=hidden.device)
    h, nll = fused_linear_entropy_nll(
        hidden, lm.head_weight(), targets, tp_group if tp_group is not None else lm.tp_group
    )
    out, s = [], 0
    for r in roots:
        out.append((h[s : s + len(r)].cpu(), nll[s : s + len(r)].cpu()))
        s += len(r)
    return out
