"""The process-wide settings trials train under, made once per process by ``prepare``.

* CUDA: cuDNN picks the fastest convolution algorithm for each shape, and matmuls and convolutions
  may use TF32 (trials train under bf16 autocast there in any case).
* The C allocator (glibc on Linux): a training step frees and allocates the same few large blocks
  (activations, gradients) hundreds of times an epoch. By default glibc hands blocks above a moving
  threshold back to the OS and trims its heap, so every step faults its memory in afresh; a fixed
  threshold and a trim limit keep freed memory in the process for the next step. On 2 CPU cores this
  took a third off LeNet's first epoch (``benchmarks/speed.py``'s process section measures it). The
  cost is memory that stays reserved at its peak, as a GPU's caching allocator keeps it.
"""

from __future__ import annotations

import ctypes
import functools
import platform

import torch

# mallopt(3) parameters and the values set: blocks below MMAP_THRESHOLD come from the heap (32 MiB is
# the most glibc accepts on 64-bit), up to TRIM_THRESHOLD of free heap is kept, and the heap grows in
# steps of TOP_PAD beyond what is asked.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
ALLOCATOR = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 256 << 20}


def prepare(device: torch.device) -> None:
    """Settle the settings for training on ``device``; safe to call before every trial."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    keep_freed_memory()


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's allocator to keep freed memory (see the module's text); False where the C library
    is not glibc or refuses a setting, which leaves its defaults, slower but correct."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in ALLOCATOR.items())
