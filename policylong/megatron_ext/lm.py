"""The live Megatron-Core model as the screening pipeline's ``LanguageModel`` (on-policy).

Screening inside the training job needs no checkpoint conversion: ``final_hidden`` runs the
model's own pipeline schedule forward-only and returns the hidden states after the final norm
on every rank; ``head_weight`` is this rank's vocab shard of the LM head (pad rows dropped), so
``kernels.fused_linear_entropy(hidden, head_weight, tp_group)`` combines the shards across the
tensor-parallel group exactly as for any other backend. Full logits are never built: on the
last stage the model returns the decoder output instead of calling its output layer.

With PP > 1 the last stage broadcasts the hidden states (and, once, the head shard) to the
other stages of its pipeline group, so every rank can run the same screening code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from policylong.config import Config
from policylong.corpus import context_token_id, eos_id, load_tokenizer
from policylong.paths import split_source

from .checkpointing import load_start_weights, model_options, resolve_start
from .model import build_gpt_model, forward_only, output_weight
from .parallel import init_distributed


class MegatronLanguageModel:
    """``LanguageModel`` over this rank's stage of a megatron-core ``GPTModel``.

    Args:
        model: the (unwrapped) GPTModel of this rank's pipeline stage.
        hf_cfg: the HF config the model was built from (vocabulary size, window).
        tokenizer_dir: folder with the model's tokenizer files (a checkpoint's ``hf/``).
    """

    def __init__(self, model, hf_cfg: dict, tokenizer_dir: str):
        self.model = model
        self.config = hf_cfg
        self.vocab_size = int(hf_cfg["vocab_size"])
        tp = ps.get_tensor_model_parallel_world_size()
        self.tp_group = ps.get_tensor_model_parallel_group() if tp > 1 else None
        self.device = next(model.parameters()).device
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.eos_id = eos_id(self.tokenizer)
        self.ctx_id = context_token_id(self.tokenizer)
        self.max_length = int(hf_cfg.get("max_position_embeddings", 1 << 30))
        self._head = None

    def describe(self) -> str:
        return "megatron-live"

    @torch.no_grad()
    def final_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [b, s]`` -> hidden states after the final norm ``[b, s, d]``, every rank."""

        m = self.model
        tokens = tokens.to(self.device)
        b, s = tokens.shape
        h = forward_only(m, tokens, hidden_only=True)  # [s, b, d] on the last stage
        last = ps.is_pipeline_last_stage()
        pp = ps.get_pipeline_model_parallel_world_size()
        d = m.config.hidden_size
        if pp == 1:
            return h.transpose(0, 1)
        if last:
            h = h.transpose(0, 1).contiguous()
        else:
            h = torch.empty(b, s, d, dtype=m.config.params_dtype, device=self.device)
        src = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(h, src=src, group=ps.get_pipeline_model_parallel_group())
        return h

    def head_weight(self) -> torch.Tensor:
        """This rank's shard ``[v_local, d]`` of the LM head, without the zero pad rows that
        make the vocabulary divisible by TP. Re-read on every call (weights change during
        training); broadcast from the last stage when PP > 1."""

        m = self.model
        last = ps.is_pipeline_last_stage()
        if last:
            w = output_weight(m).detach()
        pp = ps.get_pipeline_model_parallel_world_size()
        if pp > 1:
            tp = ps.get_tensor_model_parallel_world_size()
            vp = -(-self.vocab_size // tp) * tp
            shape = (vp // tp, m.config.hidden_size)
            buf = (
                w.contiguous()
                if last
                else torch.empty(shape, dtype=m.config.params_dtype, device=self.device)
            )
            dist.broadcast(
                buf,
                src=ps.get_pipeline_model_parallel_last_rank(),
                group=ps.get_pipeline_model_parallel_group(),
            )
            w = buf
        start = ps.get_tensor_model_parallel_rank() * w.shape[0]
        keep = max(0, min(w.shape[0], self.vocab_size - start))
        return w[:keep]


def megatron_language_model(cfg: Config, src: str) -> MegatronLanguageModel:
    """M_t as a LanguageModel: the Megatron model built from ``src`` (a HF folder, a Megatron
    checkpoint, or ``CKPT@N`` for its iteration N) in this process."""
    init_distributed(cfg.parallel, seed=cfg.seed)
    path, iteration = split_source(src)
    hf_cfg, meta_dir = resolve_start(path)
    opts = model_options(cfg, path)
    model = build_gpt_model(hf_cfg, opts, max_seq_length=cfg.data.seq_length)
    load_start_weights(model, path, hf_cfg, iteration)
    return MegatronLanguageModel(model, hf_cfg, meta_dir)
