"""Process groups for Megatron-Core runs: one call that validates the layout and initialises it.

Communication lives here and in megatron-core's ``parallel_state``; the model and training
math take groups from ``parallel_state`` explicitly where they need them.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket

import megatron.core
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from packaging.version import Version

from policylong.config import ParallelConfig
from policylong.errors import ConfigError

from . import cpu

log = logging.getLogger(__name__)

__all__ = ["ParallelConfig", "barrier", "destroy_distributed", "init_distributed", "is_rank0"]


TESTED_MEGATRON_CORE = ("0.16", "0.17")
"""megatron-core releases [low, high) the GPU path is tested with (0.16.1 on an H200). Others
run, with a warning naming what is untested, rather than being downgraded (an NGC container
brings its own)."""


def check_megatron_core_version() -> bool:
    """True when the installed megatron-core lies in the tested range; else log what is
    untested and return False."""
    v = Version(megatron.core.__version__)
    low, high = (Version(x) for x in TESTED_MEGATRON_CORE)
    if low <= v < high:
        return True
    log.warning(
        "megatron-core %s lies outside the range this release is tested with [%s, %s): the "
        "HF <-> Megatron weight mapping, the training step and dist_checkpointing resharding are "
        "untested with it; check `policylong convert` logits against Hugging Face first",
        v,
        low,
        high,
    )
    return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(par: ParallelConfig, seed: int = 1234, timeout_s: int = 600) -> int:
    """Initialise torch.distributed (from the torchrun environment, or a world of one) and
    megatron-core's model-parallel groups. Returns the data-parallel degree.

    Backend: NCCL with CUDA, gloo without (then ``megatron_ext.cpu`` patches megatron-core for
    the CPU). CP > 1 without CUDA is refused: it needs Transformer Engine.
    """

    cpu.apply()
    cuda = torch.cuda.is_available()
    if cuda:
        check_megatron_core_version()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if "MASTER_PORT" not in os.environ:
            # a world of one (torchrun always sets the port): a port the OS says is free, as
            # two runs on one machine collided on a pid-derived one (EADDRINUSE)
            os.environ["MASTER_PORT"] = str(_free_port())
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
        raise ConfigError(
            f"parallel.context_parallel = {par.context_parallel}: context parallelism needs "
            "Transformer Engine and CUDA (set it to 1 on CPU)"
        )

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=par.tensor_parallel,
            pipeline_model_parallel_size=par.pipeline_parallel,
            context_parallel_size=par.context_parallel,
        )

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return dp


def is_rank0() -> bool:
    """True on global rank 0, and in a process without a process group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """``dist.barrier()`` when a process group exists (a no-op in a plain process)."""
    if dist.is_initialized():
        dist.barrier()


def destroy_distributed() -> None:
    """Barrier, then tear down megatron-core's groups and the process group. Every entry point
    ends with it: a gloo rank that exits while a peer still talks to it aborts (SIGABRT seen
    about 1 run in 10 on the 2-rank tests here before this was added)."""

    if dist.is_initialized():
        dist.barrier()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
