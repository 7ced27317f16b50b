"""Rollouts, rewards and frozen scorers (teacher, reference) of the alignment loop.

A step's data is built here, before any gradient: the prompts of this data-parallel rank, G
responses each (from the live policy; from the teacher for the off-policy ``sft`` / ``kd``),
their rewards from the task verifier, group advantages, and the teacher's view of the same
tokens (sampled-token log-probs, or its final hidden states for the exact full-vocabulary KL).
``Batch`` holds it per response row; ``Batch.micro`` cuts it into micro-batches for the
pipeline schedule.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from policylong.config import AlignConfig, Config
from policylong.corpus import context_token_id, encode, eos_id, load_tokenizer
from policylong.errors import PolicyLongError
from policylong.kernels import fused_linear_policy
from policylong.megatron_ext.checkpointing import (
    TrainError,
    load_start_weights,
    model_options,
    resolve_start,
)
from policylong.megatron_ext.generate import Samples, hidden_rows, sample
from policylong.megatron_ext.model import build_gpt_model, output_weight
from policylong.megatron_ext.train import check_finite_weights
from policylong.paths import split_source
from policylong.tasks import TaskRecord, family, reward

from .objective import rollout_advantages


class AlignError(PolicyLongError, ValueError):
    """``policylong align`` cannot start: bad task file, teacher, start checkpoint or
    setting. Raised before any model work; the CLI prints it as one line."""


def rollout_seed(seed: int, step: int, prompt: int) -> int:
    """The sampler seed of prompt ``prompt`` (its index in the task file) at ``step``: a
    function of the three only, so a rollout does not depend on the data-parallel layout and
    a resumed run draws the same rollouts."""
    h = hashlib.sha256(f"{seed}:{step}:{prompt}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def step_prompts(n_tasks: int, p: int, step: int, seed: int) -> list[int]:
    """Indices of the ``p`` prompts of ``step``: the task file in a seeded order per epoch."""
    out = []
    for k in range(step * p, step * p + p):
        epoch, i = divmod(k, n_tasks)
        g = torch.Generator().manual_seed(rollout_seed(seed, -1 - epoch, 0))
        out.append(int(torch.randperm(n_tasks, generator=g)[i]))
    return out


# -- frozen scorers ----------------------------------------------------------------------------


def _tokenizer_vocab(tok) -> dict:
    return dict(tok.get_vocab())


def check_same_tokenizer(student_tok, student_src: str, other_tok, other_src: str, role: str):
    """AlignError unless ``other_tok`` maps every token to the same id as the student's
    (token-level distillation compares distributions id by id)."""
    a, b = _tokenizer_vocab(student_tok), _tokenizer_vocab(other_tok)
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))[:3]
        raise AlignError(
            f"align.{role}: {other_src} has another tokenizer than the student "
            f"{student_src} ({len(b)} vs {len(a)} tokens; first differences {diff}); "
            "token-level distillation needs one tokenizer"
        )


class Scorer:
    """A frozen model in this process (same TP layout as the policy): the teacher, or the
    reference policy. ``src``: a HF folder or a PolicyLong Megatron checkpoint (``CKPT@N``)."""

    def __init__(self, cfg: Config, src: str, role: str, max_seq_length: int):
        path, it = split_source(src)
        try:
            self.hf_cfg, self.meta_dir = resolve_start(path)
        except (OSError, ValueError) as e:
            raise AlignError(f"align.{role}: {src}: {e}") from e
        self.src, self.role = src, role
        self.tokenizer = load_tokenizer(self.meta_dir)
        self.vocab_size = int(self.hf_cfg["vocab_size"])
        self.model = build_gpt_model(
            self.hf_cfg, model_options(cfg, path), max_seq_length=max_seq_length
        )
        load_start_weights(self.model, path, self.hf_cfg, it)
        check_finite_weights(self.model, f"align.{role}: {src}")
        if self.model.config.bf16:  # what Float16Module does to the policy: every parameter
            self.model.bfloat16()  # (the local spec makes its norm weights float32)
        self.model.eval()
        for p_ in self.model.parameters():
            p_.requires_grad_(False)
        self._full_head = None

    def full_head(self) -> torch.Tensor:
        """The whole LM head ``[vocab_size, d]`` (all TP shards, pad rows dropped; last pipeline
        stage only); gathered once (the model is frozen) so any shard range of the student can
        be cut from it."""
        if self._full_head is None:
            m = self.model
            w = output_weight(m).detach()
            tp = ps.get_tensor_model_parallel_world_size()
            if tp > 1:
                parts = [torch.empty_like(w) for _ in range(tp)]
                dist.all_gather(parts, w.contiguous(), group=ps.get_tensor_model_parallel_group())
                w = torch.cat(parts, 0)
            self._full_head = w[: self.vocab_size]
        return self._full_head

    def head_shard(self, start: int, rows: int) -> torch.Tensor:
        """Rows ``[start, start + rows)`` of the head: the student shard's vocabulary."""
        return self.full_head()[start : start + rows]

    @torch.no_grad()
    def hidden(self, seqs, rows, pad) -> torch.Tensor:
        return hidden_rows(self.model, seqs, rows, pad)


