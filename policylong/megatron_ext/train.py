"""One PolicyLong training stage on Megatron-Core: M_t + S_t -> M_{t+1}.

The model is a megatron-core ``GPTModel`` (``megatron_ext.model``) built at the stage's start
checkpoint, wrapped in megatron-core's ``DistributedDataParallel``, trained with its optimizer
(Adam, fp32 main weights, global-norm clipping), ``OptimizerParamScheduler`` (warm-up, decay)
and pipeline schedules (``get_forward_backward_func``), reading the stage dataset through
``GPTDataset`` (``megatron_ext.data``). Checkpoints are megatron-core ``dist_checkpointing``
folders, so a run resumes, and reshards to another TP/PP layout, from them.

Checkpoint folder (``--to CKPT``)::

    CKPT/policylong.json                   HF config, model options, what the stage trained on
    CKPT/hf/                               config.json + tokenizer files of the start model
    CKPT/iter_0000100/                     dist_checkpointing: model, optimizer, scheduler, step
    CKPT/latest_checkpointed_iteration.txt the newest complete iter_* folder
    CKPT/metrics.jsonl                     one JSON line per step: step, loss, lr, grad_norm,
                                           tokens_per_s (+ tflops_per_gpu, mfu on GPU)

An ``iter_*`` folder is written as ``iter_*.partial`` and renamed when complete; the ``latest``
file is replaced atomically after that, so a killed run resumes from the last complete save.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from dataclasses import asdict
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from policylong.config import Config
from policylong.datasets import verify_stage_dataset
from policylong.paths import resolve_model_path, split_source

from . import model as M
from .data import build_gpt_dataset
from .parallel import init_distributed

log = logging.getLogger("policylong.train")

LATEST = "latest_checkpointed_iteration.txt"
META = "policylong.json"

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "H800": 989.0, "B200": 2250.0}
"""Dense bf16 peak per GPU from the vendors' datasheets, for MFU (leads, not measurements)."""


class TrainError(ValueError):
    """A training stage cannot start: bad layout, checkpoint or data (raised before step 1)."""


# -- checkpoints -----------------------------------------------------------------------------


def is_megatron_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META))


def latest_iteration(ckpt: str) -> int | None:
    f = os.path.join(ckpt, LATEST)
    if not os.path.isfile(f):
        return None
    with open(f) as fh:
        return int(fh.read().strip())


def iter_dir(ckpt: str, it: int) -> str:
    return os.path.join(ckpt, f"iter_{it:07d}")


def read_meta(ckpt: str) -> dict:
    f = os.path.join(ckpt, META)
    if not os.path.isfile(f):
        raise TrainError(f"{ckpt}: not a PolicyLong Megatron checkpoint (no {META})")
    with open(f) as fh:
        return json.load(fh)


def model_options(cfg: Config, src: str | None = None) -> M.ModelOptions:
    """Model options of a run. With ``src`` a PolicyLong Megatron checkpoint, the RoPE base and
    scaling it was trained with are kept unless the config sets them (a model trained at
    θ = 5e4 must not be rebuilt at its HF config's 1e4 by a command that does not repeat the
    setting, e.g. ``policylong report`` or the next ``policylong train --from``)."""
    t = cfg.train
    dtype = t.params_dtype
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    rotary, scale = t.rotary_base or None, t.rope_scaling_factor or None
    if src is not None:
        path = split_source(src)[0]
        if is_megatron_checkpoint(path):
            saved = read_meta(path).get("model_options", {})
            rotary = rotary or saved.get("rotary_base")
            scale = scale or saved.get("rope_scaling_factor")
    return M.ModelOptions(
        rotary_base=rotary,
        rope_scaling_factor=scale,
        params_dtype=dtype,
        recompute=t.recompute,
        spec=t.layer_spec,
    )


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def write_meta(ckpt: str, hf_cfg: dict, opts: M.ModelOptions, meta_src: str | None, extra=None):
    """CKPT/policylong.json and CKPT/hf/ (rank 0)."""
    if not _rank0():
        return
    os.makedirs(ckpt, exist_ok=True)
    hf_dir = os.path.join(ckpt, M.HF_META)
    os.makedirs(hf_dir, exist_ok=True)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    if meta_src and os.path.abspath(meta_src) != os.path.abspath(hf_dir):
        for fn in M.TOKENIZER_FILES:
            src = os.path.join(meta_src, fn)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(hf_dir, fn))
    meta = {"hf_config": hf_cfg, "model_options": asdict(opts), **(extra or {})}
    tmp = os.path.join(ckpt, META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(ckpt, META))


