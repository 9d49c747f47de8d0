"""Freed host memory kept for reuse, instead of handed back to the OS after every step.

A CPU forward allocates and frees large short-lived tensors every step (a 2048-token prefill's
MLP activations are ~13 MB apiece). glibc's malloc serves such sizes from fresh mmap'ed pages or
the top of its heap and returns them to the OS when they are freed, so every step faults the same
memory in again: ~430k page faults per 32-request run of the default model, ~1 CPU s in the
kernel, and fresh zeroed pages in the caches. Raising the mmap threshold to glibc's 64-bit maximum
(32 MB) and the trim threshold to 1 GB keeps that memory in the heap for the next step (measured:
~15k page faults a run, 0.946x the CPU seconds for the same tokens; BENCHMARKS.md).

The cost: memory freed after a peak (the largest prefill's activations) stays with the process.
Set once per process, on engines that run on the CPU. A user's own `MALLOC_MMAP_THRESHOLD_` or
`MALLOC_TRIM_THRESHOLD_` wins (nothing is changed); elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024**2  # glibc refuses more than HEAP_MAX_SIZE / 2 on 64-bit
TRIM_THRESHOLD = 1024**3
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_applied: bool | None = None


def _glibc_mallopt():
    """glibc's `mallopt`, or None (another C library)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only  # noqa: B018
        return libc.mallopt
    except (OSError, AttributeError):
        return None


def keep_freed_memory(environ: dict[str, str] | None = None) -> bool:
    """Apply the thresholds once per process; whether they are in force."""
    global _applied
    if _applied is not None:
        return _applied
    env = os.environ if environ is None else environ
    chosen = [name for name in USER_SETTINGS if name in env]
    mallopt = None if chosen else _glibc_mallopt()
    if chosen:
        logger.info("malloc thresholds left as %s set them", " and ".join(chosen))
        _applied = False
    elif mallopt is None:
        _applied = False
    else:
        _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        logger.info("malloc keeps freed memory for reuse (mmap threshold 32 MB, trim threshold 1 GB): %s",
                    "set" if _applied else "refused by the C library")
    return _applied
