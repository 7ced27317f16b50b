"""Gemma 3 (``gemma3_text``) as megatron-core modules: what the local layer spec lacks.

megatron-core 0.16.1's ``TransformerLayer`` has one norm before attention and one before the
MLP, RMSNorm weights used as they are, and one RoPE base for the whole model. Gemma 3 differs
in four places, each reproduced here exactly as Hugging Face's ``modeling_gemma3`` computes it:

* RMSNorm scales by ``1 + weight`` in float32 and casts back (:class:`GemmaRMSNorm`); the
  weight is stored as HF stores it, so conversion copies it unchanged;
* a second norm on the output of attention and of the MLP, before the residual add
  (``post_attention_layernorm`` / ``post_feedforward_layernorm``): the attention and MLP
  subclasses below apply it to their (TP-reduced, full-width) output;
* sliding-window layers rotate with ``rope_local_base_freq`` (10,000), global layers with
  ``rope_theta`` (1,000,000): the sliding layers' attention swaps the model's rotary table for
  one of the same length built with the local base;
* the input embedding is multiplied by ``sqrt(hidden_size)`` in the embedding's dtype
  (:func:`scale_embedding`, a forward hook on the word embedding, so it holds for training,
  screening and decoding alike).

The sliding window itself (keys in ``(i - window, i]``) is megatron-core's ``window_size`` /
``window_attn_skip_freq`` (local spec) or :class:`..attention.SDPAttention`'s mask; the
softmax scale ``query_pre_attn_scalar ** -0.5`` is ``TransformerConfig.softmax_scale``; the
gated GELU (tanh approximation) is ``gated_linear_unit`` with :func:`gelu_tanh`.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """HF's ``gelu_pytorch_tanh``."""
    return F.gelu(x, approximate="tanh")


class GemmaRMSNorm(MegatronModule):
    """``x / rms(x) * (1 + weight)`` in float32, cast back to the input dtype (HF
    ``Gemma3RMSNorm``). The weight is zero-centred: 0 is the identity scale."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **kwargs):
        super().__init__(config=config)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class GemmaSelfAttention(SelfAttention):
    """Self-attention with a norm on its output and, on sliding-window layers, RoPE with the
    local base. ``local_rotary_base`` comes from the layer spec's params."""

    def __init__(self, config, *args, local_rotary_base: float = 10000.0, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.post_layernorm = GemmaRMSNorm(config, config.hidden_size, config.layernorm_epsilon)
        self.local_rope = None
        if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, self.layer_number
        ):
            self.local_rope = RotaryEmbedding(
                kv_channels=config.kv_channels,
                rotary_percent=1.0,
                rotary_base=local_rotary_base,
                use_cpu_initialization=config.use_cpu_initialization,
            )

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        if self.local_rope is not None and rotary_pos_emb is not None:
            first = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
            # the same positions (the model's table may extend past the sequence when decoding
            # with a KV cache; attention slices both the same way)
            rotary_pos_emb = self.local_rope(first.shape[0]).to(first.device)
        out, bias = super().forward(
            hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs
        )
        return self.post_layernorm(out), bias


class GemmaMLP(MLP):
    """The gated MLP with a norm on its output."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.post_layernorm = GemmaRMSNorm(config, config.hidden_size, config.layernorm_epsilon)

    def forward(self, hidden_states, *args, **kwargs):
        out, bias = super().forward(hidden_states, *args, **kwargs)
        return self.post_layernorm(out), bias


def scale_embedding(model, hidden_size: int) -> None:
    """Multiply the word embedding's output by ``sqrt(hidden_size)`` rounded to its dtype, as
    HF's ``Gemma3TextScaledWordEmbedding`` does (55.4256 becomes 55.5 in bfloat16). The hook
    acts after the TP all-reduce, where each row is whole."""
    scale = torch.tensor(hidden_size**0.5)

    def hook(module, args, output):
        return output * scale.to(device=output.device, dtype=output.dtype)

    model.embedding.word_embeddings.register_forward_hook(hook)


@contextlib.contextmanager
def quiet_custom_mlp():
    """megatron-core's TransformerLayer warns once per layer that it does not know
    :class:`GemmaMLP` and builds it with default kwargs; those defaults (the model-parallel TP
    group) are what the plain MLP gets, so the warning is dropped while a model is built."""
    log = logging.getLogger("megatron.core.transformer.transformer_layer")

    def keep(record):
        return not str(record.msg).startswith("Unknown MLP type")

    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)
