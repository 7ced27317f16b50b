"""A pretrain_gpt-style Megatron-Core training script with PolicyLong's stage loop wired in
through ``policylong.recipe.StageHook``: the script owns the model, optimizer and
training step; between stages the hook re-screens fresh root documents with the live model.

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
with --save, a Megatron checkpoint after every stage; prints one JSON line per step.
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
    ap.add_argument("--save", help="checkpoint folder prefix: <save>_<t+1> after stage t")
    ap.add_argument("--metrics", help="write every step's loss here (JSON lines)")
    a = ap.parse_args()

    import torch
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from policylong.config import load_config
    from policylong.megatron_ext import train as T
    from policylong.megatron_ext.parallel import destroy_distributed, init_distributed
    from policylong.recipe import StageHook

    cfg = load_config(a.config, a.set + [f"workdir={a.workdir}"])
    tc = cfg.train
    dp = init_distributed(cfg.parallel, seed=cfg.seed)
    # the script's own model + optimizer (what Megatron-LM's setup_model_and_optimizer does)
    hf_cfg, tok_dir = T.resolve_start(a.start)
    model = T.build_model(hf_cfg, T.model_options(cfg), cfg.data.seq_length)
    T.load_start_weights(model, a.start, hf_cfg)
    ddp = T.wrap_ddp(T.wrap_float16(model))
    hook = StageHook(cfg, hf_cfg, tok_dir)
    total = hook.num_stages * a.steps_per_stage
    opt, sched = T.build_optimizer(cfg, model, ddp, total)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    fb = get_forward_backward_func()
    micro = tc.global_batch_size // (tc.micro_batch_size * dp)
    rank0 = torch.distributed.get_rank() == 0
    step = 0
    for t in range(hook.num_stages):
        # PolicyLong: stage t's data is screened by the model as it is now (M_t)
        stage_dir = hook.regenerate(ddp, t, model_desc=f"live model before stage {t}")
        data = hook.data_iterator(t, a.steps_per_stage)
        ddp.train()
        for _ in range(a.steps_per_stage):
            ddp.zero_grad_buffer()
            opt.zero_grad()
            losses = fb(
                forward_step_func=T.forward_step,
                data_iterator=data,
                model=[ddp],
                num_microbatches=micro,
                seq_length=cfg.data.seq_length,
                micro_batch_size=tc.micro_batch_size,
                forward_only=False,
            )
            ok, _, _ = opt.step()
            if not ok:
                raise RuntimeError(f"step {step + 1}: optimizer step skipped (inf/nan gradients)")
            sched.step(increment=tc.global_batch_size)
            step += 1
            loss = T._broadcast_from_writer({"loss": T._mean_loss(losses)}, T.is_metrics_writer())[
                "loss"
            ]
            row = {"stage": t, "step": step, "loss": loss, "stage_dir": stage_dir}
            if rank0:
                print(json.dumps(row), flush=True)
                if a.metrics:
                    with open(a.metrics, "a") as f:
                        f.write(json.dumps(row) + "\n")
        if a.save:
            ck = f"{a.save}_{t + 1}"
            T.write_meta(ck, hf_cfg, T.model_options(cfg), tok_dir, {"train_steps": step})
            T.save_checkpoint(ck, step, model, opt, sched)
    T.close_checkpoint_writer()
    destroy_distributed()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
