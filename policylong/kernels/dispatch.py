"""Which implementation an entropy op runs: ``backend=`` or ``POLICYLONG_ENTROPY_BACKEND``.

``torch``, the chunked PyTorch path, runs everywhere; ``triton``, the fused kernels, is what
``auto`` picks on CUDA, and runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``:
tests only, it is slow).
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional: CPU installs without it keep the chunked PyTorch path
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False

BACKENDS = ("auto", "torch", "triton")

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def pick_backend(x: torch.Tensor, backend: str = "auto") -> str:
    """``auto``: Triton on CUDA when installed, else the chunked PyTorch path. The environment
    variable ``POLICYLONG_ENTROPY_BACKEND`` overrides ``auto`` (e.g. ``triton`` in tests)."""
    if backend not in BACKENDS:
        raise ValueError(f"entropy backend {backend!r}: must be one of {BACKENDS}")
    if backend == "auto":
        backend = os.environ.get("POLICYLONG_ENTROPY_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"POLICYLONG_ENTROPY_BACKEND={backend!r}: must be one of {BACKENDS}")
    if backend == "auto":
        return "triton" if (HAS_TRITON and x.is_cuda and x.dtype != torch.float64) else "torch"
    return backend


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """``POLICYLONG_TRITON_AUTOTUNE=0`` launches one fixed config instead (fast compiles for
    tests on a GPU: the autotuner compiles every config for every new specialisation)."""
    return os.environ.get("POLICYLONG_TRITON_AUTOTUNE", "1") != "0"


def require_triton(x: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    if x.dtype == torch.float64:
        raise TypeError("backend='triton' takes float32/bfloat16/float16 inputs, not float64")
    if not x.is_cuda and not interpreting():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (the "
            "Triton interpreter, for tests); use backend='torch' on CPU"
        )


def alloc(shape, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Output buffers of the Triton launchers and of the policy op (tests poison them with NaN
    through this)."""
    return torch.empty(shape, dtype=dtype, device=device)
