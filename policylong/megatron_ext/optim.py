"""The trainable model and its optimizer, as Megatron-LM's ``setup_model_and_optimizer`` builds
them: ``Float16Module`` for bf16/fp16, megatron-core ``DistributedDataParallel``, the Megatron
optimizer (Adam, fp32 main weights, global-norm clipping) and ``OptimizerParamScheduler``
(warm-up, decay), all from ``cfg.train``."""

from __future__ import annotations

from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from policylong.config import Config


def wrap_float16(model):
    """bf16/fp16 runs wrap the model in megatron-core's ``Float16Module``, as Megatron-LM's
    ``get_model`` does: every parameter (the RMSNorm weights of the local spec are created in
    float32) becomes bf16, and the last stage's output returns in float32. Without it a bf16
    model holds some float32 parameters and the mixed-precision optimizer's
    ``sharded_state_dict`` pairs its states with the wrong parameters (seen on an H200:
    "Optimizer shape ((896,) does not match model shape ((1152,))" at the first save).
    Parameter objects are converted in place, so ``model.sharded_state_dict()`` still names
    the optimizer's parameters."""
    if not (model.config.bf16 or model.config.fp16):
        return model

    return Float16Module(model.config, model)


def wrap_ddp(model):
    """megatron-core ``DistributedDataParallel`` around ``model`` (fp32 gradient buffers, no
    overlap, no distributed optimizer). Like Megatron-LM's ``train()``, it points the model
    config's ``no_sync_func`` at the wrapper and its ``finalize_model_grads_func`` at
    megatron-core's ``finalize_model_grads`` (the DP all-reduce, tied-embedding and layer-norm
    grads), which the pipeline schedules of ``step.train_step`` call."""
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=False,
        check_for_nan_in_grad=False,
    )
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    return ddp


def build_optimizer(cfg: Config, model, ddp, steps: int):
    """(optimizer, scheduler) for ``steps`` optimizer steps of ``cfg.train.global_batch_size``
    samples: the scheduler counts samples (``scheduler.step(increment=global_batch_size)``),
    warms up over ``min(lr_warmup_steps, steps)`` steps and decays over ``steps``."""
    t = cfg.train
    bf16 = model.config.bf16
    ocfg = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=bf16,
        params_dtype=model.config.params_dtype,
        use_distributed_optimizer=False,
    )
    opt = get_megatron_optimizer(ocfg, [ddp])
    gbs = t.global_batch_size
    warm = min(t.lr_warmup_steps, steps)
    sched = OptimizerParamScheduler(
        opt,
        init_lr=0.0 if warm else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=warm * gbs,
        lr_decay_steps=max(steps, 1) * gbs,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(steps, 1) * gbs,
        wd_incr_style="constant",
    )
    return opt, sched