# -- the step's data ---------------------------------------------------------------------------


@dataclass
class Batch:
    """The response rows of this data-parallel rank for one step (prompt-major: row p·G + g)."""

    seqs: list[list[int]]
    """Prompt + response tokens per row."""
    prompt_lens: list[int]
    resp: list[list[int]]
    """Response tokens per row."""
    logp_sampler: list[list[float]]
    rewards: torch.Tensor
    """[P_local, G] float64."""
    advantages: torch.Tensor
    """[P_local·G] float64 (group advantages; 0 for sft/kd)."""
    keep: torch.Tensor
    """[P_local·G] bool: rows that enter the loss (zero-variance groups dropped when asked)."""
    records: list[TaskRecord]
    stopped: list[bool]
    texts: list[str]
    teacher_hidden: torch.Tensor | None = None
    """[Σ response tokens, d_T]: the teacher's hidden states predicting each response token."""
    logp_teacher: list[list[float]] | None = None
    logp_ref: list[list[float]] | None = None
    extra: dict = field(default_factory=dict)

    def rows_of(self, i: int) -> list[int]:
        """Positions whose hidden state predicts row ``i``'s response tokens."""
        lp = self.prompt_lens[i]
        return list(range(lp - 1, lp - 1 + len(self.resp[i])))

    def token_offsets(self) -> list[int]:
        out, k = [], 0
        for r in self.resp:
            out.append(k)
            k += len(r)
        return out + [k]


def prompt_ids(tok, rec: TaskRecord, window: int, max_new: int) -> list[int]:
    """``[context token] + prompt`` ids; AlignError when prompt + response would not fit the
    model's window."""
    ids = [context_token_id(tok)] + encode(tok, rec.prompt)
    if len(ids) + max_new > window:
        raise AlignError(
            f"task {rec.id!r}: prompt of {len(ids)} tokens + align.max_new_tokens={max_new} "
            f"exceeds the model's window of {window} tokens"
        )
    return ids


def stop_ids(tok, families: set[str]) -> set[int]:
    """EOS and every family stop text that is one token."""
    out = {eos_id(tok)}
    for name in families:
        for s in family(name).stop:
            ids = encode(tok, s)
            if len(ids) == 1:
                out.add(ids[0])
    return out


def reference_response(tok, rec: TaskRecord) -> Samples:
    """The task's reference answer as the one response to its prompt: its tokens (a leading
    space, as a continuation of the prompt) closed by the family's stop token when it is one
    token, else EOS. Log-probs are 0 (no sampler)."""
    ids = encode(tok, " " + rec.answer)
    own = [t for s in family(rec.task).stop for t in [encode(tok, s)] if len(t) == 1]
    end = own[0][0] if own else eos_id(tok)
    ids = ids + [end]
    return Samples([ids], [[0.0] * len(ids)], [True])


