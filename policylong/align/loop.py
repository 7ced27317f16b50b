"""``policylong align``: dGRPO and its baselines on the live Megatron-Core policy.

Per step: this data-parallel rank's prompts (``rollout.step_prompts``), G KV-cached rollouts
each (``megatron_ext.generate``; the teacher's for ``sft`` / ``kd``), verifier rewards and
group advantages, the teacher's (and reference's) view of the same tokens, then
``align.minibatches`` optimizer steps through megatron-core's pipeline schedule, DDP and
optimizer. The loss head is ``kernels.fused_linear_policy`` on the final hidden states: the
sampled-token log-prob, entropy and exact teacher KL, never the ``[tokens × vocab]`` logits.

Every micro-batch returns its loss summed and divided by the count of the whole minibatch
(tokens or rows over all DP ranks), times micro-batches × DP, because megatron-core's schedule
divides by the number of micro-batches and its DDP averages over DP: the gradient is then
the gradient of the minibatch's loss whatever the DP size and micro-batch size.

Run folder ``WORKDIR/align/<preset>/``: ``ckpt/`` (PolicyLong Megatron checkpoint),
``metrics.jsonl`` (one line per step), ``rollouts.jsonl`` (every response with its reward),
``tasks.jsonl`` (when generated), ``align.json`` (the inputs; a rerun with other inputs is
refused), ``tensorboard/`` (when tensorboard is installed). A rerun resumes from the last
save; rollouts are seeded by (seed, step, prompt), so it redraws exactly what it lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, replace
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from policylong.config import AlignConfig, Config
from policylong.corpus import eos_id, load_tokenizer
from policylong.errors import ModelError
from policylong.kernels import fused_linear_policy
from policylong.logs import MetricsLog, die_if, truncate_jsonl
from policylong.megatron_ext.checkpointing import (
    check_compatible,
    close_checkpoint_writer,
    is_megatron_checkpoint,
    latest_iteration,
    load_checkpoint,
    load_start_weights,
    model_options,
    resolve_start,
    save_checkpoint,
    write_meta,
)
from policylong.megatron_ext.generate import hidden_rows
from policylong.megatron_ext.model import build_gpt_model, output_weight
from policylong.megatron_ext.optim import build_optimizer, wrap_ddp, wrap_float16
from policylong.megatron_ext.parallel import barrier, init_distributed, is_rank0
from policylong.megatron_ext.step import broadcast_from_writer, is_metrics_writer
from policylong.megatron_ext.train import check_finite_weights
from policylong.paths import split_source
from policylong.tasks import TaskError, generate_tasks, read_tasks, tasks_jsonl, write_tasks

from .objective import dgrpo_loss
from .rollout import (
    AlignError,
    Batch,
    Scorer,
    check_same_tokenizer,
    check_student,
    collect,
    prompt_ids,
    score_with,
    step_prompts,
    stop_ids,
)

log = logging.getLogger("policylong.align")

RESUMABLE = ("steps", "save_interval")
"""Align settings a rerun may change and still resume (everything else must match)."""


def run_dir(cfg: Config) -> str:
    return os.path.join(cfg.workdir, "align", cfg.align.preset)


# -- inputs, checked before any model work -----------------------------------------------------


def _tasks(cfg: Config, tok):
    """(records, task-file bytes, file to write or None when the user gave the file)."""
    a = cfg.align
    try:
        if a.task_file != "none":
            path = cfg.path(a.task_file)
            recs = read_tasks(path)
            with open(path, "rb") as f:
                return recs, f.read(), None
        names = [x.strip() for x in a.tasks.split(",") if x.strip()]
        recs = generate_tasks(names, a.num_tasks, a.task_length, cfg.seed, tok)
    except TaskError as e:
        raise AlignError(str(e)) from None
    return recs, tasks_jsonl(recs), os.path.join(run_dir(cfg), "tasks.jsonl")


def _fingerprint(cfg: Config, tasks_bytes: bytes, hf_cfg: dict) -> dict:
    a = {k: v for k, v in asdict(cfg.align).items() if k not in RESUMABLE}
    return {
        "align": a,
        "seed": cfg.seed,
        "model.path": cfg.model.path,
        "teacher": cfg.align.teacher,
        "tasks_sha256": hashlib.sha256(tasks_bytes).hexdigest(),
        "hf_config": {k: hf_cfg.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
    }


def _check_resume(out: str, fp: dict) -> None:
    f = os.path.join(out, "align.json")
    if not os.path.isfile(f):
        return
    with open(f) as fh:
        old = json.load(fh)
    diffs = []
    for k in fp:
        if k == "align":
            diffs += [
                f"align.{n}: {old['align'].get(n)!r} -> {v!r}"
                for n, v in fp["align"].items()
                if old.get("align", {}).get(n) != v
            ]
        elif old.get(k) != fp[k]:
            diffs.append(f"{k}: {old.get(k)!r} -> {fp[k]!r}")
    if diffs:
        raise AlignError(
            f"{out}: a run with other inputs is there ({'; '.join(diffs[:4])}); "
            "set another align.preset or move that folder away"
        )


def _layout(cfg: Config) -> None:
    a, par = cfg.align, cfg.parallel
    if par.context_parallel != 1:
        raise AlignError(
            f"parallel.context_parallel = {par.context_parallel}: align runs TP × PP × DP "
            "(the KV-cached sampler holds whole sequences); set it to 1"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mp = par.tensor_parallel * par.pipeline_parallel
    if world % mp:
        raise AlignError(
            f"parallel.tensor_parallel × pipeline_parallel = {mp} does not divide {world} ranks"
        )
    dp = world // mp
    per = a.prompts_per_step // a.minibatches
    if per % dp:
        raise AlignError(
            f"align.prompts_per_step / align.minibatches = {per} prompts per optimizer step "
            f"must divide over {dp} data-parallel ranks"
        )


def plan_align(cfg: Config):
    """Everything checked before a model is built: layout, student, teacher, tasks, windows,
    resume. Returns what the loop needs."""
    a = cfg.align
    _layout(cfg)
    out = run_dir(cfg)
    hf_cfg, meta_dir = check_student(cfg, cfg.model.path)
    tok = load_tokenizer(meta_dir)
    window = int(hf_cfg.get("max_position_embeddings") or cfg.data.seq_length)
    ckpt = os.path.join(out, "ckpt")
    if is_megatron_checkpoint(ckpt):
        try:
            check_compatible(ckpt, hf_cfg)
        except ValueError as e:
            raise AlignError(f"{e}; model.path is {cfg.model.path}") from None
    t_src = None
    if a.teacher != "none":
        t_path, _ = split_source(a.teacher)
        try:
            _, t_meta = resolve_start(t_path)
        except (OSError, ValueError) as e:
            raise AlignError(f"align.teacher: {a.teacher}: {e}") from None
        check_same_tokenizer(tok, cfg.model.path, load_tokenizer(t_meta), a.teacher, "teacher")
        t_src = a.teacher
    records, tasks_bytes, tasks_out = _tasks(cfg, tok)
    prompts = [prompt_ids(tok, r, window, a.max_new_tokens) for r in records]
    fp = _fingerprint(cfg, tasks_bytes, hf_cfg)
    _check_resume(out, fp)
    return {
        "out": out,
        "ckpt": ckpt,
        "hf_cfg": hf_cfg,
        "meta_dir": meta_dir,
        "tok": tok,
        "window": window,
        "records": records,
        "prompts": prompts,
        "teacher": t_src,
        "fingerprint": fp,
        "tasks_out": tasks_out,
    }


# -- the training step -------------------------------------------------------------------------


def _head(model, vocab: int):
    """This rank's LM-head shard (the parameter itself, so gradients reach it), cut to the
    first ``vocab`` ids; and the shard's first id."""
    w = output_weight(model)
    start = ps.get_tensor_model_parallel_rank() * w.shape[0]
    keep = max(0, min(w.shape[0], vocab - start))
    return w[:keep], start


