"""Allocator settings for training: freed per-step buffers stay in the heap (glibc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import pytest
import torch

from common import host_memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mmapped_bytes() -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().hblkhd)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="glibc-specific allocator settings",
)
def test_a_4_mib_training_buffer_comes_from_the_heap_not_from_mmap():
    assert host_memory.keep_training_buffers_in_heap() is True
    assert host_memory.keep_training_buffers_in_heap() is True  # idempotent
    before = _mmapped_bytes()
    buf = torch.empty(2**20, dtype=torch.float32)  # 4 MiB, like a per-sample gradient
    buf.fill_(1.0)
    assert _mmapped_bytes() == before
    del buf


def test_other_platforms_are_left_alone(monkeypatch):
    monkeypatch.setattr(host_memory.platform, "system", lambda: "Darwin")
    assert host_memory.keep_training_buffers_in_heap() is False
