"""Memory on a CPU: keep freed large blocks for reuse instead of handing them back to the system.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves blocks above a threshold
(at most 32 MiB) with ``mmap`` and unmaps them on ``free``, so every large temporary of a model (a
prefill's activations, the decoder's KV caches, a training step's) arrives as fresh pages that the
kernel must fault in and zero on first touch. Measured on decoding 60 ARC tasks (docs/BENCHMARKS.md
section 15): 13M page faults and a fifth of the time in the kernel with glibc's defaults; with mmap
off, 0.5M faults and 1.13x faster, at about the same peak memory.

:func:`tune` switches glibc's ``mmap`` for large blocks off and raises its heap-trim threshold
(``mallopt``), once per process, before the work starts; train.py, eval.py and the benchmarks call
it. Other C libraries are left alone, and ``ARC_MALLOC=system`` keeps the defaults.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading

logger = logging.getLogger(__name__)

ENV = "ARC_MALLOC"
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 2**31 - 1  # bytes of free heap top kept before trimming (mallopt takes an int)

_lock = threading.Lock()
_verdict: str | None = None


def tune() -> str:
    """Apply the setting (first call only) and return what the process's allocator does, for logs."""
    global _verdict
    with _lock:
        if _verdict is None:
            _verdict = _apply()
            logger.debug("%s", _verdict)
        return _verdict


def _apply() -> str:
    if os.environ.get(ENV, "").strip().lower() == "system":
        return f"malloc: the C library's defaults ({ENV}=system)"
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version  # present in glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "malloc: the C library's defaults (not glibc)"
    version.restype = ctypes.c_char_p
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return f"malloc: glibc {version().decode()} refused the setting; its defaults"
    return f"malloc: glibc {version().decode()}, large blocks kept for reuse (no mmap, {ENV}=system for the defaults)"
