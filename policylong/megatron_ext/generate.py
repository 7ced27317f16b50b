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

With pipeline parallelism each stage keeps the KV cache of its own layers; a forward passes
the activations stage to stage (``send``/``recv`` over the pipeline group, as megatron-core's
static-batching ``forward_step`` does), the last stage samples, and the tokens and their
log-probs are broadcast back over the pipeline group, so every rank returns the same samples.
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


def _pp_broadcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` of the last pipeline stage, on every stage."""
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            t,
            src=ps.get_pipeline_model_parallel_last_rank(),
            group=ps.get_pipeline_model_parallel_group(),
        )
    return t


def _stage_forward(model, tokens: torch.Tensor, pos: torch.Tensor, ctx):
    """One KV-cached forward of ``tokens [b, s]`` through every pipeline stage: logits of the
    last position ``[b, 1, V_padded]`` (TP-gathered) on the last stage, None elsewhere."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return model(tokens, pos, None, inference_context=ctx, runtime_gather_output=True)
    grp = ps.get_pipeline_model_parallel_group()
    b, s = tokens.shape
    if not ps.is_pipeline_first_stage():
        cfg = model.config
        h = torch.empty(s, b, cfg.hidden_size, dtype=cfg.params_dtype, device=tokens.device)
        dist.recv(h, src=ps.get_pipeline_model_parallel_prev_rank(), group=grp)
        model.set_input_tensor(h)
    out = model(tokens, pos, None, inference_context=ctx, runtime_gather_output=True)
    if ps.is_pipeline_last_stage():
        return out
    dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank(), group=grp)
    return None


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
    (this rank's stage of the unwrapped GPTModel), sampled at ``temperature`` from the first
    ``vocab_size`` logits (the TP pad columns never win) with a generator seeded by ``seed``
    (``temperature`` 0: greedy, the arg max).
    A row stops at a token of ``stop_ids``. Collective over the model-parallel group; every
    rank returns the same samples."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ctx = StaticInferenceContext(g, len(prompt) + max_new)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    last = ps.is_pipeline_last_stage()
    try:
        x = torch.tensor([prompt], device=dev)
        pos = torch.arange(len(prompt), device=dev)[None]
        logits = _stage_forward(model, x, pos, ctx)
        ctx.sequence_len_offset += len(prompt)
        if g > 1:
            ctx.swap_key_value_dict([0] * g)  # the prefix's cache, copied to the G rows
        if last:
            logits = logits[:, -1].expand(g, -1)
        out = torch.empty(g, 0, dtype=torch.long)
        lps = torch.empty(g, 0, dtype=torch.float32)
        done = torch.zeros(g, dtype=torch.bool)
        stops = torch.tensor(sorted(stop_ids), dtype=torch.long)
        for i in range(max_new):
            tok = torch.zeros(g, dtype=torch.long)
            lp_tok = torch.zeros(g, dtype=torch.float32)
            if last:
                z = logits[:, :vocab_size].float().cpu()
                if temperature > 0:
                    lp = torch.log_softmax(z / temperature, dim=-1)
                    tok = torch.multinomial(lp.exp(), 1, generator=gen)[:, 0]
                else:  # greedy (evaluation): log-probs at temperature 1
                    lp = torch.log_softmax(z, dim=-1)
                    tok = z.argmax(dim=-1)
                tok = _tp_broadcast(tok.to(dev)).cpu()
                lp_tok = lp.gather(1, tok[:, None])[:, 0]
            tok = _pp_broadcast(tok.to(dev)).cpu()
            lp_tok = _pp_broadcast(lp_tok.to(dev)).cpu()
            out = torch.cat([out, tok[:, None]], 1)
            lps = torch.cat([lps, lp_tok[:, None]], 1)
            done |= torch.isin(tok, stops)
            if bool(done.all()) or i == max_new - 1:
                break
            p = torch.full((g, 1), len(prompt) + i, device=dev)
            logits = _stage_forward(model, tok[:, None].to(dev), p, ctx)
            if last:
                logits = logits[:, -1]
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
    stacked in order: ``[Σ len(rows[i]), d]``, on the last pipeline stage (None elsewhere). One
    right-padded forward-only batch (causal, so padding after a row's last position changes
    nothing). Collective over the model-parallel group."""
    s = max(map(len, seqs))
    dev = next(model.parameters()).device
    x = torch.full((len(seqs), s), pad, dtype=torch.long, device=dev)
    for i, q in enumerate(seqs):
        x[i, : len(q)] = torch.tensor(q)
    h = forward_only(model, x, hidden_only=True)  # [s, b, d]
    if h is None:
        return None
    bi = torch.tensor([i for i, r in enumerate(rows) for _ in r], dtype=torch.long)
    ti = torch.tensor([t for r in rows for t in r], dtype=torch.long)
    return h[ti.to(h.device), bi.to(h.device)]