def check_compatible(ckpt: str, hf_cfg: dict) -> None:
    """Clear error when a checkpoint was saved for another architecture."""
    saved = read_meta(ckpt)["hf_config"]
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "tie_word_embeddings",
    )
    bad = [(k, saved.get(k), hf_cfg.get(k)) for k in keys if saved.get(k) != hf_cfg.get(k)]
    if bad:
        desc = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, a, b in bad)
        raise TrainError(f"{ckpt}: checkpoint shapes do not match the model config ({desc})")


def save_checkpoint(ckpt: str, it: int, model, optimizer=None, scheduler=None, extra=None):
    """dist_checkpointing save of model (+ optimizer, scheduler, step state) as iter_<it>."""

    final = iter_dir(ckpt, it)
    tmp = final + ".partial"
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    sd = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd["model"])
    if scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    sd["state"] = {"iteration": it, **(extra or {})}
    dist_checkpointing.save(sd, tmp)
    _barrier()
    if _rank0():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        t = os.path.join(ckpt, LATEST + ".tmp")
        with open(t, "w") as f:
            f.write(str(it))
        os.replace(t, os.path.join(ckpt, LATEST))
    _barrier()


def load_checkpoint(ckpt: str, model, optimizer=None, scheduler=None, it: int | None = None):
    """Load iter_<it> (default: the latest) into the model (+ optimizer, scheduler); returns
    the saved step state (``iteration``, ``consumed_samples``, ...)."""

    it = latest_iteration(ckpt) if it is None else it
    if it is None:
        raise TrainError(f"{ckpt}: no complete checkpoint ({LATEST} is missing)")
    path = iter_dir(ckpt, it)
    msd = model.sharded_state_dict()
    sd = {"model": msd}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(msd, is_loading=True)
    try:
        loaded = dist_checkpointing.load(sd, path)
    except Exception as e:  # shape or key mismatch inside megatron-core: name the folder
        raise TrainError(f"{path}: cannot load into this model: {e}") from e
    model.load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    return loaded.get("state", {"iteration": it})


def close_checkpoint_writer() -> None:
    """Shut down the multiprocessing Manager server that megatron-core's dist_checkpointing
    spawns for its write-results queue (0.16: one per process, never closed). Left alone it
    outlives the run and keeps the run's stdout/stderr open, so a caller that waits for them
    (a pipe, a test) waits forever."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return
    q = getattr(fa, "_results_queue", None)
    mgr = getattr(q, "_manager", None) if q is not None else None
    if mgr is not None:
        mgr.shutdown()
    fa._results_queue = None


def _barrier():
    if dist.is_initialized():
        dist.barrier()


# -- model + optimizer ---------------------------------------------------------------------


def resolve_start(src: str) -> tuple[dict, str]:
    """(HF config, folder with config + tokenizer) of a start checkpoint: a HF folder or a
    PolicyLong Megatron checkpoint."""

    if is_megatron_checkpoint(src):
        return read_meta(src)["hf_config"], os.path.join(src, M.HF_META)
    path = resolve_model_path(src)
    return M.read_hf_config(path), path


def build_model(hf_cfg: dict, opts: M.ModelOptions, seq_length: int):
    return M.build_gpt_model(hf_cfg, opts, max_seq_length=seq_length)


def load_start_weights(model, src: str, hf_cfg: dict, iteration: int | None = None) -> None:
    """Weights of the stage's start: HF safetensors, or the model part of a Megatron checkpoint
    (any TP/PP layout: dist_checkpointing reshards; ``iteration``: that save, not the latest)."""

    if is_megatron_checkpoint(src):
        check_compatible(src, hf_cfg)
        if iteration is not None and not os.path.isdir(iter_dir(src, iteration)):
            raise TrainError(f"{src}: no saved iteration {iteration}")
        load_checkpoint(src, model, it=iteration)
    else:
        M.load_hf_weights(model, hf_cfg, resolve_model_path(src))


def build_optimizer(cfg: Config, model, ddp, steps: int):
    t = cfg.train
    bf16 = model.config.bf16
    ocfg = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=bf16,
        params_dtype=model.config.params_dtype,
        use_distributed_optimizer=False,
    )
    opt = get_megatron_optimizer(ocfg, [ddp])
    gbs = t.global_batch_size
    warm = min(t.lr_warmup_steps, steps)
    sched = OptimizerParamScheduler(
        opt,
        init_lr=0.0 if warm else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=warm * gbs,
        lr_decay_steps=max(steps, 1) * gbs,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(steps, 1) * gbs,
        wd_incr_style="constant",
    )
    return opt, sched


def wrap_float16(model):
    """bf16/fp16 runs wrap the model in megatron-core's ``Float16Module``, as Megatron-LM's
    ``get_model`` does: every parameter (the RMSNorm weights of the local spec are created in
    float32) becomes bf16, and the last stage's output returns in float32. Without it a bf16
    model holds some float32 parameters and the mixed-precision optimizer's
    ``sharded_state_dict`` pairs its states with the wrong parameters (seen on an H200:
    "Optimizer shape ((896,) does not match model shape ((1152,))" at the first save).
    Parameter objects are converted in place, so ``model.sharded_state_dict()`` still names
    the optimizer's parameters."""
    if not (model.config.bf16 or model.config.fp16):
        return model

    return Float16Module(model.config, model)


