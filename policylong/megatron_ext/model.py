"""Megatron-Core GPTModel from a Hugging Face Qwen2 / Qwen3 / Llama / Gemma 3 checkpoint, and
back.

Megatron-Bridge's AutoBridge does this for many families but does not install without CUDA
(it needs Transformer Engine), so this module holds an explicit, tested mapping for the families
PolicyLong trains (Qwen2 / Qwen2.5, Qwen3, Llama 2/3, Mistral without sliding windows, Gemma 3
text): GQA, optional QKV bias, RMSNorm, SwiGLU, tied or untied embeddings, RoPE with a
configurable base and linear position interpolation for context extension. Qwen3 adds QK-norm
(an RMSNorm over each head's query and key) and a head dimension decoupled from hidden / heads.
Gemma 3 adds the modules of :mod:`.gemma` (zero-centred norms, post-norms, two RoPE bases, the
embedding scale) and sliding-window layers. What megatron-core cannot express exactly (logit
soft-capping, bidirectional attention, Qwen3's sliding window, ...) is refused by
:func:`read_hf_config`, naming the field.

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
    ...self_attention.q_layernorm.weight  [hd]             self_attn.q_norm (Qwen3, Gemma 3)
    ...self_attention.k_layernorm.weight  [hd]             self_attn.k_norm
    output_layer.weight                   [V/tp, h]        lm_head.weight (untied, or tied on
                                                           the last stage when PP > 1)

Gemma 3's four norms per layer: ``input_layernorm`` -> ``input_layernorm``,
``post_attention_layernorm`` -> ``self_attention.post_layernorm``, ``pre_feedforward_layernorm``
-> ``pre_mlp_layernorm``, ``post_feedforward_layernorm`` -> ``mlp.post_layernorm`` (all
zero-centred, copied unchanged).

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
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from safetensors import safe_open
from safetensors.torch import save_file

from policylong.errors import InputNotFoundError, ModelError, PolicyLongError

from . import gemma
from .attention import SDPAttention

SUPPORTED = ("qwen2", "llama", "mistral", "qwen3", "gemma3_text")
QK_NORM = ("qwen3", "gemma3_text")
"""Families with an RMSNorm over each head's query and key (before RoPE)."""
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
    CUDA; local on CPU; Gemma 3, which has no te spec: sdpa on CUDA)."""

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
    """config.json of a HF checkpoint folder, checked for the supported families and for
    settings megatron-core cannot express exactly (refused, naming the field)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise InputNotFoundError(f"{hf_dir}: no config.json (not a Hugging Face model folder)")
    with open(path) as f:
        cfg = json.load(f)
    mt = cfg.get("model_type")
    if mt == "gemma3":
        raise ModelError(
            f"{path}: model_type 'gemma3' is the multimodal Gemma 3; convert its text model "
            "(Gemma3ForCausalLM, model_type 'gemma3_text')"
        )
    if mt not in SUPPORTED:
        raise ModelError(f"{path}: model_type {mt!r} is not supported (one of {SUPPORTED})")
    if cfg.get("use_sliding_window"):
        raise ModelError(f"{path}: use_sliding_window = true is not supported")
    if mt in ("qwen3", "gemma3_text") and cfg.get("attention_bias"):
        # o_proj would carry a bias too, which the mapping does not hold
        raise ModelError(f"{path}: attention_bias = true is not supported for {mt}")
    if mt == "gemma3_text":
        _check_gemma3(cfg, path)
    return cfg


def _check_gemma3(cfg: dict, path: str) -> None:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            # the fused entropy/policy kernels take softmax of the plain logits, and
            # megatron-core's attention has no soft-cap
            raise ModelError(f"{path}: {key} = {cfg[key]} is not supported (must be null)")
    if cfg.get("use_bidirectional_attention"):
        raise ModelError(f"{path}: use_bidirectional_attention = true is not supported")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise ModelError(f"{path}: hidden_activation {act!r} is not supported (gelu_pytorch_tanh)")
    types = gemma3_layer_types(cfg)
    bad = sorted(set(types) - {"sliding_attention", "full_attention"})
    if bad:
        raise ModelError(f"{path}: layer_types {bad} are not supported")
    if "sliding_attention" in types and not cfg.get("sliding_window", 4096):
        raise ModelError(
            f"{path}: sliding_window = {cfg.get('sliding_window')!r} with sliding layers"
        )
    local, _ = gemma3_ropes(cfg)
    if local[1] is not None:
        raise ModelError(
            f"{path}: rope_parameters.sliding_attention: only the default RoPE type is supported"
        )