def _micro(batch: Batch, idx: list[int | None], s: int, ctx: dict, device) -> dict:
    """Tensors of micro-batch rows ``idx`` (None: a padding row with no response tokens),
    right-padded to ``s`` tokens, for ``_loss``. Every micro-batch of a step has the same
    ``[micro_batch_size, s]`` shape: the pipeline schedule sends fixed-shape activations."""
    real = [i for i in idx if i is not None]
    tokens = torch.full((len(idx), s), ctx["pad"], dtype=torch.long)
    for j, i in enumerate(idx):
        if i is not None:
            tokens[j, : len(batch.seqs[i])] = torch.tensor(batch.seqs[i])
    t = max(len(batch.resp[i]) for i in real)
    mask = torch.zeros(len(idx), t, dtype=torch.bool)
    row, col, pos, tgt = [], [], [], []
    for j, i in enumerate(idx):
        if i is None:
            continue
        n = len(batch.resp[i])
        mask[j, :n] = bool(batch.keep[i])
        row += [j] * n
        col += list(range(n))
        pos += batch.rows_of(i)
        tgt += batch.resp[i]

    def padded(lists):
        x = torch.zeros(len(idx), t, dtype=torch.float32)
        for j, i in enumerate(idx):
            if i is not None:
                x[j, : len(lists[i])] = torch.tensor(lists[i], dtype=torch.float32)
        return x

    adv = torch.zeros(len(idx), dtype=torch.float32)
    for j, i in enumerate(idx):
        if i is not None:
            adv[j] = float(batch.advantages[i])
    mb = {
        "tokens": tokens.to(device),
        "pos": torch.arange(s, device=device)[None].expand(len(idx), s),
        "row": torch.tensor(row),
        "col": torch.tensor(col),
        "bi": torch.tensor(row, device=device),
        "ti": torch.tensor(pos, device=device),
        "targets": torch.tensor(tgt, dtype=torch.long, device=device),
        "mask": mask,
        "adv": adv,
        "logp_sampler": padded(batch.logp_sampler),
    }
    if batch.logp_teacher is not None:
        mb["logp_teacher"] = padded(batch.logp_teacher)
    if batch.logp_ref is not None:
        mb["logp_ref"] = padded(batch.logp_ref)
    if batch.extra.get("logp_old") is not None:
        mb["logp_old"] = padded(batch.extra["logp_old"])
    if batch.teacher_hidden is not None:
        off = batch.token_offsets()
        mb["teacher_hidden"] = torch.cat(
            [batch.teacher_hidden[off[i] : off[i + 1]] for i in real]
        ).to(device)
    return mb


