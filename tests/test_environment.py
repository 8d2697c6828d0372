# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The process's allocator setting (``bundle.environment.keep_freed_cpu_memory``), in a process of its own: the
setting is process-wide."""

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

from .conftest import ROOT

LIBC = ctypes.util.find_library("c")
GLIBC_MALLINFO2 = LIBC is not None and hasattr(ctypes.CDLL(LIBC), "mallinfo2")  # glibc >= 2.33

PROBE = """
import ctypes, ctypes.util, sys
import torch
from bundle.environment import keep_freed_cpu_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2

def mapped_mib_for_a_64_mib_tensor():
    before = libc.mallinfo2().hblkhd
    x = torch.ones(64 << 20, dtype=torch.uint8)
    mapped = libc.mallinfo2().hblkhd - before
    del x
    return mapped >> 20

first = mapped_mib_for_a_64_mib_tensor()
applied = keep_freed_cpu_memory(sys.argv[1] == "on")
print(first, applied, mapped_mib_for_a_64_mib_tensor())
"""


@pytest.mark.skipif(not GLIBC_MALLINFO2, reason="glibc >= 2.33 (mallinfo2) needed to see where malloc serves from")
@pytest.mark.parametrize("switch", ["on", "off"])
def test_keep_freed_cpu_memory_serves_large_tensors_from_the_heap(switch):
    """By default glibc maps a 64 MiB tensor with mmap (and unmaps it when freed); after the call it comes from
    the heap, which keeps freed memory for the next iteration."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, switch], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    assert out == (["64", "True", "0"] if switch == "on" else ["64", "False", "64"])


def test_cudnn_algorithms_are_set_after_determinism():
    import torch
    from monai.utils import set_determinism

    from bundle.environment import set_cudnn_algorithms

    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        set_determinism(seed=0)
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (True, False)
        set_cudnn_algorithms(deterministic=False, benchmark=True)
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
        with pytest.raises(TypeError, match="benchmark"):
            set_cudnn_algorithms(deterministic=False, benchmark="true")
    finally:
        set_determinism(seed=None)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before
