"""Process groups for Megatron-Core runs: one call that validates the layout and initialises it.

Communication lives here and in megatron-core's ``parallel_state``; the model and training
math take groups from ``parallel_state`` explicitly where they need them.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from policylong.config import ParallelConfig

__all__ = ["ParallelConfig", "init_distributed", "destroy_distributed"]


def init_distributed(par: ParallelConfig, seed: int = 1234, timeout_s: int = 600) -> int:
    """Initialise torch.distributed (from the torchrun environment, or a world of one) and
    megatron-core's model-parallel groups. Returns the data-parallel degree.

    Backend: NCCL with CUDA, gloo without (then ``megatron_ext.cpu`` patches megatron-core for
    the CPU). CP > 1 without CUDA is refused: it needs Transformer Engine.
    """
    from . import cpu

    cpu.apply()
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    world = dist.get_world_size()
    dp = par.data_parallel(world)
    if par.context_parallel > 1 and not cuda:
        raise ValueError(
            f"parallel.context_parallel = {par.context_parallel}: context parallelism needs "
            "Transformer Engine and CUDA (set it to 1 on CPU)"
        )
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=par.tensor_parallel,
            pipeline_model_parallel_size=par.pipeline_parallel,
            context_parallel_size=par.context_parallel,
        )
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return dp


def destroy_distributed() -> None:
    """Barrier, then tear down megatron-core's groups and the process group. Every entry point
    ends with it: a gloo rank that exits while a peer still talks to it aborts (SIGABRT seen
    about 1 run in 10 on the 2-rank tests here before this was added)."""
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        dist.barrier()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