def _loss(a: AlignConfig, ctx: dict, mb: dict, hidden: torch.Tensor):
    """megatron-core ``loss_func``: the micro-batch's share of the minibatch loss (see the
    module docstring for the scaling) and its metric sums."""
    h = hidden[mb["ti"], mb["bi"]]  # [n, d]: the positions predicting response tokens
    w, tw = ctx["head"], ctx.get("teacher_head")
    th = mb.get("teacher_hidden")
    logp, ent, kl = fused_linear_policy(
        h.to(w.dtype),
        w,
        mb["targets"],
        teacher_hidden=None if th is None else th.to(tw.dtype),
        teacher_weight=None if th is None else tw,
        temperature=a.temperature,
        tp_group=ctx["tp_group"],
    )
    b, t = mb["mask"].shape
    idx = (mb["row"], mb["col"])

    def grid(x):
        return torch.zeros(b, t, dtype=x.dtype).index_put(idx, x.cpu())

    lp, en = grid(logp), grid(ent)
    klg = None if kl is None else grid(kl)
    logp_old = mb.get("logp_old", mb["logp_sampler"])
    loss, m = dgrpo_loss(
        a,
        lp,
        mb["mask"],
        logp_old=logp_old,
        logp_teacher=mb.get("logp_teacher"),
        kl=klg,
        logp_ref=mb.get("logp_ref"),
        logp_sampler=mb["logp_sampler"],
        advantages=None if a.objective != "rl" else mb["adv"],
        denominator=ctx["denominator"],
    )
    mask = mb["mask"]
    n_tok = float(mask.sum())
    sums = {
        "loss": float(loss.detach()),
        "entropy": float((en.detach() * mask).sum()),
        "tokens": n_tok,
        "clip_frac": m.get("clip_frac", 0.0) * n_tok,
        "kl_teacher": m.get("kl_teacher", 0.0) * n_tok,
        "tis_capped_frac": m.get("tis_capped_frac", 0.0) * n_tok,
    }
    ctx["sums"].append(sums)
    return loss * ctx["scale"], {}


