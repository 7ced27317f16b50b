"""Where models live: the embedded base model, model folders, ``CKPT@N`` sources.

The bottom layer: every command resolves a model source through these helpers, whatever loads
it next (the Hugging Face backend, the Megatron model, the index's tokenizer).
"""

from __future__ import annotations

import os

from policylong.errors import InputNotFoundError

ASSET_DIR = os.path.join(os.path.dirname(__file__), "assets", "base_model")
"""The embedded tiny base model (weights, config, tokenizer), rebuilt by
``policylong pretrain-base --out policylong/assets/base_model``."""


def embedded_model_dir() -> str:
    if not os.path.isfile(os.path.join(ASSET_DIR, "model.safetensors")):
        raise InputNotFoundError(
            f"{ASSET_DIR}: the embedded base model is missing; rebuild it with "
            "`policylong pretrain-base --out policylong/assets/base_model`"
        )
    return ASSET_DIR


def resolve_model_path(path: str) -> str:
    """A model folder: ``embedded`` names the shipped base model; anything else must exist."""
    if path == "embedded":
        return embedded_model_dir()
    if not os.path.isdir(path):
        raise InputNotFoundError(f"{path}: model directory not found")
    return path


def split_source(src: str) -> tuple[str, int | None]:
    """``CKPT@N`` -> (CKPT, N): iteration N of a PolicyLong Megatron checkpoint instead of its
    latest save; any other source -> (src, None). A trailing ``@<digits>`` always means an
    iteration."""
    path, sep, it = src.rpartition("@")
    if sep and path and it.isdigit():
        return path, int(it)
    return src, None
