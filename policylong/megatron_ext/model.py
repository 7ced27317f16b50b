"""Megatron-Core GPTModel from a Hugging Face Qwen2 / Llama checkpoint, and back.

Megatron-Bridge's AutoBridge does this for many families but does not install without CUDA
(it needs Transformer Engine), so this module holds an explicit, tested mapping for the family
PolicyLong trains (Qwen2 / Qwen2.5, Llama 2/3, Mistral without sliding windows): GQA, optional
QKV bias, RMSNorm, SwiGLU, tied or untied embeddings, RoPE with a configurable base and linear
position interpolation for context extension.

Weight layout (Megatron names on the left; ``tp`` shards, ``L`` local layer index):

    embedding.word_embeddings.weight      [V/tp, h]        model.embed_tokens.weight (rows)
    decoder.layers.L.input_layernorm      [h]              model.layers.i.input_layernorm
    ...self_attention.linear_qkv.weight   [g/tp·(q/g+2)·hd, h]  per query group g: its q heads,
                                                           then k_g, then v_g (q/k/v_proj)
    ...self_attention.linear_qkv.bias     same rows        q/k/v_proj.bias (Qwen2)
    ...self_attention.linear_proj.weight  [h, q·hd/tp]     o_proj.weight (columns)
    ...pre_mlp_layernorm.weight           [h]              post_attention_layernorm
    ...mlp.linear_fc1.weight              [2·f/tp, h]      [gate shard ; up shard]
    ...mlp.linear_fc2.weight              [h, f/tp]        down_proj.weight (columns)
    decoder.final_layernorm.weight        [h]              model.norm.weight
    output_layer.weight                   [V/tp, h]        lm_head.weight (untied, or tied on
                                                           the last stage when PP > 1)

With the Transformer Engine spec the two norms live inside ``linear_qkv.layer_norm_weight``
and ``linear_fc1.layer_norm_weight``; both spellings are handled. The vocabulary is padded to a
multiple of TP only when it does not divide (Qwen2.5's 151,936 and Llama 3's 128,256 divide by
8); pad rows are zero, and dropped again on export.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import gpt_layer_specs as specs
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig
from safetensors import safe_open
from safetensors.torch import save_file

from policylong.errors import InputNotFoundError, ModelError, PolicyLongError

from .attention import SDPAttention

SUPPORTED = ("qwen2", "llama", "mistral")
HF_META = "hf"
"""Sub-folder of a PolicyLong Megatron checkpoint with the HF config and tokenizer files."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)


class CheckpointMismatchError(PolicyLongError, ValueError):
    """A checkpoint's tensors do not fit the model built from the config."""


@dataclass
class ModelOptions:
    """How a HF model becomes a Megatron model for one run."""

    rotary_base: float | None = None
    """RoPE base θ. None keeps the HF config's; context extension raises it (the paper trains
    Qwen2.5-3B at 128K; ABF-style recipes use 1e6 to 1e7)."""
    rope_scaling_factor: float | None = None
    """Linear position interpolation factor (positions divided by it); None for none."""
    params_dtype: str = "float32"
    """float32 on CPU; bfloat16 on GPU (with fp32 main weights in the optimizer)."""
    recompute: bool = False
    """Full activation recomputation of every layer (trades ~33% more compute for activation
    memory; needed at 128K)."""
    spec: str = "auto"
    """Layer spec: ``local`` (megatron-core modules; materialises s×s attention scores),
    ``sdpa`` (local modules with PyTorch SDPA attention: flash kernels on CUDA), ``te``
    (Transformer Engine; GPU, needed for context parallelism), ``auto`` (te, else sdpa on
    CUDA; local on CPU)."""

    def __post_init__(self):
        if self.rotary_base is not None and not self.rotary_base > 0:
            raise ModelError(f"model.rotary_base = {self.rotary_base}: must be > 0")
        if self.rope_scaling_factor is not None and not self.rope_scaling_factor >= 1.0:
            raise ModelError(
                f"model.rope_scaling_factor = {self.rope_scaling_factor}: must be >= 1"
            )
        if self.params_dtype not in ("float32", "bfloat16", "float16"):
            raise ModelError(
                f"model.params_dtype = {self.params_dtype!r}: float32, bfloat16 or float16"
            )
        if self.spec not in ("auto", "local", "sdpa", "te"):
            raise ModelError(f"model.spec = {self.spec!r}: auto, local, sdpa or te")