def wrap_ddp(model):
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=False,
        check_for_nan_in_grad=False,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)


# -- data --------------------------------------------------------------------------------------


def batch_indices(step: int, micro: int, cfg: Config, dp_rank: int, dp: int) -> list[int]:
    """Dataset sample ids of micro-batch ``micro`` of optimizer step ``step`` on DP rank
    ``dp_rank``: deterministic, so a resumed run sees exactly the samples it would have."""
    t = cfg.train
    per_rank = t.global_batch_size // dp
    start = step * t.global_batch_size + dp_rank * per_rank + micro * t.micro_batch_size
    return list(range(start, start + t.micro_batch_size))


def collate(ds, ids: list[int], device) -> dict:
    samples = [ds[i] for i in ids]
    out = {}
    for k in ("tokens", "labels", "loss_mask", "position_ids"):
        out[k] = torch.stack([torch.as_tensor(s[k]) for s in samples]).to(device)
    return out


# -- steps -----------------------------------------------------------------------------------


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
    b = next(data_iterator)
    if ps.get_context_parallel_world_size() > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank

        b = get_batch_on_this_cp_rank(b)  # 2·CP chunks, load-balanced for causal attention
    out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    return out, partial(loss_func, b["loss_mask"])


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


def plan_stage(
    cfg: Config, stage_dirs: list[str], start: str, out: str, world_size: int | None = None
) -> dict:
    """Every check that needs no process group, and the layout a run would use: TP/PP/CP/DP,
    micro-batches per step, steps, tokens per step, the resume point. ``policylong train
    --dry-run`` prints it (the way to check a CP > 1 layout on a machine without GPUs)."""
    t = cfg.train
    par = cfg.parallel
    if not stage_dirs:
        raise TrainError("no stage folder given (--stage-dir)")
    if world_size is None:
        world_size = int(
            os.environ.get("WORLD_SIZE", dist.get_world_size() if dist.is_initialized() else 1)
        )
    dp = par.data_parallel(world_size)
    if t.global_batch_size % (t.micro_batch_size * dp) != 0:
        raise TrainError(
            f"train.global_batch_size = {t.global_batch_size} is not a multiple of "
            f"micro_batch_size × data-parallel size = {t.micro_batch_size} × {dp}"
        )

    manifests = [verify_stage_dataset(d) for d in stage_dirs]  # sha256 before any step
    seq = cfg.data.seq_length
    for d, m in zip(stage_dirs, manifests):
        if seq > int(m["seq_length"]):
            raise TrainError(
                f"{d}: data.seq_length = {seq} exceeds the dataset's sequences "
                f"({m['seq_length']} tokens each)"
            )
    if par.context_parallel > 1 and seq % (2 * par.context_parallel) != 0:
        raise TrainError(
            f"data.seq_length = {seq} must be divisible by 2 × parallel.context_parallel = "
            f"{2 * par.context_parallel} (load-balanced causal chunks)"
        )
    total = sum(int(m["num_sequences"]) for m in manifests)
    steps = t.train_steps or total // t.global_batch_size
    if steps < 1:
        raise TrainError(
            f"{total} sequences in {stage_dirs} make no full global batch of "
            f"{t.global_batch_size}; lower train.global_batch_size or set train.train_steps"
        )
    hf_cfg, meta_src = resolve_start(start)
    n_layers = int(hf_cfg["num_hidden_layers"])
    if n_layers % par.pipeline_parallel != 0:
        raise TrainError(
            f"num_hidden_layers = {n_layers} is not divisible by parallel.pipeline_parallel = "
            f"{par.pipeline_parallel}"
        )
    kv = int(hf_cfg.get("num_key_value_heads") or hf_cfg["num_attention_heads"])
    if kv % par.tensor_parallel != 0:
        raise TrainError(
            f"num_key_value_heads = {kv} is not divisible by parallel.tensor_parallel = "
            f"{par.tensor_parallel}"
        )
    if is_megatron_checkpoint(out):
        check_compatible(out, hf_cfg)
    resume = latest_iteration(out) if is_megatron_checkpoint(out) else None
    opts = model_options(cfg, out if resume is not None else start)
    return {
        "world_size": world_size,
        "tensor_parallel": par.tensor_parallel,
        "pipeline_parallel": par.pipeline_parallel,
        "context_parallel": par.context_parallel,
        "data_parallel": dp,
        "micro_batches_per_step": t.global_batch_size // (t.micro_batch_size * dp),
        "seq_length": seq,
        "tokens_per_rank_per_micro_batch": t.micro_batch_size * seq // par.context_parallel,
        "train_steps": steps,
        "tokens_per_step": t.global_batch_size * seq,
        "sequences": total,
        "start": start,
        "resume_from_step": resume,
        "model": {
            k: hf_cfg.get(k)
            for k in (
                "model_type",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
            )
        },
        "model_options": asdict(opts),
        "_manifests": manifests,
        "_hf_cfg": hf_cfg,
        "_meta_src": meta_src,
    }