def _forward_step(a, ctx, data_iterator, model):
    mb = next(data_iterator)
    # the decoder's hidden states [s, b, d] instead of logits: the fused head does the rest.
    # post_process is off for this call only: megatron-core's finalize_model_grads (the tied
    # embedding's all-reduce between the first and last stage) reads it after the backward.
    inner = ctx["model"]
    saved = inner.post_process
    inner.post_process = False
    try:
        hidden = model(mb["tokens"], mb["pos"], None)
    finally:
        inner.post_process = saved
    return hidden, partial(_loss, a, ctx, mb)


def train_on(cfg: Config, ddp, model, opt, sched, batch: Batch, rows: list[int], ctx: dict):
    """One optimizer step on response ``rows`` of ``batch``; returns the metric sums of this
    rank and the grad norm. Collective over the job."""
    a = cfg.align
    dp = ps.get_data_parallel_world_size()
    mask_rows = [i for i in rows if bool(batch.keep[i])]
    tok_count = sum(len(batch.resp[i]) for i in mask_rows)
    cnt = torch.tensor(
        [float(tok_count if a.aggregation == "token-mean" else len(mask_rows))], dtype=torch.float64
    )
    if dp > 1:
        dist.all_reduce(cnt, group=ps.get_data_parallel_group())
    mbs = a.micro_batch_size
    micro = [rows[k : k + mbs] for k in range(0, len(rows), mbs)]
    micro[-1] = micro[-1] + [None] * (mbs - len(micro[-1]))
    n_micro = len(micro)
    seq = max(len(batch.seqs[i]) for i in rows)
    if dp > 1:  # every DP rank must run the same number of micro-batches
        nm = torch.tensor([n_micro])
        dist.all_reduce(nm, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        if int(nm) != n_micro:
            raise RuntimeError("data-parallel ranks disagree on the number of micro-batches")
    ctx["denominator"] = float(cnt)
    ctx["scale"] = n_micro * dp
    ctx["sums"] = []
    device = ctx["device"]
    data = iter([_micro(batch, m, seq, ctx, device) for m in micro])
    ddp.zero_grad_buffer()
    opt.zero_grad()
    ctx["model"] = model
    get_forward_backward_func()(
        forward_step_func=partial(_forward_step, a, ctx),
        data_iterator=data,
        model=[ddp],
        num_microbatches=n_micro,
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=False,
    )
    ok, grad_norm, _ = opt.step()
    if not ok:
        raise ModelError("align: optimizer step skipped (inf/nan gradients)")
    sched.step(increment=cfg.train.global_batch_size)
    tot = {k: sum(s[k] for s in ctx["sums"]) for k in ctx["sums"][0]} if ctx["sums"] else {}
    return tot, (float(grad_norm) if grad_norm is not None else None)


# -- the loop ----------------------------------------------------------------------------------


def _dp_sum(d: dict) -> dict:
    keys = sorted(d)
    v = torch.tensor([float(d[k]) for k in keys], dtype=torch.float64)
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(v, group=ps.get_data_parallel_group())
    return dict(zip(keys, v.tolist()))


def _rollout_rows(step: int, batch: Batch, g: int) -> list[dict]:
    out = []
    for i, rec in enumerate(batch.records):
        out.append(
            {
                "step": step,
                "id": rec.id,
                "task": rec.task,
                "sample": i % g,
                "response": batch.texts[i],
                "answer": rec.answer,
                "reward": float(batch.rewards.reshape(-1)[i]),
                "tokens": len(batch.resp[i]),
                "stopped": batch.stopped[i],
            }
        )
    return out


def _gather_rows(rows: list[dict]) -> list[dict]:
    """Every DP rank's rollout rows on the writer (TP rank 0 of each DP rank contributes)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return rows
    mine = rows if ps.get_tensor_model_parallel_rank() == 0 else []
    allr = [None] * dist.get_world_size()
    dist.all_gather_object(allr, mine)
    return [r for part in allr for r in part]


def run_align(cfg: Config) -> dict:
    """The alignment run of ``cfg`` (resumes when its folder holds a checkpoint); collective
    over the torchrun world. Returns the last step's metrics. Fault points for the tests:
    ``align:rollout:S``, ``align:step:S``, ``align:save:S`` (``logs.FAULT_ENV``)."""
    a = cfg.align
    plan = plan_align(cfg)
    out, ckpt, hf_cfg = plan["out"], plan["ckpt"], plan["hf_cfg"]
    tok, records, prompts = plan["tok"], plan["records"], plan["prompts"]
    init_distributed(cfg.parallel, seed=cfg.seed)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    tp = ps.get_tensor_model_parallel_world_size()
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    )
    window = plan["window"]

    teacher = None
    if plan["teacher"] is not None:
        teacher = Scorer(cfg, plan["teacher"], "teacher", window)
    vocab = int(hf_cfg["vocab_size"])
    if is_rank0():
        os.makedirs(out, exist_ok=True)
        if plan["tasks_out"] is not None:
            write_tasks(plan["tasks_out"], records)
    if teacher is not None:  # padded vocabularies may differ: the shared range only
        vocab = min(vocab, teacher.vocab_size)

    opts = model_options(cfg, split_source(cfg.model.path)[0])
    model = build_gpt_model(hf_cfg, opts, max_seq_length=window)
    resume = latest_iteration(ckpt) if is_megatron_checkpoint(ckpt) else None
    if resume is None:
        path, it = split_source(cfg.model.path)
        load_start_weights(model, path, hf_cfg, it)
        check_finite_weights(model, f"model.path = {cfg.model.path}")
    ref = Scorer(cfg, cfg.model.path, "reference", window) if a.ref_coef > 0 else None

    tcfg = replace(
        cfg,
        train=replace(
            cfg.train, lr=a.lr, min_lr=a.lr, lr_warmup_steps=0, lr_decay_style="constant"
        ),
    )
    opt_steps = a.steps * a.minibatches
    ddp = wrap_ddp(wrap_float16(model))
    opt, sched = build_optimizer(tcfg, model, ddp, opt_steps)
    start = 0
    if resume is not None:
        start = int(load_checkpoint(ckpt, model, opt, sched)["iteration"])
        check_finite_weights(model, ckpt)
        log.info("resumed %s at step %d", ckpt, start)
    else:
        write_meta(
            ckpt, hf_cfg, opts, plan["meta_dir"], {"align": asdict(a), "start": cfg.model.path}
        )
    if is_rank0():
        with open(os.path.join(out, "align.json.tmp"), "w") as f:
            json.dump(plan["fingerprint"], f, indent=2)
        os.replace(os.path.join(out, "align.json.tmp"), os.path.join(out, "align.json"))
    barrier()

    writer = is_metrics_writer()
    metrics = rollouts_path = None
    if writer:  # TensorBoard only when there is a step to log (a finished run stays as is)
        tb = os.path.join(out, "tensorboard") if start < a.steps else None
        metrics = MetricsLog(os.path.join(out, "metrics.jsonl"), tb, start)
        rollouts_path = os.path.join(out, "rollouts.jsonl")
        truncate_jsonl(rollouts_path, start)
    stops = stop_ids(tok, {r.task for r in records})
    pad = eos_id(tok)
    last_stage = ps.is_pipeline_last_stage()
    # the loss head lives on the last pipeline stage; the other stages never touch it
    head, shard_start = _head(model, vocab) if last_stage else (None, 0)
    tp_group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    ctx = {"tp_group": tp_group, "device": device, "pad": pad}
    want_hidden = a.objective == "kd" or (a.teacher_coef > 0 and a.teacher_form == "full")
    want_logp_t = teacher is not None and not want_hidden and a.objective == "rl"
    if teacher is not None and last_stage:
        ctx["teacher_head"] = teacher.head_shard(shard_start, head.shape[0])
    per_rank = a.prompts_per_step // dp
    bar = None
    if is_rank0():
        from tqdm import tqdm

        bar = tqdm(total=a.steps, initial=start, desc=f"align {a.preset}", unit="step")
    last = _last_row(os.path.join(out, "metrics.jsonl")) if writer else {}
    for step in range(start, a.steps):
        t0 = time.perf_counter()
        idx = step_prompts(len(records), a.prompts_per_step, step, cfg.seed)
        mine = idx[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        sampler = teacher.model if (a.objective != "rl" and teacher is not None) else None
        batch = collect(
            cfg, step, tok, model, records, mine, [prompts[i] for i in mine], stops, vocab, sampler
        )
        die_if(f"align:rollout:{step + 1}")
        t1 = time.perf_counter()
        if teacher is not None and (want_hidden or want_logp_t):
            rows_v = head.shape[0] if last_stage else 0
            th, lt = score_with(teacher, batch, pad, want_hidden, shard_start, rows_v)
            batch.teacher_hidden, batch.logp_teacher = th, lt
        if ref is not None:
            rows_v = head.shape[0] if last_stage else 0
            _, batch.logp_ref = score_with(ref, batch, pad, False, shard_start, rows_v)
        if a.tis_cap > 0:
            batch.extra["logp_old"] = _policy_logp(model, head, batch, pad, a, tp_group)
        t2 = time.perf_counter()
        if last_stage:
            head, _ = _head(model, vocab)
            ctx["head"] = head
        n = len(batch.seqs)
        per_mb = n // a.minibatches
        sums, gnorm = {}, None
        for k in range(a.minibatches):
            rows = list(range(k * per_mb, (k + 1) * per_mb))
            s, gnorm = train_on(cfg, ddp, model, opt, sched, batch, rows, ctx)
            for key, v in s.items():
                sums[key] = sums.get(key, 0.0) + v
        t3 = time.perf_counter()
        row = _step_row(a, step + 1, batch, sums, gnorm, (t0, t1, t2, t3), dp)
        row["lr"] = opt.param_groups[0]["lr"]
        rows = _gather_rows(_rollout_rows(step + 1, batch, batch.rewards.shape[1]))
        if writer:
            metrics.write(row)
            with open(rollouts_path, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        last = row
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward']:.3f}")
        if writer:  # the rank that holds the loss: one line per step for the job
            log.info(
                "align step %d/%d: reward %.3f, accuracy %.3f, loss %.4f, kl_teacher %s, %.1f s",
                step + 1,
                a.steps,
                row["reward"],
                row["accuracy"],
                row["loss"],
                f"{row['kl_teacher']:.4f}" if "kl_teacher" in row else "-",
                row["seconds"],
            )
        done = step + 1
        die_if(f"align:step:{done}")
        if (a.save_interval and done % a.save_interval == 0) or done == a.steps:
            save_checkpoint(
                ckpt,
                done,
                model,
                opt,
                sched,
                {"align_step": done},
                before_commit=partial(die_if, f"align:save:{done}"),
            )
    if bar is not None:
        bar.close()
    if metrics is not None:
        metrics.close()
    close_checkpoint_writer()
    summary = broadcast_from_writer(last, writer)
    summary["steps"] = a.steps
    return summary


def _last_row(path: str) -> dict:
    """The last metrics line of a run folder ({} when there is none)."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        rows = [ln for ln in f if ln.strip()]
    return json.loads(rows[-1]) if rows else {}


def _policy_logp(model, head, batch: Batch, pad: int, a: AlignConfig, tp_group):
    """The trainer's log-probs of the sampled tokens before any update (π_old for truncated
    importance sampling)."""
    h = hidden_rows(model, batch.seqs, [batch.rows_of(i) for i in range(len(batch.seqs))], pad)
    if h is None:  # not the last pipeline stage: the loss, and π_old, live there
        return None
    tgt = torch.tensor([t for r in batch.resp for t in r], dtype=torch.long, device=h.device)
    with torch.no_grad():
        lp = fused_linear_policy(
            h.to(head.dtype), head.detach(), tgt, temperature=a.temperature, tp_group=tp_group
        )[0]
    lp = lp.cpu().tolist()
    off = batch.token_offsets()
    return [lp[off[i] : off[i + 1]] for i in range(len(batch.resp))]


def _step_row(a: AlignConfig, step: int, batch: Batch, sums: dict, gnorm, times, dp: int) -> dict:
    t0, t1, t2, t3 = times
    rew = batch.rewards.reshape(-1)
    local = {
        "reward_sum": float(rew.sum()),
        "correct": float((rew >= 1.0).sum()),
        "rows": float(rew.numel()),
        "resp_tokens": float(sum(len(r) for r in batch.resp)),
        "stopped": float(sum(batch.stopped)),
        "zero_var": float(batch.extra["zero_variance"].sum()),
        "groups": float(batch.rewards.shape[0]),
        "all_tokens": float(sum(len(s) for s in batch.seqs)),
        "t_rollout": t1 - t0,
        "t_score": t2 - t1,
        "t_train": t3 - t2,
    }
    for rec, r in zip(batch.records, rew.tolist()):
        local[f"rsum/{rec.task}"] = local.get(f"rsum/{rec.task}", 0.0) + r
        local[f"rcnt/{rec.task}"] = local.get(f"rcnt/{rec.task}", 0.0) + 1
    for k, v in sums.items():
        local[f"s/{k}"] = v
    g = _dp_sum(local)
    tok = max(g.get("s/tokens", 0.0), 1.0)
    row = {
        "step": step,
        "reward": g["reward_sum"] / g["rows"],
        "accuracy": g["correct"] / g["rows"],
        "loss": g.get("s/loss", 0.0) / a.minibatches,
        "entropy": g.get("s/entropy", 0.0) / tok,
        "clip_frac": g.get("s/clip_frac", 0.0) / tok,
        "zero_variance_frac": g["zero_var"] / g["groups"],
        "response_length": g["resp_tokens"] / g["rows"],
        "stopped_frac": g["stopped"] / g["rows"],
        "grad_norm": gnorm,
        # DP ranks work in parallel: tokens of all ranks over the mean time of one rank
        "tokens_per_s_rollout": g["resp_tokens"] / max(g["t_rollout"] / dp, 1e-9),
        "tokens_per_s_train": g["all_tokens"] / max(g["t_train"] / dp, 1e-9),
        "seconds": t3 - t0,
    }
    if a.objective != "rl":  # sft / kd: the rewards are those of the responses trained on
        gold = a.objective == "sft" and a.sft_target == "reference"
        row["responses"] = "reference" if gold else "teacher"
    if g["t_score"] > 0.01 * dp:  # teacher / reference / π_old forwards ran
        row["tokens_per_s_score"] = g["all_tokens"] / (g["t_score"] / dp)
    if "s/kl_teacher" in g and (a.teacher_coef > 0 or a.objective == "kd"):
        row["kl_teacher"] = g["s/kl_teacher"] / tok
    if a.tis_cap > 0:
        row["tis_capped_frac"] = g.get("s/tis_capped_frac", 0.0) / tok
    for k in sorted(g):
        if k.startswith("rsum/"):
            fam = k[5:]
            row[f"reward/{fam}"] = g[k] / g[f"rcnt/{fam}"]
    return row
