"""Keep the memory a decoding process frees for its next step, instead of handing it back to the
operating system and faulting it in again.

Each decode step allocates and frees the same tensors (logits, attention scratch, sampling
state). glibc's malloc serves a block over its mmap threshold (128 KiB at first, raised as such
blocks are freed) with a fresh mapping and unmaps it on free, and returns the top of its heap once
over 128 KiB of it is free: the next step touches new pages, a minor fault each. On the CPU
bench (n4-sampling, batch 32, demo pair) a run of 0.3 s took 3,700-6,600 faults, more where the
engine's host work had moved the heap (the adaptive systems, and plain decoding run after them),
so the faults were both a cost and a noise that set plain decoding against itself. With the
mmap threshold fixed at its 32 MiB ceiling and trimming off, a run takes none after the first.

PyTorch's CPU tuning guide says the same of glibc and proposes jemalloc or tcmalloc through
LD_PRELOAD; this is the part of it a running process can do for itself. The cost: the process's
heap stays at its peak (up to 2 GiB of it free) instead of shrinking between steps, which a
process holding a model for a whole job would reach again at its next large step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # mallopt parameters, malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = (1 << 31) - 1  # an int: never trim below 2 GiB free


@functools.cache
def hold_freed_memory() -> bool:
    """Set glibc malloc to keep freed memory in the process (once per process). False where
    the C library is not glibc or refused a setting: nothing changed then."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no C library found, or not glibc (musl, macOS)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
