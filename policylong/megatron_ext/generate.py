"""KV-cached sampling from the live Megatron-Core model (the alignment loop's rollouts).

megatron-core's ``StaticInferenceContext`` holds the KV cache; ``GPTModel.forward`` with it
returns the last position's logits, gathered over TP. The G rollouts of one prompt share its
prefix: the prompt is prefilled once (batch 1) and its cache copied to the G rows
(``swap_key_value_dict``), then the G rows decode together, one token per forward. This is
megatron-core's own static-batching path (``megatron.core.inference``'s
``StaticInferenceContext``); its engine and text-generation controller are not used because
they add a tokenizer wrapper and request scheduler we do not need and offer no per-request
seeded sampler.

Sampling is seeded per prompt (``seed``), so rollouts do not depend on which data-parallel
rank draws them, and the sampled token is broadcast from TP rank 0, so every TP rank decodes
the same sequence. Only ``[G, vocab]`` logits of the newest position exist at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext

from .model import forward_only


@dataclass
class Samples:
    """G responses to one prompt."""

    tokens: list[list[int]]
    """Sampled tokens of each response, its stop token included when it stopped."""
    logprobs: list[list[float]]
    """The sampler's log π(y_t | ...) of each sampled token, at the sampling temperature."""
    stopped: list[bool]
    """Whether the response ended with a stop token (else it hit ``max_new``)."""


def _tp_broadcast(t: torch.Tensor) -> torch.Tensor:
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(
            t,
            src=ps.get_tensor_model_parallel_src_rank(),
            group=ps.get_tensor_model_parallel_group(),
        )
    return t


@torch.no_grad()
def sample(
    model,
    prompt: list[int],
    g: int,
    max_new: int,
    temperature: float,
    seed: int,
    stop_ids: set[int],
    vocab_size: int,
) -> Samples:
    """``g`` responses of at most ``max_new`` tokens to ``prompt`` (token ids) from ``model``
    (the unwrapped GPTModel, PP = 1), sampled at ``temperature`` from the first
    ``vocab_size`` logits (the TP pad columns never win) with a generator seeded by ``seed``.
    A row stops at a token of ``stop_ids``. Collective over the TP group."""
    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("sampling needs pipeline_model_parallel_size 1")
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ctx = StaticInferenceContext(g, len(prompt) + max_new)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    try:
        x = torch.tensor([prompt], device=dev)
        pos = torch.arange(len(prompt), device=dev)[None]
        logits = model(x, pos, None, inference_context=ctx, runtime_gather_output=True)
        ctx.sequence_len_offset += len(prompt)
        if g > 1:
            ctx.swap_key_value_dict([0] * g)  # the prefix's cache, copied to the G rows
        logits = logits[:, -1].expand(g, -1)
        out = torch.empty(g, 0, dtype=torch.long)
        lps = torch.empty(g, 0, dtype=torch.float32)
        done = torch.zeros(g, dtype=torch.bool)
        stops = torch.tensor(sorted(stop_ids), dtype=torch.long)
        for i in range(max_new):
            lp = torch.log_softmax(logits[:, :vocab_size].float().cpu() / temperature, dim=-1)
            tok = torch.multinomial(lp.exp(), 1, generator=gen)[:, 0]
            tok = _tp_broadcast(tok.to(dev)).cpu()
            out = torch.cat([out, tok[:, None]], 1)
            lps = torch.cat([lps, lp.gather(1, tok[:, None])], 1)
            done |= torch.isin(tok, stops)
            if bool(done.all()) or i == max_new - 1:
                break
            p = torch.full((g, 1), len(prompt) + i, device=dev)
            logits = model(
                tok[:, None].to(dev), p, None, inference_context=ctx, runtime_gather_output=True
            )[:, -1]
            ctx.sequence_len_offset += 1
    finally:
        model.train(was_training)
    toks, lps_out, stopped = [], [], []
    for r in range(g):
        row = out[r].tolist()
        end = next((j + 1 for j, t in enumerate(row) if t in stop_ids), len(row))
        toks.append(row[:end])
        lps_out.append(lps[r, :end].tolist())
        stopped.append(end <= len(row) and row[end - 1] in stop_ids)
    return Samples(toks, lps_out, stopped)


@torch.no_grad()
def hidden_rows(model, seqs: list[list[int]], rows: list[list[int]], pad: int) -> torch.Tensor:
    """Final hidden states (after the final norm) at positions ``rows[i]`` of ``seqs[i]``,
    stacked in order: ``[Σ len(rows[i]), d]``. One right-padded forward-only batch (causal,
    so padding after a row's last position changes nothing). PP = 1; collective over TP."""
    s = max(map(len, seqs))
    dev = next(model.parameters()).device
    x = torch.full((len(seqs), s), pad, dtype=torch.long, device=dev)
    for i, q in enumerate(seqs):
        x[i, : len(q)] = torch.tensor(q)
    h = forward_only(model, x, hidden_only=True)  # [s, b, d]
    bi = torch.tensor([i for i, r in enumerate(rows) for _ in r], dtype=torch.long)
    ti = torch.tensor([t for r in rows for t in r], dtype=torch.long)
    return h[ti.to(h.device), bi.to(h.device)]