# -- HF config ---------------------------------------------------------------------------------


def read_hf_config(hf_dir: str) -> dict:
    """config.json of a HF checkpoint folder, checked for the supported family."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise InputNotFoundError(f"{hf_dir}: no config.json (not a Hugging Face model folder)")
    with open(path) as f:
        cfg = json.load(f)
    mt = cfg.get("model_type")
    if mt not in SUPPORTED:
        raise ModelError(f"{path}: model_type {mt!r} is not supported (one of {SUPPORTED})")
    if cfg.get("use_sliding_window"):
        raise ModelError(f"{path}: use_sliding_window = true is not supported")
    return cfg


def _rope(cfg: dict) -> tuple[float, float | None]:
    """(rope_theta, linear scaling factor or None) from either HF config spelling."""
    rp = cfg.get("rope_parameters") or {}
    rs = cfg.get("rope_scaling") or {}
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = rp.get("rope_type") or rs.get("rope_type") or rs.get("type") or "default"
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), float(rp.get("factor", rs.get("factor")))
    raise ModelError(
        f"config.json: rope type {kind!r} is not supported (default or linear); "
        "set model.rope_scaling_factor / model.rotary_base instead"
    )


def head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def qkv_bias(cfg: dict) -> bool:
    return cfg["model_type"] == "qwen2" or bool(cfg.get("attention_bias", False))


def padded_vocab_size(vocab: int, tp: int) -> int:
    return -(-vocab // tp) * tp


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def transformer_config(cfg: dict, opts: ModelOptions, tp: int = 1, pp: int = 1, cp: int = 1):
    """A megatron-core ``TransformerConfig`` equal in function to the HF config."""

    if cfg.get("mlp_bias"):
        raise ModelError("config.json: mlp_bias = true is not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ModelError(f"config.json: hidden_act {act!r} is not supported (silu)")
    n_layers = int(cfg["num_hidden_layers"])
    if n_layers % pp != 0:
        raise ModelError(
            f"num_hidden_layers = {n_layers} is not divisible by parallel.pipeline_parallel = {pp}"
        )
    heads = int(cfg["num_attention_heads"])
    groups = int(cfg.get("num_key_value_heads") or heads)
    if groups % tp != 0:
        raise ModelError(
            f"num_key_value_heads = {groups} is not divisible by parallel.tensor_parallel = {tp}"
        )
    cuda = torch.cuda.is_available()
    dtype = _dtype(opts.params_dtype)
    return TransformerConfig(
        num_layers=n_layers,
        hidden_size=int(cfg["hidden_size"]),
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim(cfg),
        normalization="RMSNorm",
        layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        add_bias_linear=False,
        add_qkv_bias=qkv_bias(cfg),
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not cuda,
        # the fused kernels are CUDA-only; on GPU the TE spec brings its own fusions
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        recompute_granularity="full" if opts.recompute else None,
        recompute_method="uniform" if opts.recompute else None,
        recompute_num_layers=1 if opts.recompute else None,
    )


def resolve_spec(spec: str) -> str:
    """``auto``: ``te`` when Transformer Engine imports on CUDA, else ``sdpa`` on CUDA (flash
    kernels, O(s) memory), else ``local`` (CPU)."""
    if spec != "auto":
        return spec
    if not torch.cuda.is_available():
        return "local"
    try:
        import transformer_engine  # noqa: F401

        return "te"
    except ImportError:
        return "sdpa"


def _layer_spec(opts: ModelOptions, cp: int = 1):
    spec = resolve_spec(opts.spec)
    if spec == "te":
        return specs.get_gpt_layer_with_transformer_engine_spec()
    if cp > 1:
        raise ModelError(
            f"parallel.context_parallel = {cp} needs the Transformer Engine layer spec "
            "(train.layer_spec=te, on CUDA with transformer_engine installed)"
        )
    layer = specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    if spec == "sdpa":
        layer.submodules.self_attention.submodules.core_attention = SDPAttention
    return layer


def build_gpt_model(
    cfg: dict, opts: ModelOptions, max_seq_length: int, pre_process=None, post_process=None
):
    """GPTModel for this rank's pipeline stage (parallel_state must be initialised)."""

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    cp = ps.get_context_parallel_world_size()
    tcfg = transformer_config(cfg, opts, tp, pp, cp)
    theta, factor = _rope(cfg)
    if opts.rotary_base is not None:
        theta = opts.rotary_base
    if opts.rope_scaling_factor is not None:
        factor = opts.rope_scaling_factor
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=_layer_spec(opts, cp),
        vocab_size=padded_vocab_size(int(cfg["vocab_size"]), tp),
        max_sequence_length=max_seq_length,
        pre_process=ps.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=ps.is_pipeline_last_stage() if post_process is None else post_process,
        share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=int(theta) if float(theta).is_integer() else theta,
        rotary_percent=1.0,
        seq_len_interpolation_factor=factor,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


