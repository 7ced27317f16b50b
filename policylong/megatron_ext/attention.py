"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for the local
layer spec.

megatron-core's local ``DotProductAttention`` materialises the ``[b·heads, s, s]`` score matrix:
at s = 32,768 with 14 heads that is 15G elements (30 GB in bf16) per layer, so long sequences
need either Transformer Engine (the ``te`` spec) or this module, which hands the same
``[s, b, heads, head_dim]`` tensors to PyTorch's SDPA (FlashAttention-2 / memory-efficient
kernels on CUDA, O(s) memory; the math kernel on CPU). Same interface and result as
``DotProductAttention`` for causal self-attention without dropout, including its sliding window
(``config.window_size`` on the layers ``config.window_attn_skip_freq`` selects, Gemma 3's local
layers: an explicit mask, so the math / memory-efficient kernels rather than flash); context
parallelism is not supported (use the ``te`` spec).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention

from policylong.errors import ConfigError


class SDPAttention(MegatronModule):
    """Drop-in ``core_attention`` for megatron-core's ``SelfAttention`` (local spec)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type=None,
        pg_collection=None,
        **kwargs,
    ):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ConfigError(
                "the sdpa layer spec does not support context parallelism; use train.layer_spec=te"
            )
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.window = None  # (left, right): query i sees keys i - left ... i + right
        if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number
        ):
            self.window = tuple(config.window_size)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """``query [sq, b, np, hn]``, ``key``/``value [sk, b, ng, hn]`` -> ``[sq, b, np·hn]``."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed sequences / attention bias")
        sq, b, np_, hn = query.shape
        ng = key.shape[2]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if ng != np_:  # GQA: each KV head serves np/ng consecutive query heads
            k = k.repeat_interleave(np_ // ng, dim=1)
            v = v.repeat_interleave(np_ // ng, dim=1)
        mask = None
        causal = True
        if attention_mask is not None:  # megatron: True = masked out; SDPA: True = attend
            mask = ~attention_mask.bool()
            causal = False
        elif k.shape[2] != sq:  # KV-cached decoding: sq new queries after sk - sq cached keys
            # SDPA's is_causal aligns the mask top-left (query 0 sees key 0 only); the new
            # queries sit at the END of the keys, so the diagonal moves right by sk - sq
            sk = k.shape[2]
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            causal = False
        if self.window is not None:  # bottom-right aligned like the causal mask above
            sk = k.shape[2]
            d = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
            d = d - torch.arange(sk, device=q.device)[None, :]
            win = (d >= -self.window[1]) & (d <= self.window[0])
            mask = win if mask is None else mask & win
            causal = False
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
            scale=self.scale,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
