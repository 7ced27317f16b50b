"""PolicyLong Megatron checkpoints: the folder layout, its metadata, dist_checkpointing save and
load, and the start of a run (a HF folder or a checkpoint).

Checkpoint folder (``policylong train --to CKPT``)::

    CKPT/policylong.json                   HF config, model options, what the stage trained on
    CKPT/hf/                               config.json + tokenizer files of the start model
    CKPT/iter_0000100/                     dist_checkpointing: model, optimizer, scheduler, step
    CKPT/latest_checkpointed_iteration.txt the newest complete iter_* folder
    CKPT/metrics.jsonl                     one JSON line per step (``megatron_ext.train``)

An ``iter_*`` folder is written as ``iter_*.partial`` and renamed when complete; the ``latest``
file is replaced atomically after that, so a killed run resumes from the last complete save.
``iter_*`` folders are megatron-core ``dist_checkpointing`` folders: any TP/PP layout loads
them (they reshard).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict

import torch
from megatron.core import dist_checkpointing

from policylong.config import Config
from policylong.errors import PolicyLongError
from policylong.paths import resolve_model_path, split_source

from . import model as M
from .parallel import barrier, is_rank0

LATEST = "latest_checkpointed_iteration.txt"
META = "policylong.json"


class TrainError(PolicyLongError, ValueError):
    """A training stage (or a conversion, export or load) cannot start: bad layout, checkpoint
    or data. Raised before step 1; the CLI prints it as one line."""


# -- the folder and its metadata -------------------------------------------------------------


def is_megatron_checkpoint(path: str) -> bool:
    """True when ``path`` is a PolicyLong Megatron checkpoint folder (it has ``META``)."""
    return os.path.isfile(os.path.join(path, META))


def latest_iteration(ckpt: str) -> int | None:
    """The newest complete save of ``ckpt``, or None when it has none."""
    f = os.path.join(ckpt, LATEST)
    if not os.path.isfile(f):
        return None
    with open(f) as fh:
        return int(fh.read().strip())


def iter_dir(ckpt: str, it: int) -> str:
    """The dist_checkpointing folder of iteration ``it``."""
    return os.path.join(ckpt, f"iter_{it:07d}")


def read_meta(ckpt: str) -> dict:
    """``CKPT/policylong.json``: ``hf_config``, ``model_options`` and what the run recorded."""
    f = os.path.join(ckpt, META)
    if not os.path.isfile(f):
        raise TrainError(f"{ckpt}: not a PolicyLong Megatron checkpoint (no {META})")
    with open(f) as fh:
        return json.load(fh)


def write_meta(ckpt: str, hf_cfg: dict, opts: M.ModelOptions, meta_src: str | None, extra=None):
    """CKPT/policylong.json and CKPT/hf/ (rank 0)."""
    if not is_rank0():
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


# -- save / load -------------------------------------------------------------------------------


def save_checkpoint(
    ckpt: str, it: int, model, optimizer=None, scheduler=None, extra=None, before_commit=None
):
    """dist_checkpointing save of model (+ optimizer, scheduler, step state) as iter_<it>.
    Collective: every rank calls it. ``before_commit`` (tests): called once the shards are
    written, before the folder is renamed into place (where a crash leaves a ``.partial``)."""

    final = iter_dir(ckpt, it)
    tmp = final + ".partial"
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    sd = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd["model"])
    if scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    sd["state"] = {"iteration": it, **(extra or {})}
    dist_checkpointing.save(sd, tmp)
    barrier()
    if before_commit is not None:
        before_commit()
    if is_rank0():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        t = os.path.join(ckpt, LATEST + ".tmp")
        with open(t, "w") as f:
            f.write(str(it))
        os.replace(t, os.path.join(ckpt, LATEST))
    barrier()


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


# -- the start of a run ----------------------------------------------------------------------


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


def resolve_start(src: str) -> tuple[dict, str]:
    """(HF config, folder with config + tokenizer) of a start checkpoint: a HF folder or a
    PolicyLong Megatron checkpoint."""

    if is_megatron_checkpoint(src):
        return read_meta(src)["hf_config"], os.path.join(src, M.HF_META)
    path = resolve_model_path(src)
    return M.read_hf_config(path), path


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
