"""A pretrain_gpt-style Megatron-Core training script with PolicyLong's stage loop wired in
through ``policylong.recipe.StageHook``: the script owns the model, the optimizer (one
learning-rate schedule over all stages) and the loop, and runs ``megatron_ext.step.train_step``
(the step `policylong train` runs); between stages the hook re-screens fresh root documents with
the live model.

CPU (gloo, the embedded model; needs a workdir with corpus/ and index/, e.g. from
`policylong demo` or `policylong synth` + `policylong index`):
    python examples/pretrain_gpt_policylong.py --workdir demo_workdir --start embedded \
        --steps-per-stage 10 --set loop.stages=2 --set loop.roots_per_stage=16
One node (8 GPUs, TP=2):
    torchrun --standalone --nproc-per-node 8 examples/pretrain_gpt_policylong.py \
        --config qwen2.5-3b-128k --workdir /data/policylong \
        --start /ckpt/qwen2.5-3b-hf --steps-per-stage 1000 --set parallel.context_parallel=1
Several nodes (Slurm; the same command under srun, see examples/train_multinode.slurm):
    srun torchrun --nnodes $SLURM_NNODES --nproc-per-node 8 --rdzv-backend c10d \
        --rdzv-endpoint $MASTER_ADDR:29500 examples/pretrain_gpt_policylong.py ...

Writes WORKDIR/runs/<loop.preset>/stage_<t>/ (the same folders `policylong run` writes) and,
with --save, a Megatron checkpoint after every stage; prints one JSON line per step (stage,
step, loss, lr, grad_norm, stage_dir).
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--start", default="embedded", help="HF folder or `embedded`")
    ap.add_argument("--steps-per-stage", type=int, default=10)
    ap.add_argument(
        "--lr-decay-steps",
        type=int,
        help="steps of the learning-rate schedule (Megatron-LM's --lr-decay-iters; then min_lr); "
        "default: all steps of the run, one schedule over every stage",
    )
    ap.add_argument("--save", help="checkpoint folder prefix: <save>_<t+1> after stage t")
    ap.add_argument("--metrics", help="write every step's loss here (JSON lines)")
    a = ap.parse_args()

    import torch

    from policylong.config import load_config
    from policylong.megatron_ext.checkpointing import (
        close_checkpoint_writer,
        load_start_weights,
        model_options,
        resolve_start,
        save_checkpoint,
        write_meta,
    )
    from policylong.megatron_ext.model import build_gpt_model
    from policylong.megatron_ext.optim import build_optimizer, wrap_ddp, wrap_float16
    from policylong.megatron_ext.parallel import destroy_distributed, init_distributed
    from policylong.megatron_ext.step import broadcast_from_writer, is_metrics_writer, train_step
    from policylong.recipe import StageHook

    cfg = load_config(a.config, a.set + [f"workdir={a.workdir}"])
    init_distributed(cfg.parallel, seed=cfg.seed)
    # the script's own model + optimizer (what Megatron-LM's setup_model_and_optimizer does)
    hf_cfg, tok_dir = resolve_start(a.start)
    opts = model_options(cfg)
    model = build_gpt_model(hf_cfg, opts, max_seq_length=cfg.data.seq_length)
    load_start_weights(model, a.start, hf_cfg)
    ddp = wrap_ddp(wrap_float16(model))
    hook = StageHook(cfg, hf_cfg, tok_dir)
    total = hook.num_stages * a.steps_per_stage
    opt, sched = build_optimizer(cfg, model, ddp, a.lr_decay_steps or total)
    rank0 = torch.distributed.get_rank() == 0
    step = 0
    for t in range(hook.num_stages):
        # PolicyLong: stage t's data is screened by the model as it is now (M_t)
        stage_dir = hook.regenerate(ddp, t, model_desc=f"live model before stage {t}")
        data = hook.data_iterator(t, a.steps_per_stage)
        ddp.train()
        for _ in range(a.steps_per_stage):
            r = train_step(cfg, ddp, opt, sched, data, step)  # the step `policylong train` runs
            step += 1
            loss = broadcast_from_writer({"loss": r.loss}, is_metrics_writer())["loss"]
            row = {"stage": t, "step": step, "loss": loss, "lr": r.lr, "grad_norm": r.grad_norm}
            row["stage_dir"] = stage_dir
            if rank0:
                print(json.dumps(row), flush=True)
                if a.metrics:
                    with open(a.metrics, "a") as f:
                        f.write(json.dumps(row) + "\n")
        if a.save:
            ck = f"{a.save}_{t + 1}"
            write_meta(ck, hf_cfg, opts, tok_dir, {"train_steps": step})
            save_checkpoint(ck, step, model, opt, sched)
    close_checkpoint_writer()
    destroy_distributed()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