# -- HF weights ----------------------------------------------------------------------------------


class HFWeights:
    """Lazy reader of a HF checkpoint's safetensors (one file or an index of shards)."""

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        idx = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.isfile(idx):
            with open(idx) as f:
                wm = json.load(f)["weight_map"]
            files = sorted(set(wm.values()))
        elif os.path.isfile(single):
            files = ["model.safetensors"]
            wm = None
        else:
            raise InputNotFoundError(
                f"{hf_dir}: no model.safetensors or model.safetensors.index.json"
            )
        self._handles = {fn: safe_open(os.path.join(hf_dir, fn), "pt") for fn in files}
        if wm is None:
            wm = {k: "model.safetensors" for k in self._handles["model.safetensors"].keys()}
        self.weight_map = wm

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointMismatchError(f"{self.dir}: tensor {name!r} is missing")
        return self._handles[self.weight_map[name]].get_tensor(name)


def _stage_layers(cfg: dict, pp_rank: int, pp: int) -> range:
    per = int(cfg["num_hidden_layers"]) // pp
    return range(pp_rank * per, (pp_rank + 1) * per)


def _check_shape(name: str, t: torch.Tensor, shape, src: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise CheckpointMismatchError(
            f"{src}: {name} has shape {tuple(t.shape)}, the config expects {tuple(shape)}"
        )
    return t


def _qkv_full(cfg: dict, q, k, v) -> torch.Tensor:
    """HF q/k/v (rows per head) -> Megatron's grouped [g × (q/g + 2) × hd, ...] layout."""
    heads = int(cfg["num_attention_heads"])
    groups = int(cfg.get("num_key_value_heads") or heads)
    hd = head_dim(cfg)
    rest = q.shape[1:]
    qg = q.reshape(groups, heads // groups * hd, *rest)
    kg = k.reshape(groups, hd, *rest)
    vg = v.reshape(groups, hd, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def _qkv_split(cfg: dict, qkv: torch.Tensor):
    heads = int(cfg["num_attention_heads"])
    groups = int(cfg.get("num_key_value_heads") or heads)
    hd = head_dim(cfg)
    rest = qkv.shape[1:]
    x = qkv.reshape(groups, (heads // groups + 2) * hd, *rest)
    q, k, v = torch.split(x, [heads // groups * hd, hd, hd], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    if w.shape[0] == rows:
        return w
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])])


def _norm_names(sd_keys, prefix: str) -> tuple[str, str]:
    """(attention norm, MLP norm) parameter names of one layer for the local or TE spec."""
    te_attn = f"{prefix}.self_attention.linear_qkv.layer_norm_weight"
    if te_attn in sd_keys:
        return te_attn, f"{prefix}.mlp.linear_fc1.layer_norm_weight"
    return f"{prefix}.input_layernorm.weight", f"{prefix}.pre_mlp_layernorm.weight"


def hf_to_local_state(model, cfg: dict, hf: HFWeights) -> dict:
    """This rank's Megatron state dict (TP shard, PP stage) from HF weights."""

    tp = ps.get_tensor_model_parallel_world_size()
    tr = ps.get_tensor_model_parallel_rank()
    pp = ps.get_pipeline_model_parallel_world_size()
    pr = ps.get_pipeline_model_parallel_rank()
    keys = set(model.state_dict().keys())
    h = int(cfg["hidden_size"])
    f = int(cfg["intermediate_size"])
    V = int(cfg["vocab_size"])
    Vp = padded_vocab_size(V, tp)
    src = hf.dir
    out: dict[str, torch.Tensor] = {}

    def get(name: str, shape) -> torch.Tensor:
        return _check_shape(name, hf.get(name), shape, src)

    def rows(t, dim=0):
        return torch.chunk(t, tp, dim=dim)[tr]

    tied = bool(cfg.get("tie_word_embeddings", False))
    if "embedding.word_embeddings.weight" in keys:
        e = get("model.embed_tokens.weight", (V, h))
        out["embedding.word_embeddings.weight"] = rows(_pad_rows(e, Vp))
    if "output_layer.weight" in keys:
        name = "model.embed_tokens.weight" if tied else "lm_head.weight"
        w = get(name, (V, h))
        out["output_layer.weight"] = rows(_pad_rows(w, Vp))
    if "decoder.final_layernorm.weight" in keys:
        out["decoder.final_layernorm.weight"] = get("model.norm.weight", (h,))
    heads = int(cfg["num_attention_heads"])
    groups = int(cfg.get("num_key_value_heads") or heads)
    hd = head_dim(cfg)
    for local, i in enumerate(_stage_layers(cfg, pr, pp)):
        p = f"decoder.layers.{local}"
        q = f"model.layers.{i}"
        attn_norm, mlp_norm = _norm_names(keys, p)
        out[attn_norm] = get(f"{q}.input_layernorm.weight", (h,))
        out[mlp_norm] = get(f"{q}.post_attention_layernorm.weight", (h,))
        qw = get(f"{q}.self_attn.q_proj.weight", (heads * hd, h))
        kw = get(f"{q}.self_attn.k_proj.weight", (groups * hd, h))
        vw = get(f"{q}.self_attn.v_proj.weight", (groups * hd, h))
        out[f"{p}.self_attention.linear_qkv.weight"] = rows(_qkv_full(cfg, qw, kw, vw))
        if qkv_bias(cfg):
            qb, kb, vb = (hf.get(f"{q}.self_attn.{x}_proj.bias") for x in "qkv")
            out[f"{p}.self_attention.linear_qkv.bias"] = rows(_qkv_full(cfg, qb, kb, vb))
        ow = get(f"{q}.self_attn.o_proj.weight", (h, heads * hd))
        out[f"{p}.self_attention.linear_proj.weight"] = rows(ow, dim=1)
        gate = get(f"{q}.mlp.gate_proj.weight", (f, h))
        up = get(f"{q}.mlp.up_proj.weight", (f, h))
        out[f"{p}.mlp.linear_fc1.weight"] = torch.cat([rows(gate), rows(up)])
        down = get(f"{q}.mlp.down_proj.weight", (h, f))
        out[f"{p}.mlp.linear_fc2.weight"] = rows(down, dim=1)
    return out


def load_hf_weights(model, cfg: dict, hf_dir: str) -> None:
    """Copy a HF checkpoint into this rank's model shard; any missing or misshapen tensor is
    a :class:`CheckpointMismatchError` naming it."""
    hf = HFWeights(hf_dir)
    local = hf_to_local_state(model, cfg, hf)
    sd = model.state_dict()
    params = {k for k, v in sd.items() if isinstance(v, torch.Tensor) and "_extra_state" not in k}
    missing = sorted(params - set(local))
    if missing:
        raise CheckpointMismatchError(f"{hf_dir}: no HF tensor maps to {missing[:5]}")
    with torch.no_grad():
        for k, v in local.items():
            dst = sd[k]
            if tuple(dst.shape) != tuple(v.shape):
                raise CheckpointMismatchError(
                    f"{hf_dir}: {k} would get shape {tuple(v.shape)}, the model has "
                    f"{tuple(dst.shape)}"
                )
            dst.copy_(v.to(dst.dtype))


# -- export ------------------------------------------------------------------------------------


def _gather_tp(t: torch.Tensor, dim: int) -> torch.Tensor:
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def local_to_hf_state(model, cfg: dict) -> dict:
    """HF tensors (global layer indices) held by this rank's pipeline stage, TP-gathered."""

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    pr = ps.get_pipeline_model_parallel_rank()
    sd = model.state_dict()
    V = int(cfg["vocab_size"])
    out: dict[str, torch.Tensor] = {}
    tied = bool(cfg.get("tie_word_embeddings", False))
    if "embedding.word_embeddings.weight" in sd:
        out["model.embed_tokens.weight"] = _gather_tp(sd["embedding.word_embeddings.weight"], 0)[:V]
    if "output_layer.weight" in sd and not tied:
        out["lm_head.weight"] = _gather_tp(sd["output_layer.weight"], 0)[:V]
    if "decoder.final_layernorm.weight" in sd:
        out["model.norm.weight"] = sd["decoder.final_layernorm.weight"]
    for local, i in enumerate(_stage_layers(cfg, pr, pp)):
        p = f"decoder.layers.{local}"
        q = f"model.layers.{i}"
        attn_norm, mlp_norm = _norm_names(sd.keys(), p)
        out[f"{q}.input_layernorm.weight"] = sd[attn_norm]
        out[f"{q}.post_attention_layernorm.weight"] = sd[mlp_norm]
        qkv = _gather_tp(sd[f"{p}.self_attention.linear_qkv.weight"], 0)
        for x, t in zip("qkv", _qkv_split(cfg, qkv)):
            out[f"{q}.self_attn.{x}_proj.weight"] = t
        if f"{p}.self_attention.linear_qkv.bias" in sd:
            qkvb = _gather_tp(sd[f"{p}.self_attention.linear_qkv.bias"], 0)
            for x, t in zip("qkv", _qkv_split(cfg, qkvb)):
                out[f"{q}.self_attn.{x}_proj.bias"] = t
        out[f"{q}.self_attn.o_proj.weight"] = _gather_tp(
            sd[f"{p}.self_attention.linear_proj.weight"], 1
        )
        fc1 = sd[f"{p}.mlp.linear_fc1.weight"]
        gate, up = torch.chunk(fc1, 2, dim=0)
        out[f"{q}.mlp.gate_proj.weight"] = _gather_tp(gate, 0)
        out[f"{q}.mlp.up_proj.weight"] = _gather_tp(up, 0)
        out[f"{q}.mlp.down_proj.weight"] = _gather_tp(sd[f"{p}.mlp.linear_fc2.weight"], 1)
    del tp
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def hf_config_for_export(cfg: dict, opts: ModelOptions) -> dict:
    """The HF config with the RoPE settings the Megatron model was trained with."""
    cfg = dict(cfg)
    theta, factor = _rope(cfg)
    if opts.rotary_base is not None:
        theta = float(opts.rotary_base)
    if opts.rope_scaling_factor is not None:
        factor = float(opts.rope_scaling_factor)
    if "rope_parameters" in cfg or "rope_theta" not in cfg:
        rp = {"rope_theta": theta, "rope_type": "linear" if factor else "default"}
        if factor:
            rp["factor"] = factor
        cfg["rope_parameters"] = rp
        cfg.pop("rope_scaling", None)
        cfg.pop("rope_theta", None)
    else:
        cfg["rope_theta"] = theta
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": factor} if factor else None
    return cfg


def export_hf(model, cfg: dict, opts: ModelOptions, out_dir: str, meta_dir: str | None) -> None:
    """Write a HF checkpoint folder from the (sharded) Megatron model. Collective: every rank
    calls it. Each pipeline stage writes one safetensors shard (from its TP rank 0 of data-
    parallel rank 0); global rank 0 writes the index, config.json and the tokenizer files
    from ``meta_dir``. The folder is written as ``out_dir.partial`` and renamed when complete.
    """

    pp = ps.get_pipeline_model_parallel_world_size()
    pr = ps.get_pipeline_model_parallel_rank()
    tmp = out_dir.rstrip("/") + ".partial"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    state = local_to_hf_state(model, cfg)  # collective over TP: every rank
    shard = f"model-{pr + 1:05d}-of-{pp:05d}.safetensors" if pp > 1 else "model.safetensors"
    writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    if writer:
        save_file(state, os.path.join(tmp, shard), metadata={"format": "pt"})
    names = {k: shard for k in state} if writer else {}
    gathered = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(gathered, names)
    else:
        gathered = [names]
    if rank == 0:
        wm = {}
        for g in gathered:
            wm.update(g or {})
        if pp > 1:
            total = sum(os.path.getsize(os.path.join(tmp, s)) for s in set(wm.values()))
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f, indent=1)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config_for_export(cfg, opts), f, indent=2)
        if meta_dir:
            for fn in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(meta_dir, fn)):
                    shutil.copy2(os.path.join(meta_dir, fn), os.path.join(tmp, fn))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    if dist.is_initialized():
        dist.barrier()