def train_stage(
    cfg: Config,
    stage_dirs: list[str],
    start: str,
    out: str,
    kill_at_step: int | None = None,
) -> dict:
    """Train one stage from ``start`` (HF folder or Megatron checkpoint) on ``stage_dirs``
    into the checkpoint folder ``out``; resumes when ``out`` already holds a checkpoint.
    Collective over the torchrun world. Returns a summary (final loss, steps, tokens/s)."""

    t = cfg.train
    plan = plan_stage(cfg, stage_dirs, start, out)
    manifests, seq, steps, hf_cfg, meta_src = (
        plan["_manifests"],
        plan["seq_length"],
        plan["train_steps"],
        plan["_hf_cfg"],
        plan["_meta_src"],
    )

    init_distributed(cfg.parallel, seed=cfg.seed)
    dp = ps.get_data_parallel_world_size()
    dp_rank = ps.get_data_parallel_rank()
    resume = latest_iteration(out) if is_megatron_checkpoint(out) else None
    opts = model_options(cfg, out if resume is not None else start)
    model = build_model(hf_cfg, opts, seq)
    if resume is None:
        load_start_weights(model, start, hf_cfg)
    ddp = wrap_ddp(wrap_float16(model))
    opt, sched = build_optimizer(cfg, model, ddp, steps)
    state = {"iteration": 0, "consumed_samples": 0}
    if resume is not None:
        state = load_checkpoint(out, model, opt, sched)
        log.info("resumed %s at step %d", out, state["iteration"])
    else:
        write_meta(
            out,
            hf_cfg,
            opts,
            meta_src,
            {
                "start": os.path.abspath(start) if os.path.exists(start) else start,
                "stage_dirs": [os.path.abspath(d) for d in stage_dirs],
                "seq_length": seq,
                "train_steps": steps,
                "config_hash": cfg.hash(),
            },
        )
    _barrier()

    # the EOS that closes every chunk; a stage folder from before "eod" was recorded falls
    # back to the model's EOS (the screening pipeline always used it)
    eod = int(manifests[0].get("eod", hf_cfg.get("eos_token_id") or 0))
    ds = build_gpt_dataset(
        stage_dirs,
        seq_length=seq,
        eod=eod,
        seed=cfg.seed,
        num_samples=steps * t.global_batch_size,
        check_sha=False,
    )
    config = model.config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    fb = get_forward_backward_func()
    micro = t.global_batch_size // (t.micro_batch_size * dp)
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    )

    writer = is_metrics_writer()
    metrics_path = os.path.join(out, "metrics.jsonl")
    if writer:
        _truncate_metrics(metrics_path, state["iteration"])
    fpt = flops_per_token(hf_cfg, seq)
    peak = _peak_tflops()
    tokens_per_step = t.global_batch_size * seq
    last = {}
    bar = None
    if _rank0():
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=state["iteration"], desc="train", unit="step")
    ddp.train()
    for step in range(state["iteration"], steps):
        t0 = time.perf_counter()
        ddp.zero_grad_buffer()
        opt.zero_grad()
        it = iter(
            [collate(ds, batch_indices(step, j, cfg, dp_rank, dp), device) for j in range(micro)]
        )
        losses = fb(
            forward_step_func=forward_step,
            data_iterator=it,
            model=[ddp],
            num_microbatches=micro,
            seq_length=seq,
            micro_batch_size=t.micro_batch_size,
            forward_only=False,
        )
        lr = opt.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it next)
        ok, grad_norm, _ = opt.step()
        if not ok:
            raise RuntimeError(f"step {step + 1}: optimizer step skipped (inf/nan gradients)")
        sched.step(increment=t.global_batch_size)
        loss = _mean_loss(losses)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        row = {
            "step": step + 1,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": tokens_per_step / dt,
        }
        if torch.cuda.is_available():
            world_gpus = dist.get_world_size()
            row["tflops_per_gpu"] = fpt * tokens_per_step / dt / world_gpus / 1e12
            if peak:
                row["mfu"] = row["tflops_per_gpu"] / peak
        if writer:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        last = row
        if bar is not None:
            bar.update(1)
            if (step + 1) % t.log_interval == 0:
                bar.set_postfix(loss=f"{loss:.4f}" if loss is not None else "-")
        done = step + 1
        if (t.save_interval and done % t.save_interval == 0) or done == steps:
            save_checkpoint(
                out, done, model, opt, sched, {"consumed_samples": done * t.global_batch_size}
            )
        if kill_at_step is not None and done == kill_at_step:  # tests: a hard crash
            os.kill(os.getpid(), signal.SIGKILL)
    if bar is not None:
        bar.close()
    close_checkpoint_writer()
    summary = _broadcast_from_writer(last, writer)
    summary["steps"] = steps
    return summary


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


