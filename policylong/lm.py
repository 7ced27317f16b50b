"""The model being screened with: the ``LanguageModel`` protocol and its Hugging Face backend.

Screening never asks a backend for logits. It asks for final hidden states (after the final
norm) and the local LM-head shard, and computes entropy with
``policylong.kernels.fused_linear_entropy`` so that ``[tokens × vocab]`` is never built. The
Megatron backend (``policylong.megatron_ext.lm``) serves the live training model through the
same protocol, with its tensor-parallel group.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Protocol, runtime_checkable

import torch

from .corpus import context_token_id, eos_id, load_tokenizer
from .errors import ConfigError, InputNotFoundError
from .paths import resolve_model_path

log = logging.getLogger(__name__)


@runtime_checkable
class LanguageModel(Protocol):
    """What screening needs from a model.

    Attributes:
        tp_group: the tensor-parallel process group the head is sharded over (None: unsharded);
            shards are contiguous vocabulary ranges in rank order, as Megatron's
            ``VocabParallelEmbedding`` lays them out.
        device: where ``final_hidden`` expects its tokens.
        tokenizer: the model's tokenizer (Hugging Face interface: encode / decode, eos).
        vocab_size: rows of the full LM head (the dataset's token ids are below it).
    """

    tp_group: Any
    device: torch.device
    tokenizer: Any
    vocab_size: int

    def final_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [b, s]`` (right-padded; causal, so padding never reaches earlier rows)
        -> final hidden states ``[b, s, d]`` after the final norm."""
        ...

    def head_weight(self) -> torch.Tensor:
        """The local LM-head shard ``[v_local, d]``."""
        ...


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device = {spec!r} but CUDA is not available on this machine")
    return torch.device(spec)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFLanguageModel:
    """A local Hugging Face causal LM checkpoint (any device, any dtype)."""

    tp_group = None

    def __init__(self, path: str, device: str = "auto", dtype: str = "float32"):
        from transformers import AutoModelForCausalLM  # third-party, heavy: HF backend only

        self.path = resolve_model_path(path)
        cfg_file = os.path.join(self.path, "config.json")
        if not os.path.isfile(cfg_file):
            raise InputNotFoundError(
                f"{self.path}: not a Hugging Face model directory (no config.json)"
            )
        self.device = pick_device(device)
        self.dtype = _DTYPES[dtype]
        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.path, dtype=self.dtype, local_files_only=True
            )
        except Exception as e:
            raise InputNotFoundError(f"{self.path}: cannot load the model ({e})") from e
        self.model = model.to(self.device).eval()
        self.tokenizer = load_tokenizer(self.path)
        with open(cfg_file) as f:
            self.config = json.load(f)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.eos_id = eos_id(self.tokenizer)
        self.ctx_id = context_token_id(self.tokenizer)
        # RoPE models extrapolate at any length; the config's window is what it was trained at
        self.max_length = int(self.config.get("max_position_embeddings", 1 << 30))

    @torch.no_grad()
    def final_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model.base_model(input_ids=tokens.to(self.device))
        return out.last_hidden_state

    def head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight.detach()

    def describe(self) -> str:
        return self.path


def load_language_model(path: str, device: str = "auto", dtype: str = "float32") -> HFLanguageModel:
    return HFLanguageModel(path, device=device, dtype=dtype)
