"""Pick the Triton kernel or the PyTorch path for each op.

LONGEMBED_KERNELS (read at every call):
- `auto` (default): Triton for CUDA tensors in fp16/bf16 that the kernels accept (head_dim 32/64/128,
  hidden size <= 4096) when Triton imports; PyTorch otherwise. fp32 on CUDA stays on PyTorch: the GPU
  encoder runs in bf16/fp16, and an exact fp32 flash kernel would run without tensor cores, no faster
  than SDPA.
- `triton`: always the kernels; unsupported input (e.g. fp32 attention on CUDA, whose exact kernel
  would spill registers) is an error, not a silent fallback. CPU tensors run through Triton's
  interpreter when TRITON_INTERPRET=1 (slow: for tests), and are refused otherwise.
- `torch`: always the PyTorch path.

Triton decides between compiled and interpreted kernels when a kernel is *decorated* (module import),
not at launch. So interpreter runs use private copies of the kernel modules executed with the
interpreter switched on, and the compiled modules stay untouched: CPU tests and GPU runs can share a
process whatever was imported first.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import torch

from longembed.triton_kernels.torch_ops import (
    mean_pool_normalize_torch,
    rotary_qk_torch_,
    varlen_attention_torch,
)

_CHOICES = ("auto", "triton", "torch")
_KERNEL_MODULES = ("flash_attention", "pooling", "rotary")
# What the kernels accept (flash_attention.HEAD_DIMS, pooling.MAX_DIM), restated so that `auto` can
# decide without importing triton, which CPU installs may lack.
_ATTENTION_HEAD_DIMS = (32, 64, 128)
_POOLING_MAX_DIM = 4096
_ROTARY_MAX_HEAD_DIM = 256


def _choice() -> str:
    choice = os.environ.get("LONGEMBED_KERNELS", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"LONGEMBED_KERNELS must be one of {_CHOICES}, got {choice!r}")
    return choice


@functools.cache
def triton_available() -> bool:
    """Whether the `triton` package can be imported (it is optional on CPU installs)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def backend(device: torch.device) -> str:
    """'triton' or 'torch' for tensors on `device`, honouring LONGEMBED_KERNELS (dtype rules aside)."""
    choice = _choice()
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return choice


def _use_triton(device: torch.device, dtype: torch.dtype, kernel_accepts: bool) -> bool:
    if backend(device) == "torch":
        return False
    if _choice() == "triton":
        return True  # forced: unsupported input raises in the kernel's launcher
    return dtype in (torch.float16, torch.bfloat16) and kernel_accepts


@functools.cache
def _interpreted_modules() -> dict[str, ModuleType]:
    """Copies of the kernel modules whose @triton.jit functions run on the CPU interpreter."""
    from triton import knobs

    modules = {}
    with knobs.runtime.scope():  # restores TRITON_INTERPRET and the knob afterwards
        knobs.runtime.interpret = True
        for name in _KERNEL_MODULES:
            path = Path(__file__).with_name(f"{name}.py")
            spec = importlib.util.spec_from_file_location(f"triton_kernels._interpreted_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            modules[name] = module
    return modules


def triton_modules(device: torch.device) -> dict[str, ModuleType]:
    """The kernel modules for tensors on `device`: {'flash_attention': ..., 'pooling': ..., 'rotary': ...}."""
    if not triton_available():
        raise RuntimeError(
            "LONGEMBED_KERNELS=triton needs the `triton` package (pip install 'longembed[gpu]')"
        )
    if _interpreting():
        return _interpreted_modules()
    if device.type != "cuda":
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors, got {device}; set LONGEMBED_KERNELS=torch (or auto), "
            "or TRITON_INTERPRET=1 to run them on the CPU through Triton's interpreter (slow, for tests)"
        )
    import longembed.triton_kernels.flash_attention
    import longembed.triton_kernels.pooling
    import longembed.triton_kernels.rotary

    return {
        "flash_attention": longembed.triton_kernels.flash_attention,
        "pooling": longembed.triton_kernels.pooling,
        "rotary": longembed.triton_kernels.rotary,
    }


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Bidirectional attention on packed (total_tokens, heads, head_dim) tensors."""
    if _use_triton(q.device, q.dtype, q.shape[-1] in _ATTENTION_HEAD_DIMS):
        kernels = triton_modules(q.device)["flash_attention"]
        return kernels.alibi_flash_attention(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, scale)
    return varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, scale)


def mean_pool_normalize(hidden: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Per-span mean (fp32 accumulation) fused with L2 normalisation; (m, dim) float32."""
    if _use_triton(hidden.device, hidden.dtype, hidden.shape[-1] <= _POOLING_MAX_DIM):
        return triton_modules(hidden.device)["pooling"].segment_mean_pool_normalize(hidden, spans)
    return mean_pool_normalize_torch(hidden, spans)


def rotary_qk_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotary positions on q and k of a packed (T, 3, heads, head_dim) projection, in place;
    cos, sin: (T, head_dim / 2) fp32 tables."""
    head_dim = qkv.shape[-1]
    if _use_triton(qkv.device, qkv.dtype, head_dim % 2 == 0 and head_dim <= _ROTARY_MAX_HEAD_DIM):
        triton_modules(qkv.device)["rotary"].rotary_qk_(qkv, cos, sin)
    else:
        rotary_qk_torch_(qkv, cos, sin)