def gemma3_layer_types(cfg: dict) -> list[str]:
    """Per-layer attention kinds; older configs give ``sliding_window_pattern`` (every n-th
    layer global) instead of ``layer_types``."""
    n = int(cfg["num_hidden_layers"])
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    every = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
    return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]


def gemma3_ropes(cfg: dict) -> tuple[tuple[float, float | None], tuple[float, float | None]]:
    """((local θ, linear factor), (global θ, linear factor)) of a Gemma 3 config, from either
    spelling: ``rope_parameters`` keyed by layer type, or ``rope_theta`` +
    ``rope_local_base_freq`` + ``rope_scaling`` (the global layers')."""
    rp = cfg.get("rope_parameters") or {}
    if "full_attention" in rp or "sliding_attention" in rp:
        g = rp.get("full_attention") or {}
        loc = rp.get("sliding_attention") or {}
        return (
            _rope({"rope_parameters": {"rope_theta": 10000.0, **loc}}),
            _rope({"rope_parameters": {"rope_theta": 1e6, **g}}),
        )
    local = (float(cfg.get("rope_local_base_freq", 10000.0)), None)
    return local, _rope(
        {"rope_theta": cfg.get("rope_theta", 1e6), "rope_scaling": cfg.get("rope_scaling")}
    )


def _rope(cfg: dict) -> tuple[float, float | None]:
    """(rope_theta, linear scaling factor or None) from either HF config spelling; Gemma 3:
    its global layers'."""
    if cfg.get("model_type") == "gemma3_text":
        return gemma3_ropes(cfg)[1]
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


_HEAD_DIM_DEFAULT = {"qwen3": 128, "gemma3_text": 256}
"""transformers' defaults where a config.json may omit ``head_dim``."""


def head_dim(cfg: dict) -> int:
    default = _HEAD_DIM_DEFAULT.get(cfg.get("model_type"))
    if default is None:
        default = cfg["hidden_size"] // cfg["num_attention_heads"]
    return int(cfg.get("head_dim") or default)


def tied(cfg: dict) -> bool:
    """Whether the LM head is the input embedding (Gemma 3's default is true)."""
    return bool(cfg.get("tie_word_embeddings", cfg.get("model_type") == "gemma3_text"))


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
    is_gemma = cfg["model_type"] == "gemma3_text"
    act = cfg.get("hidden_act", "silu")
    if not is_gemma and act != "silu":
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
    gemma_kw = {}
    if is_gemma:
        types = gemma3_layer_types(cfg)
        if "sliding_attention" in types:
            # HF: key j is seen by query i when i - window < j <= i; megatron-core's window
            # (left, right) keeps i - left <= j <= i + right
            gemma_kw["window_size"] = (int(cfg.get("sliding_window", 4096)) - 1, 0)
            gemma_kw["window_attn_skip_freq"] = [int(t == "sliding_attention") for t in types]
        gemma_kw["softmax_scale"] = float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5
    return TransformerConfig(
        **gemma_kw,
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
        activation_func=gemma.gelu_tanh if is_gemma else F.silu,
        qk_layernorm=cfg["model_type"] in QK_NORM,
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


def _layer_spec(cfg: dict, opts: ModelOptions, cp: int = 1, pp: int = 1):
    spec = resolve_spec(opts.spec)
    qk = cfg["model_type"] in QK_NORM
    gemma3 = cfg["model_type"] == "gemma3_text"
    if spec == "te" and gemma3 and opts.spec == "auto":
        spec = "sdpa"  # auto on a GPU with Transformer Engine: the closest spec Gemma 3 has
    if spec == "te" and gemma3:
        raise ModelError(
            "model_type 'gemma3_text' needs its own layer modules (post-norms, two RoPE bases): "
            "train.layer_spec = te is not supported for it; use sdpa or local"
        )
    if spec == "te":
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk)
    if cp > 1:
        raise ModelError(
            f"parallel.context_parallel = {cp} needs the Transformer Engine layer spec "
            "(train.layer_spec=te, on CUDA with transformer_engine installed)"
        )
    layer = specs.get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk)
    attn = layer.submodules.self_attention
    if spec == "sdpa":
        attn.submodules.core_attention = SDPAttention
    if not gemma3:
        return layer
    sub = layer.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = gemma.GemmaRMSNorm
    attn.submodules.q_layernorm = attn.submodules.k_layernorm = gemma.GemmaRMSNorm
    attn.module = gemma.GemmaSelfAttention
    attn.params = {**attn.params, "local_rotary_base": gemma3_ropes(cfg)[0][0]}
    sub.mlp.module = gemma.GemmaMLP
    per_stage = int(cfg["num_hidden_layers"]) // pp
    return TransformerBlockSubmodules(
        layer_specs=[layer] * per_stage, layer_norm=gemma.GemmaRMSNorm
    )


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
    spec = _layer_spec(cfg, opts, cp, pp)
    with gemma.quiet_custom_mlp():
        model = GPTModel(
            config=tcfg,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size(int(cfg["vocab_size"]), tp),
            max_sequence_length=max_seq_length,
            pre_process=ps.is_pipeline_first_stage() if pre_process is None else pre_process,
            post_process=ps.is_pipeline_last_stage() if post_process is None else post_process,
            share_embeddings_and_output_weights=tied(cfg),
            position_embedding_type="rope",
            rotary_base=int(theta) if float(theta).is_integer() else theta,
            rotary_percent=1.0,
            seq_len_interpolation_factor=factor,
        )
    if cfg["model_type"] == "gemma3_text" and model.pre_process:
        gemma.scale_embedding(model, int(cfg["hidden_size"]))
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