def output_weight(model) -> torch.Tensor:
    """The last stage's LM-head parameter ``[vocab_padded/tp, d]``: the output layer's, or the
    word embedding's when they are tied."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


# -- forward (tests, evaluation) ----------------------------------------------------------------


def forward_only(model, tokens: torch.Tensor, hidden_only: bool = False):
    """One forward-only pass of ``tokens [b, s]`` through the pipeline schedule. Returns the
    last stage's output, None on the other stages: logits ``[b, s, V_local]``, or with
    ``hidden_only`` the decoder output after the final norm ``[s, b, d]`` (GPTModel skips its
    output layer when ``post_process`` is off, so no logits are built). Collective over the
    model-parallel group; the model's train/eval mode is restored."""

    b, s = tokens.shape
    pos = torch.arange(s, device=tokens.device)[None].expand(b, s)
    out = {}

    def step(data_iterator, m):
        x = next(data_iterator)
        y = m(x, pos, None)

        def keep(t):
            out["y"] = t
            return t.sum() * 0.0, {}

        return y, keep

    was_training, saved = model.training, model.post_process
    last = ps.is_pipeline_last_stage()
    model.eval()
    if hidden_only and last:
        model.post_process = False
    try:
        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=step,
                data_iterator=iter([tokens]),
                model=[model],
                num_microbatches=1,
                seq_length=s,
                micro_batch_size=b,
                forward_only=True,
            )
    finally:
        model.post_process = saved
        model.train(was_training)
    return out["y"] if last else None


def forward_logits(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits ``[b, s, V_padded]`` (float32, TP-gathered; rows past the HF vocabulary are the
    zero pad rows) of ``tokens [b, s]`` through every pipeline stage; returned on the last
    stage, None elsewhere. Collective over the model-parallel group."""

    logits = forward_only(model, tokens)
    if logits is None:
        return None
    return gather_from_tensor_model_parallel_region(logits.float())
