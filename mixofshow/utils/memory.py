"""Process-wide CPU allocator settings.

glibc's malloc serves large blocks (from 128 KiB, a threshold that then follows the largest block
freed) with ``mmap`` and gives freed memory at the top of the heap back to the system beyond a
trim threshold. A CPU training or fusion step that allocates and frees megabytes of temporaries
(stacked LoRA factors, activations) therefore faults the same pages in again at every step: with
glibc's defaults StelLA's step took 2.2-2.4x AdamW(foreach)'s instead of 1.5-1.8x
(``python bench/optimizers.py --optimizers stella [--default-malloc]``). Raising both thresholds
keeps freed blocks for reuse; the process's resident memory stays at its high-water mark instead
of shrinking.

``mixofshow`` commands call :func:`tune_cpu_allocator` at start; code that uses the library
directly can call it too. It does nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["tune_cpu_allocator", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 1 * 2**30


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def tune_cpu_allocator(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds (bytes); return whether both were accepted."""
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)))
    ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold))) and ok
    if not ok:
        log.debug("glibc refused mallopt(mmap=%d, trim=%d)", mmap_threshold, trim_threshold)
    return ok
