"""Host-memory allocator settings for training processes (glibc ``malloc``).

DP-SGD allocates and frees several megabyte-sized temporaries per step (Opacus's
per-sample gradients and unfolded conv inputs). With glibc's defaults, blocks above the
dynamic mmap threshold are ``mmap``-ed and ``munmap``-ed every step, so each step pays
fresh page faults and zeroing; measured here it made the DP step time bimodal (17 ms or
24 ms for the CNN, bench/dp_overhead.py). Keeping such blocks in the heap is the same
remedy as the allocator switch (jemalloc/tcmalloc) that PyTorch's CPU performance tuning
guide recommends, done with ``mallopt(3)`` so no extra library must be installed at a
site.

References: glibc ``mallopt(3)`` (``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``); PyTorch
Performance Tuning Guide, "CPU specific optimizations: switch memory allocator".
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

# glibc <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 * 2**20
"""Blocks below this come from the heap (32 MiB: glibc's maximum on 64-bit Linux)."""

TRIM_THRESHOLD_BYTES = 256 * 2**20
"""Free heap top kept for reuse before it is returned to the OS (256 MiB)."""


def keep_training_buffers_in_heap() -> bool:
    """Let glibc reuse freed per-step buffers instead of unmapping them.

    Sets ``M_MMAP_THRESHOLD`` to :data:`MMAP_THRESHOLD_BYTES` and ``M_TRIM_THRESHOLD``
    to :data:`TRIM_THRESHOLD_BYTES` for the whole process. Idempotent and cheap; call it
    before a training loop. Memory stays bounded: at most ``TRIM_THRESHOLD_BYTES`` of
    freed heap is kept beyond what the process uses at its peak.

    Returns
    -------
    bool
        True if both settings were applied; False on a C library without ``mallopt``
        (musl, macOS, Windows), where nothing changes.

    """
    if platform.system() != "Linux":
        return False
    try:
        # The symbols already loaded into this process (libc among them): no library
        # search, which for ctypes.util.find_library means running ldconfig each call.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if not ok:
        log.debug("mallopt refused the allocator settings; glibc defaults stay in effect")
    return ok
