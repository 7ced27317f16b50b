"""One optimizer step of next-token training on Megatron-Core, and what it is made of.

``train_step`` is the step both ``policylong train`` (``megatron_ext.train``) and a
``pretrain_gpt``-style script (``examples/pretrain_gpt_policylong.py``) run: forward and
backward over the step's micro-batches through megatron-core's pipeline schedule
(``get_forward_backward_func``; it calls the model config's ``finalize_model_grads_func``,
which ``optim.wrap_ddp`` sets), the optimizer step, the scheduler step. Its data is the
step's micro-batches: ``collate(ds, batch_indices(step, j, cfg, dp_rank, dp), device)`` for
``j`` in ``range(micro_batches(cfg))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from policylong.config import Config
from policylong.errors import ModelError

from . import model as M

# -- data --------------------------------------------------------------------------------------


def micro_batches(cfg: Config) -> int:
    """Micro-batches per optimizer step on each data-parallel rank:
    ``global_batch_size / (micro_batch_size · DP)`` (DP from megatron-core's parallel state)."""
    t = cfg.train
    return t.global_batch_size // (t.micro_batch_size * ps.get_data_parallel_world_size())


def batch_indices(step: int, micro: int, cfg: Config, dp_rank: int, dp: int) -> list[int]:
    """Dataset sample ids of micro-batch ``micro`` of optimizer step ``step`` on DP rank
    ``dp_rank``: deterministic, so a resumed run sees exactly the samples it would have."""
    t = cfg.train
    per_rank = t.global_batch_size // dp
    start = step * t.global_batch_size + dp_rank * per_rank + micro * t.micro_batch_size
    return list(range(start, start + t.micro_batch_size))


def collate(ds, ids: list[int], device) -> dict:
    """The micro-batch of samples ``ids`` of ``ds`` (a ``GPTDataset``): ``tokens``, ``labels``,
    ``loss_mask``, ``position_ids``, each ``[len(ids), seq_length]`` on ``device``."""
    samples = [ds[i] for i in ids]
    out = {}
    for k in ("tokens", "labels", "loss_mask", "position_ids"):
        out[k] = torch.stack([torch.as_tensor(s[k]) for s in samples]).to(device)
    return out


# -- loss and forward --------------------------------------------------------------------------


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Mean next-token loss over the unmasked tokens of one micro-batch.

    With context parallelism each rank holds 1/CP of every sequence: the (sum, count) pair is
    all-reduced over the CP group and the mean is scaled by CP, because megatron-core's DDP
    averages gradients over DP × CP ranks (Megatron's ``pretrain_gpt`` does the same)."""

    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        loss = torch.sum(losses * mask) / mask.sum().clamp_min(1.0)
        return loss, {"lm loss": loss.detach().clone()}
    pair = torch.stack([torch.sum(losses * mask), mask.sum()])
    dist.all_reduce(pair, group=ps.get_context_parallel_group())
    loss = pair[0] * cp / pair[1].clamp_min(1.0)
    return loss, {"lm loss": (pair[0] / pair[1].clamp_min(1.0)).detach().clone()}


def forward_step(data_iterator, model):
    """megatron-core ``forward_step_func``: the next micro-batch (split over the CP ranks when
    CP > 1) through ``model``; returns the per-token losses and ``loss_func`` bound to the
    micro-batch's loss mask."""
    b = next(data_iterator)
    if ps.get_context_parallel_world_size() > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank

        b = get_batch_on_this_cp_rank(b)  # 2·CP chunks, load-balanced for causal attention
    out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    return out, partial(loss_func, b["loss_mask"])


# -- the step ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    """What one ``train_step`` returns."""

    loss: float | None
    """Mean ``lm loss`` over the step's micro-batches and data-parallel ranks; None off the last
    pipeline stage (``broadcast_from_writer`` gives it to every rank)."""
    grad_norm: float | None
    """Global gradient norm before clipping, as the Megatron optimizer reports it."""
    lr: float
    """The learning rate this step used (the scheduler moves it afterwards)."""


def train_step(
    cfg: Config, model, optimizer, scheduler, data_iterator, step: int = 0
) -> StepResult:
    """One optimizer step: zero the gradients, forward and backward over ``micro_batches(cfg)``
    micro-batches of ``data_iterator`` (the pipeline schedule finalizes the gradients across
    DP ranks), ``optimizer.step()``, ``scheduler.step(increment=global_batch_size)``.

    ``model``: the ``DistributedDataParallel`` wrapper from ``optim.wrap_ddp``; ``optimizer``,
    ``scheduler``: from ``optim.build_optimizer``; ``step``: the step's 0-based index (named
    in the error). Collective over the job. Raises ``RuntimeError`` when the optimizer skips
    the step (inf/nan gradients)."""

    t = cfg.train
    model.zero_grad_buffer()
    optimizer.zero_grad()
    micro = micro_batches(cfg)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=[model],
        num_microbatches=micro,
        seq_length=cfg.data.seq_length,
        micro_batch_size=t.micro_batch_size,
        forward_only=False,
    )
    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it next)
    ok, grad_norm, _ = optimizer.step()
    if not ok:
        raise ModelError(f"step {step + 1}: optimizer step skipped (inf/nan gradients)")
    scheduler.step(increment=t.global_batch_size)
    return StepResult(
        loss=_mean_loss(losses),
        grad_norm=float(grad_norm) if grad_norm is not None else None,
        lr=lr,
    )


def _mean_loss(losses) -> float | None:
    """Mean 'lm loss' over micro-batches and data-parallel ranks (last pipeline stage only)."""

    if not ps.is_pipeline_last_stage() or not losses:
        return None
    v = torch.stack([x["lm loss"].float() for x in losses]).mean()
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(v, group=ps.get_data_parallel_group())
        v /= ps.get_data_parallel_world_size()
    return float(v)


def is_metrics_writer() -> bool:
    """The one rank that holds the loss and writes metrics: last pipeline stage, TP rank 0,
    DP rank 0."""

    return (
        ps.is_pipeline_last_stage()
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
    )


def broadcast_from_writer(row: dict, writer: bool) -> dict:
    """``row`` of the metrics writer (``writer``: this rank is it), on every rank. Collective
    when a process group exists."""
    if not dist.is_initialized():
        return dict(row)
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, row if writer else None)
    for r in flags:
        if r is not None:
            return dict(r)
    return {}


def flops_per_token(hf_cfg: dict, seq_length: int, causal: bool = True) -> float:
    """Training FLOPs per token (forward + backward = 3× forward) of a dense decoder with GQA
    and SwiGLU. Attention scores and the weighted sum cost 4·s·q·hd per token and layer over a
    full s × s matrix; ``causal`` counts the half that causal kernels (FlashAttention, cuDNN,
    TE) compute, which is what MFU should credit. Megatron-LM's classic estimate counts the
    full matrix (``causal=False``)."""
    h = hf_cfg["hidden_size"]
    f = hf_cfg["intermediate_size"]
    n = hf_cfg["num_hidden_layers"]
    q = hf_cfg["num_attention_heads"]
    kv = hf_cfg.get("num_key_value_heads") or q
    hd = M.head_dim(hf_cfg)
    v = hf_cfg["vocab_size"]
    per_layer = 2 * h * (q * hd + 2 * kv * hd) + 2 * q * hd * h + 2 * 3 * h * f
    attn = 2 * 2 * seq_length * q * hd * (0.5 if causal else 1.0)
    return 3.0 * (n * (per_layer + attn) + 2 * h * v)