def _norm_map(cfg: dict, sd_keys, p: str, q: str) -> list[tuple[str, str, int]]:
    """(Megatron name, HF name, size) of every norm weight of one layer (``p``: Megatron prefix,
    ``q``: HF prefix). All are copied unchanged: Gemma's modules apply ``1 + weight`` as HF."""
    h = int(cfg["hidden_size"])
    hd = head_dim(cfg)
    mt = cfg["model_type"]
    if mt == "gemma3_text":
        out = [
            (f"{p}.input_layernorm.weight", f"{q}.input_layernorm.weight"),
            (f"{p}.self_attention.post_layernorm.weight", f"{q}.post_attention_layernorm.weight"),
            (f"{p}.pre_mlp_layernorm.weight", f"{q}.pre_feedforward_layernorm.weight"),
            (f"{p}.mlp.post_layernorm.weight", f"{q}.post_feedforward_layernorm.weight"),
        ]
        out = [(a, b, h) for a, b in out]
    else:
        attn_norm, mlp_norm = _norm_names(sd_keys, p)
        out = [
            (attn_norm, f"{q}.input_layernorm.weight", h),
            (mlp_norm, f"{q}.post_attention_layernorm.weight", h),
        ]
    if mt in QK_NORM:
        out += [
            (f"{p}.self_attention.q_layernorm.weight", f"{q}.self_attn.q_norm.weight", hd),
            (f"{p}.self_attention.k_layernorm.weight", f"{q}.self_attn.k_norm.weight", hd),
        ]
    return out


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

    is_tied = tied(cfg)
    if "embedding.word_embeddings.weight" in keys:
        e = get("model.embed_tokens.weight", (V, h))
        out["embedding.word_embeddings.weight"] = rows(_pad_rows(e, Vp))
    if "output_layer.weight" in keys:
        name = "model.embed_tokens.weight" if is_tied else "lm_head.weight"
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
        for meg, hf_name, size in _norm_map(cfg, keys, p, q):
            out[meg] = get(hf_name, (size,))
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
    is_tied = tied(cfg)
    if "embedding.word_embeddings.weight" in sd:
        out["model.embed_tokens.weight"] = _gather_tp(sd["embedding.word_embeddings.weight"], 0)[:V]
    if "output_layer.weight" in sd and not is_tied:
        out["lm_head.weight"] = _gather_tp(sd["output_layer.weight"], 0)[:V]
    if "decoder.final_layernorm.weight" in sd:
        out["model.norm.weight"] = sd["decoder.final_layernorm.weight"]
    for local, i in enumerate(_stage_layers(cfg, pr, pp)):
        p = f"decoder.layers.{local}"
        q = f"model.layers.{i}"
        for meg, hf_name, _ in _norm_map(cfg, sd.keys(), p, q):
            out[hf_name] = sd[meg]
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
    if cfg["model_type"] == "gemma3_text":
        return _gemma3_export_rope(cfg, theta, factor)
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


def _gemma3_export_rope(cfg: dict, theta: float, factor: float | None) -> dict:
    """Gemma 3: the global layers' RoPE (the one a run's rotary_base / rope_scaling_factor
    change); the sliding layers keep their local base."""
    if (theta, factor) == gemma3_ropes(cfg)[1]:
        return cfg  # unchanged: keep the source's spelling byte for byte
    g = {"rope_theta": theta, "rope_type": "linear" if factor else "default"}
    if factor:
        g["factor"] = factor
    rp = cfg.get("rope_parameters") or {}
    if "full_attention" in rp or "sliding_attention" in rp:
        cfg["rope_parameters"] = {**rp, "full_attention": g}
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
