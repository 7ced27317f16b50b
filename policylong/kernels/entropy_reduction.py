"""Relative entropy reduction ΔH of K candidates at P high-entropy positions of one root.

For candidate B prepended to root document A, the hidden state that predicts token x_i of A
sits at the shifted position ``len(prefix) + i - 1`` of ``[ctx ; B ; sep ; A]``; the caller
gathers those rows into ``hidden [k, p, d]``. Then

    ΔH(B, x_i) = (H(x_i | x_<i) - H(x_i | B, x_<i)) / H(x_i | x_<i)      (paper, Eq. 1)

and a candidate is verified at position i when ``ΔH > tau_pos``. All K·P rows go through one
fused linear-entropy call (one launch on GPU).
"""

from __future__ import annotations

import torch

from .linear_entropy import fused_linear_entropy_nll, linear_entropy_ref

H0_FLOOR = 1e-6
"""H0 below this is treated as this (a zero-entropy position cannot be reduced further)."""


def entropy_reduction_ref(
    h0: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, tau_pos: float
):
    """Float64 reference with full logits."""
    k, p, d = hidden.shape
    hb = linear_entropy_ref(hidden.reshape(k * p, d), weight).view(k, p)
    h0 = h0.double().clamp_min(H0_FLOOR)
    dh = (h0[None, :] - hb) / h0[None, :]
    return dh, dh > tau_pos


def entropy_reduction(
    h0: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tau_pos: float,
    tp_group=None,
    *,
    targets: torch.Tensor | None = None,
    return_nll: bool = False,
    backend: str = "auto",
):
    """ΔH ``float32 [k, p]`` and the verified mask ``bool [k, p]`` (ΔH > tau_pos).

    Args:
        h0: ``[p]`` entropy at each position without the candidate.
        hidden: ``[k, p, d]`` final hidden states (after the final norm) with each candidate
            prepended, gathered at the shifted positions.
        weight: ``[v_local, d]`` LM-head shard.
        targets: ``[p]`` actual tokens x_i; with ``return_nll`` the NLL of each target under
            each candidate is returned as a third output ``float32 [k, p]`` (the NLL guard).
        backend: ``auto`` / ``torch`` / ``triton`` (``policylong.kernels.dispatch``); all
            K·P rows go through one fused-kernel launch.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [k, p, d], got shape {tuple(hidden.shape)}")
    k, p, d = hidden.shape
    if h0.shape != (p,):
        raise ValueError(f"h0 must be [p] = [{p}], got {tuple(h0.shape)}")
    if not 0.0 < tau_pos < 1.0:
        raise ValueError(f"tau_pos = {tau_pos} must lie in (0, 1)")
    if return_nll and targets is None:
        raise ValueError("return_nll needs targets")
    tgt = None
    if targets is not None:
        if targets.shape != (p,):
            raise ValueError(f"targets must be [p] = [{p}], got {tuple(targets.shape)}")
        tgt = targets.reshape(1, p).expand(k, p).reshape(k * p)
    hb, nll = fused_linear_entropy_nll(
        hidden.reshape(k * p, d), weight, tgt, tp_group, backend=backend
    )
    h0f = h0.float().clamp_min(H0_FLOOR).to(hb.device)
    dh = (h0f[None, :] - hb.view(k, p)) / h0f[None, :]
    verified = dh > tau_pos
    if return_nll:
        return dh, verified, nll.view(k, p)
    return dh, verified
