"""The plan of a training stage: every check that needs no process group, and the layout a run
would use. ``policylong train --dry-run`` prints ``StagePlan.summary()`` (the way to check a
CP > 1 layout on a machine without GPUs); ``train.train_stage`` runs from the same plan."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields

import torch.distributed as dist

from policylong.config import Config
from policylong.datasets import verify_stage_dataset
from policylong.errors import ResumeError

from . import model as M
from .checkpointing import (
    TrainError,
    check_compatible,
    is_megatron_checkpoint,
    latest_iteration,
    model_options,
    read_meta,
    resolve_start,
)

MODEL_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
"""The HF config keys a plan shows as ``model``."""

_INPUT = {"summary": False}  # metadata of the fields the summary leaves out


@dataclass(frozen=True)
class StagePlan:
    """One training stage, planned: its parallel layout, its batches and steps, its start and
    resume point, and the inputs a run needs (manifests, HF config), all checked."""

    world_size: int
    """Ranks of the job (``WORLD_SIZE``, or the size planned for)."""
    tensor_parallel: int
    """TP degree (``parallel.tensor_parallel``)."""
    pipeline_parallel: int
    """PP degree (``parallel.pipeline_parallel``)."""
    context_parallel: int
    """CP degree (``parallel.context_parallel``)."""
    data_parallel: int
    """DP degree: ``world_size / (TP · PP · CP)``."""
    micro_batches_per_step: int
    """Micro-batches per optimizer step on each DP rank:
    ``global_batch_size / (micro_batch_size · DP)``."""
    seq_length: int
    """Tokens per training sequence (``data.seq_length``)."""
    tokens_per_rank_per_micro_batch: int
    """Tokens one rank holds per micro-batch: ``micro_batch_size · seq_length / CP``."""
    train_steps: int
    """Optimizer steps of the stage: ``train.train_steps``, or one pass over the sequences
    (``sequences // global_batch_size``) when it is 0."""
    tokens_per_step: int
    """Tokens per optimizer step over the job: ``global_batch_size · seq_length``."""
    sequences: int
    """Sequences in the stage folders (their manifests' ``num_sequences``)."""
    start: str
    """The start model, as given (HF folder, ``embedded`` or a Megatron checkpoint)."""
    resume_from_step: int | None
    """The output checkpoint's latest complete save (the run resumes there); None: a fresh run."""
    model: dict
    """The start model's architecture: the ``MODEL_KEYS`` of its HF config."""
    model_options: M.ModelOptions
    """How the model is built (RoPE base and scaling, dtype, recompute, layer spec); a resumed
    run keeps the options its checkpoint recorded (``checkpointing.model_options``)."""
    manifests: list[dict] = field(metadata=_INPUT, repr=False)
    """The stage folders' manifests (each verified against its files' sha256)."""
    hf_config: dict = field(metadata=_INPUT, repr=False)
    """The start model's full HF config."""
    meta_src: str = field(metadata=_INPUT)
    """Folder with the start model's config and tokenizer files (copied into the checkpoint)."""

    def summary(self) -> dict:
        """The plan as JSON-ready data: every field but the inputs (``manifests``,
        ``hf_config``, ``meta_src``); what ``policylong train --dry-run`` prints."""
        d = asdict(self)
        return {f.name: d[f.name] for f in fields(self) if f.metadata.get("summary", True)}


def check_resume_key(out: str, cfg: Config, stage_dirs, start: str, seq: int, steps: int):
    """A checkpoint that has not reached its planned steps resumes only from the inputs it was
    started with (what its ``policylong.json`` records: stage folders, start model, config
    hash, sequence length, steps); else ``ResumeError`` names the input that changed. A
    finished checkpoint is not trained again, so it is not checked."""
    meta = read_meta(out)
    it = latest_iteration(out) or 0
    if it >= int(meta.get("train_steps", 1 << 62)):
        return
    now = {
        "stage_dirs": ("the stage folders (--stage-dir)", [os.path.abspath(d) for d in stage_dirs]),
        "start": (
            "the start model (--from)",
            os.path.abspath(start) if os.path.exists(start) else start,
        ),
        "config_hash": ("the config (its hash)", cfg.hash()),
        "seq_length": ("data.seq_length", seq),
        "train_steps": ("the planned steps", steps),
    }
    changed = [
        f"{what}: {meta[k]!r} -> {v!r}" if k != "config_hash" else what
        for k, (what, v) in now.items()
        if k in meta and meta[k] != v
    ]
    if changed:
        raise ResumeError(
            f"{out}: a partly trained checkpoint (step {it} of {meta.get('train_steps')}) from "
            f"other inputs; changed: {'; '.join(changed)}. Resuming would mix them: pass the "
            "original inputs, or another --to to train anew"
        )


def plan_stage(
    cfg: Config, stage_dirs: list[str], start: str, out: str, world_size: int | None = None
) -> StagePlan:
    """Every check that needs no process group, and the layout a run would use: TP/PP/CP/DP,
    micro-batches per step, steps, tokens per step, the resume point. Raises ``TrainError``
    (or ``StageDatasetError``, ``ValueError`` for the layout) before anything starts."""
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
    if is_megatron_checkpoint(out):
        check_resume_key(out, cfg, stage_dirs, start, seq, steps)
    return StagePlan(
        world_size=world_size,
        tensor_parallel=par.tensor_parallel,
        pipeline_parallel=par.pipeline_parallel,
        context_parallel=par.context_parallel,
        data_parallel=dp,
        micro_batches_per_step=t.global_batch_size // (t.micro_batch_size * dp),
        seq_length=seq,
        tokens_per_rank_per_micro_batch=t.micro_batch_size * seq // par.context_parallel,
        train_steps=steps,
        tokens_per_step=t.global_batch_size * seq,
        sequences=total,
        start=start,
        resume_from_step=resume,
        model={k: hf_cfg.get(k) for k in MODEL_KEYS},
        model_options=model_options(cfg, out if resume is not None else start),
        manifests=manifests,
        hf_config=hf_cfg,
        meta_src=meta_src,
    )
