"""The compatibility layer that lets megatron-core run without CUDA (tests, the CPU demo).

megatron-core assumes a GPU in a handful of places that the local layer spec, gloo and the
plain (non-distributed) optimizer otherwise do not need. Measured with megatron-core 0.16.1 and
torch 2.13.0+cpu, the gaps are:

* ``torch.cuda.current_device()`` as a device (rotary embeddings, pipeline p2p shapes, grad
  buffers) -> ``"cpu"``;
* tensors made with ``device="cuda"`` (pipeline schedules' token counters, the optimizer's
  found-inf flags, gradient clipping) -> made on the CPU;
* ``tensor.cuda()`` (tied embeddings on the last pipeline stage) -> the tensor itself;
* the CUDA RNG tracker (``tensor_parallel.random``) -> forks the CPU generator instead;
* ``torch.cuda.synchronize`` / ``empty_cache`` / streams -> no-ops;
* gradient clipping asserts ``torch.cuda.FloatTensor`` grads -> a CPU version of
  ``clip_grad_by_total_norm_fp32`` (same math: scale every grad by max_norm / (norm + 1e-6));
* the mixed-precision optimizer (``Float16OptimizerWithFloat16Params``, bf16 runs) sorts
  parameters by ``param.type()`` and accepts only ``torch.cuda.*Tensor`` names -> while its
  ``__init__`` runs, ``Tensor.type()`` names CPU tensors as their CUDA twins (so bf16 training
  and its checkpoints run on CPU too, as they do on a GPU).

Scope: apart from ``Tensor.cuda`` (which raises for every caller on a CPU-only build), torch
itself is never patched. Every loaded ``megatron.core`` module gets a stand-in for
its global name ``torch`` that forwards everything to torch except the factories above and
``torch.cuda``. (A first version patched ``torch.empty`` & co. globally: Hugging Face
``from_pretrained`` in the same process then left RoPE's ``inv_freq`` buffer uninitialised.)
:func:`apply` is the one place this happens; it does nothing when CUDA is available, so GPU runs
use megatron-core untouched. It is idempotent and is called by every PolicyLong entry point
that builds a Megatron model (``megatron_ext.parallel.init_distributed``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys

import megatron.core
import torch
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer import optimizer as mc_optimizer
from megatron.core.tensor_parallel import random as tp_random

from policylong.errors import SetupError

MEGATRON_CORE = "0.16.1"
"""The megatron-core release whose internals this layer patches (module names, private helpers,
the optimizer's type checks); the ``cpu`` extra and CI pin it."""

_APPLIED = False
_PROXY = None
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint")


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a CUDA ordinal


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapped


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: work on the CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event


@contextlib.contextmanager
def _cuda_type_names():
    """``tensor.type()`` -> ``"torch.cuda.BFloat16Tensor"`` for a CPU bf16 tensor, etc., for the
    duration of the block only."""
    orig = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return orig(self).replace("torch.", "torch.cuda.", 1)
        return orig(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = orig


def _with_cuda_type_names(init):
    @functools.wraps(init)
    def wrapped(*args, **kwargs):
        with _cuda_type_names():
            return init(*args, **kwargs)

    return wrapped


def _clip_grad_by_total_norm_fp32_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """``megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32`` without the CUDA
    assertion and the apex kernels."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    for p in parameters:
        g = getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad
        if g is not None:
            g.detach().mul_(clip_coeff)


class _CpuCuda:
    """``torch.cuda`` as megatron-core sees it on a CPU-only machine."""

    Stream = _NullStream

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    @staticmethod
    def empty_cache():
        return None

    @staticmethod
    def stream(s=None):
        return contextlib.nullcontext()

    @staticmethod
    def default_stream(*args, **kwargs):
        return _NullStream()

    current_stream = default_stream

    @staticmethod
    def get_rng_state(*args, **kwargs):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, *args, **kwargs):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        # the RNG tracker seeds, snapshots and restores: on the CPU generator, like CUDA's
        torch.manual_seed(seed)


class _CpuTorch:
    """The ``torch`` that megatron-core modules see: CUDA devices in factories become the CPU."""

    def __init__(self):
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_MODULES = (
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.transformer_block",
    "megatron.core.dist_checkpointing.serialization",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.distributed.finalize_model_grads",
)


def apply() -> bool:
    """Patch megatron-core's view of torch for CPU-only runs. True when patches are active.

    Safe to call again: megatron-core modules imported since the last call are patched too."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if megatron.core.__version__ != MEGATRON_CORE:
        raise SetupError(
            f"megatron-core {megatron.core.__version__} is installed; running without CUDA "
            f"needs {MEGATRON_CORE}, the release whose internals policylong/megatron_ext/cpu.py "
            f"patches: pip install megatron-core=={MEGATRON_CORE} (or install policylong[cpu])"
        )

    for name in _MODULES:  # import first, so that they exist to be patched
        importlib.import_module(name)
    global _PROXY
    if _PROXY is None:
        _PROXY = _CpuTorch()
    proxy = _PROXY
    for name, mod in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(mod, "torch", None) is torch:
            mod.torch = proxy

    if _APPLIED:
        return True
    # the one global patch: ``tensor.cuda()`` (tied embeddings on the last pipeline stage,
    # optimizer state loading) keeps the tensor where it is. On a CPU-only build the original
    # raises for every caller, so no working program can depend on it.
    torch.Tensor.cuda = lambda self, *a, **k: self

    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_cpu
    mc_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_cpu
    f16 = mc_optimizer.Float16OptimizerWithFloat16Params
    f16.__init__ = _with_cuda_type_names(f16.__init__)
    _APPLIED = True
    return True