def collect(
    cfg: Config,
    step: int,
    tok,
    policy_model,
    records: list[TaskRecord],
    prompt_index: list[int],
    prompts: list[list[int]],
    stops: set[int],
    vocab: int,
    sampler_model=None,
) -> Batch:
    """Rollouts of this rank's prompts (``prompt_index``: task-file indices, ``prompts``: their
    ids): G responses each from ``sampler_model`` (default the policy), rewards, advantages."""
    a: AlignConfig = cfg.align
    g = a.group_size
    model = sampler_model if sampler_model is not None else policy_model
    seqs, plens, resp, lps, stopped, texts, recs = [], [], [], [], [], [], []
    rewards = torch.zeros(len(prompts), g, dtype=torch.float64)
    gold = a.objective == "sft" and a.sft_target == "reference"
    if gold:
        g = 1
        rewards = torch.zeros(len(prompts), 1, dtype=torch.float64)
    for k, (pi, ids) in enumerate(zip(prompt_index, prompts)):
        rec = records[pi]
        if gold:
            s = reference_response(tok, rec)
        else:
            s = sample(
                model,
                ids,
                g,
                a.max_new_tokens,
                a.temperature,
                rollout_seed(cfg.seed, step, pi),
                stops,
                vocab,
            )
        for j in range(g):
            text = tok.decode(s.tokens[j], skip_special_tokens=True)
            rewards[k, j] = reward(rec, text)
            seqs.append(ids + s.tokens[j])
            plens.append(len(ids))
            resp.append(s.tokens[j])
            lps.append(s.logprobs[j])
            stopped.append(s.stopped[j])
            texts.append(text)
            recs.append(rec)
    if a.objective == "rl":
        adv, zero_var = rollout_advantages(a, rewards)
        adv = adv.reshape(-1)
        keep = torch.ones(len(seqs), dtype=torch.bool)
        if a.skip_zero_variance:
            keep = ~zero_var.repeat_interleave(g)
    else:
        adv = torch.zeros(len(seqs), dtype=torch.float64)
        keep = torch.ones(len(seqs), dtype=torch.bool)
        zero_var = torch.zeros(len(prompts), dtype=torch.bool)
    b = Batch(seqs, plens, resp, lps, rewards, adv, keep, recs, stopped, texts)
    b.extra["zero_variance"] = zero_var
    return b


@torch.no_grad()
def score_with(scorer: Scorer, batch: Batch, pad: int, want_hidden: bool, start: int, rows: int):
    """On the last pipeline stage (None, None elsewhere): the scorer's hidden states at the
    response positions ``[Σ tokens, d]`` and, unless only hidden states are wanted, its
    log-probs of the sampled tokens per row (over the student shard's vocabulary range
    ``[start, start + rows)``, combined over TP)."""
    h = scorer.hidden(batch.seqs, [batch.rows_of(i) for i in range(len(batch.seqs))], pad)
    if h is None:  # not the last pipeline stage: the loss, which needs these, lives there
        return None, None
    if want_hidden:
        return h, None
    tp = ps.get_tensor_model_parallel_world_size()
    grp = ps.get_tensor_model_parallel_group() if tp > 1 else None
    w = scorer.head_shard(start, rows)
    tgt = torch.tensor([t for r in batch.resp for t in r], dtype=torch.long, device=h.device)
    lp = fused_linear_policy(h.to(w.dtype), w, tgt, tp_group=grp)[0].cpu().tolist()
    off = batch.token_offsets()
    return None, [lp[off[i] : off[i + 1]] for i in range(len(batch.resp))]


def check_student(cfg: Config, src: str) -> tuple[dict, str]:
    """(HF config, tokenizer folder) of the start policy, with AlignError naming ``src``."""
    path, _ = split_source(src)
    try:
        return resolve_start(path)
    except (OSError, ValueError, TrainError) as e:
        raise AlignError(f"model.path: {src}: {e}") from e
