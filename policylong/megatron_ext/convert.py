"""Conversion between Hugging Face folders and PolicyLong Megatron checkpoints
(``policylong convert`` and ``policylong export``), under any TP/PP layout of
``cfg.parallel``. Both are collective over the torchrun world."""

from __future__ import annotations

import os

from policylong.config import Config
from policylong.paths import resolve_model_path

from . import model as M
from .checkpointing import (
    close_checkpoint_writer,
    is_megatron_checkpoint,
    iter_dir,
    latest_iteration,
    load_checkpoint,
    model_options,
    read_meta,
    save_checkpoint,
    write_meta,
)
from .parallel import barrier, init_distributed


def convert_hf(cfg: Config, hf_src: str, out: str) -> str:
    """HF folder -> PolicyLong Megatron checkpoint (``iter_0000000``: model weights only) in
    the layout of ``cfg.parallel`` (any layout can load it later: dist_checkpointing
    reshards). Returns the iteration folder."""

    path = resolve_model_path(hf_src)
    hf_cfg = M.read_hf_config(path)
    if is_megatron_checkpoint(out) and latest_iteration(out) is not None:
        raise FileExistsError(f"{out} already holds a Megatron checkpoint")
    init_distributed(cfg.parallel, seed=cfg.seed)
    opts = model_options(cfg)
    model = M.build_gpt_model(hf_cfg, opts, max_seq_length=cfg.data.seq_length)
    M.load_hf_weights(model, hf_cfg, path)
    write_meta(out, hf_cfg, opts, path, {"start": os.path.abspath(path), "converted": True})
    barrier()
    save_checkpoint(out, 0, model)
    close_checkpoint_writer()
    return iter_dir(out, 0)


def export_checkpoint(cfg: Config, ckpt: str, hf_out: str, iteration: int | None = None) -> str:
    """PolicyLong Megatron checkpoint (latest iteration by default) -> HF folder. The exported
    config.json carries the RoPE base/scaling the model was trained with, so HF-based harnesses
    (RULER, HELMET) evaluate it as trained. Returns ``hf_out``."""
    meta = read_meta(ckpt)
    hf_cfg = meta["hf_config"]
    opts = M.ModelOptions(**meta["model_options"])
    init_distributed(cfg.parallel, seed=cfg.seed)
    model = M.build_gpt_model(hf_cfg, opts, max_seq_length=cfg.data.seq_length)
    load_checkpoint(ckpt, model, it=iteration)
    M.export_hf(model, hf_cfg, opts, hf_out, os.path.join(ckpt, M.HF_META))
    return hf_out
