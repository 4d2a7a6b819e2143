"""Packed-sequence tensor ops for the encoder: Triton kernels on CUDA, PyTorch elsewhere.

`attention`, `mean_pool_normalize` and `rotary_qk_` are the dispatchers the encoder calls. LONGEMBED_KERNELS
forces a backend: `auto` (default: Triton for CUDA tensors when Triton imports), `triton`, `torch`.
This package is plain tensor maths: it imports neither `encoder` nor `plugin`.
"""

from longembed.triton_kernels.dispatch import attention, backend, mean_pool_normalize, rotary_qk_
from longembed.triton_kernels.torch_ops import segment_spans

__all__ = ["attention", "backend", "mean_pool_normalize", "rotary_qk_", "segment_spans"]