def _broadcast_from_writer(row: dict, writer: bool) -> dict:
    if not dist.is_initialized():
        return dict(row)
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, row if writer else None)
    for r in flags:
        if r is not None:
            return dict(r)
    return {}


def _truncate_metrics(path: str, step: int) -> None:
    """Drop metrics of steps after ``step`` (a killed run logged them but did not save)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


def _peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for k, v in PEAK_BF16_TFLOPS.items():
        if k in name:
            return v
    return None


# -- convert / export ------------------------------------------------------------------------


def convert_hf(cfg: Config, hf_src: str, out: str) -> str:
    """HF folder -> PolicyLong Megatron checkpoint (``iter_0000000``: model weights only) in
    the layout of ``cfg.parallel`` (any layout can load it later: dist_checkpointing
    reshards). Collective over the torchrun world."""

    path = resolve_model_path(hf_src)
    hf_cfg = M.read_hf_config(path)
    if is_megatron_checkpoint(out) and latest_iteration(out) is not None:
        raise FileExistsError(f"{out} already holds a Megatron checkpoint")
    init_distributed(cfg.parallel, seed=cfg.seed)
    opts = model_options(cfg)
    seq = cfg.data.seq_length
    model = build_model(hf_cfg, opts, seq)
    M.load_hf_weights(model, hf_cfg, path)
    write_meta(out, hf_cfg, opts, path, {"start": os.path.abspath(path), "converted": True})
    _barrier()
    save_checkpoint(out, 0, model)
    close_checkpoint_writer()
    return iter_dir(out, 0)


def export_checkpoint(cfg: Config, ckpt: str, hf_out: str, iteration: int | None = None) -> str:
    """PolicyLong Megatron checkpoint (latest iteration by default) -> HF folder, under any
    layout of ``cfg.parallel``. The exported config.json carries the RoPE base/scaling the
    model was trained with, so HF-based harnesses (RULER, HELMET) evaluate it as trained."""
    meta = read_meta(ckpt)
    hf_cfg = meta["hf_config"]
    opts = M.ModelOptions(**meta["model_options"])
    init_distributed(cfg.parallel, seed=cfg.seed)
    seq = cfg.data.seq_length
    model = build_model(hf_cfg, opts, seq)
    load_checkpoint(ckpt, model, it=iteration)
    M.export_hf(model, hf_cfg, opts, hf_out, os.path.join(ckpt, M.HF_META))
    return hf_out
