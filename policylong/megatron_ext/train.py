"""One PolicyLong training stage on Megatron-Core: M_t + S_t -> M_{t+1}.

The loop of ``policylong train`` (and of every stage of ``policylong run``): the stage's plan
(``plan.plan_stage``: layout, steps, resume point, all checked before anything starts), the
megatron-core ``GPTModel`` (``model``) built at the stage's start and wrapped for training
(``optim``), the stage dataset through ``GPTDataset`` (``data``), ``step.train_step`` once per
optimizer step, ``checkpointing`` saves every ``train.save_interval`` steps and at the end.
A run whose output folder holds a checkpoint resumes from its latest complete save: the
model, optimizer and scheduler state are loaded and the data continues where it stopped
(``step.batch_indices`` is a function of the step).

Besides the checkpoint (``checkpointing`` describes the folder), the loop writes
``CKPT/metrics.jsonl``: one JSON line per step, ``step``, ``loss``, ``lr``, ``grad_norm``,
``tokens_per_s`` (+ ``tflops_per_gpu``, ``mfu`` on GPU); a resumed run first drops the lines
of steps after its save. With ``tensorboard`` installed the same numbers go to
``CKPT/tensorboard/`` (``logs.MetricsLog``).
"""

from __future__ import annotations

import logging
import os
import signal
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from policylong.config import Config
from policylong.errors import ModelError
from policylong.logs import MetricsLog

from . import model as M
from .checkpointing import (
    close_checkpoint_writer,
    load_checkpoint,
    load_start_weights,
    save_checkpoint,
    write_meta,
)
from .data import build_gpt_dataset
from .optim import build_optimizer, wrap_ddp, wrap_float16
from .parallel import barrier, init_distributed, is_rank0
from .plan import plan_stage
from .step import (
    batch_indices,
    broadcast_from_writer,
    collate,
    flops_per_token,
    is_metrics_writer,
    micro_batches,
    train_step,
)

log = logging.getLogger("policylong.train")

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "H800": 989.0, "B200": 2250.0}
"""Dense bf16 peak per GPU from the vendors' datasheets, for MFU (leads, not measurements)."""


def check_finite_weights(model, src: str) -> None:
    """Model sanity before training: every rank's parameters are finite (NaN weights would
    train to NaN losses and save a NaN checkpoint). The flag is all-reduced so every rank
    raises together instead of one hanging in the next collective."""
    params = list(model.parameters())
    bad = torch.zeros(1, device=params[0].device if params else "cpu")
    for p in params:
        if not torch.isfinite(p).all():
            bad.fill_(1.0)
            break
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() > 0:
        raise ModelError(f"{src}: the model's weights hold NaN/inf; nothing was trained")


def train_stage(
    cfg: Config,
    stage_dirs: list[str],
    start: str,
    out: str,
    kill_at_step: int | None = None,
) -> dict:
    """Train one stage from ``start`` (HF folder or Megatron checkpoint) on ``stage_dirs``
    into the checkpoint folder ``out``; resumes when ``out`` already holds a checkpoint.
    Collective over the torchrun world. Returns a summary (final loss, steps, tokens/s).
    ``kill_at_step`` (tests): SIGKILL this process after that step (and its save, if any)."""

    t = cfg.train
    plan = plan_stage(cfg, stage_dirs, start, out)
    seq, steps, hf_cfg, opts = plan.seq_length, plan.train_steps, plan.hf_config, plan.model_options

    init_distributed(cfg.parallel, seed=cfg.seed)
    dp = ps.get_data_parallel_world_size()
    dp_rank = ps.get_data_parallel_rank()
    model = M.build_gpt_model(hf_cfg, opts, max_seq_length=seq)
    if plan.resume_from_step is None:
        load_start_weights(model, start, hf_cfg)
        check_finite_weights(model, start)
    ddp = wrap_ddp(wrap_float16(model))
    opt, sched = build_optimizer(cfg, model, ddp, steps)
    state = {"iteration": 0, "consumed_samples": 0}
    if plan.resume_from_step is not None:
        state = load_checkpoint(out, model, opt, sched)
        check_finite_weights(model, out)
        log.info("resumed %s at step %d", out, state["iteration"])
    else:
        write_meta(
            out,
            hf_cfg,
            opts,
            plan.meta_src,
            {
                "start": os.path.abspath(start) if os.path.exists(start) else start,
                "stage_dirs": [os.path.abspath(d) for d in stage_dirs],
                "seq_length": seq,
                "train_steps": steps,
                "config_hash": cfg.hash(),
            },
        )
    barrier()

    # the EOS that closes every chunk; a stage folder from before "eod" was recorded falls
    # back to the model's EOS (the screening pipeline always used it)
    eod = int(plan.manifests[0].get("eod", hf_cfg.get("eos_token_id") or 0))
    ds = build_gpt_dataset(
        stage_dirs,
        seq_length=seq,
        eod=eod,
        seed=cfg.seed,
        num_samples=steps * t.global_batch_size,
        check_sha=False,
    )
    micro = micro_batches(cfg)
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    )

    writer = is_metrics_writer()
    metrics = None
    if writer:  # TensorBoard only when there is a step to log (a finished stage stays as is)
        tb = os.path.join(out, "tensorboard") if state["iteration"] < steps else None
        metrics = MetricsLog(os.path.join(out, "metrics.jsonl"), tb, state["iteration"])
    fpt = flops_per_token(hf_cfg, seq)
    peak = _peak_tflops()
    tokens_per_step = t.global_batch_size * seq
    last = {}
    bar = None
    if is_rank0():
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=state["iteration"], desc="train", unit="step")
    ddp.train()
    for step in range(state["iteration"], steps):
        t0 = time.perf_counter()
        it = iter(
            [collate(ds, batch_indices(step, j, cfg, dp_rank, dp), device) for j in range(micro)]
        )
        r = train_step(cfg, ddp, opt, sched, it, step)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        row = {
            "step": step + 1,
            "loss": r.loss,
            "lr": r.lr,
            "grad_norm": r.grad_norm,
            "tokens_per_s": tokens_per_step / dt,
        }
        if torch.cuda.is_available():
            world_gpus = dist.get_world_size()
            row["tflops_per_gpu"] = fpt * tokens_per_step / dt / world_gpus / 1e12
            if peak:
                row["mfu"] = row["tflops_per_gpu"] / peak
        if writer:
            metrics.write(row)
        last = row
        if bar is not None:
            bar.update(1)
            if (step + 1) % t.log_interval == 0:
                bar.set_postfix(loss=f"{r.loss:.4f}" if r.loss is not None else "-")
        done = step + 1
        if (t.save_interval and done % t.save_interval == 0) or done == steps:
            save_checkpoint(
                out, done, model, opt, sched, {"consumed_samples": done * t.global_batch_size}
            )
        if kill_at_step is not None and done == kill_at_step:  # tests: a hard crash
            os.kill(os.getpid(), signal.SIGKILL)
    if bar is not None:
        bar.close()
    if metrics is not None:
        metrics.close()
    close_checkpoint_writer()
    summary = broadcast_from_writer(last, writer)
    summary["steps"] = steps
    return summary


def _peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for k, v in PEAK_BF16_TFLOPS.items():
        if k in name:
            return v
    return None
