"""The glibc allocator tuning: applied by default, switched off by the environment, and
large buffers then come from the heap instead of fresh mmap()s (checked with mallinfo2)."""
from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import ctypes, ctypes.util, sys
import torch
from trainer.run.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory()
before = libc.mallinfo2().hblks
buffers = [torch.empty(2 * 1024 * 1024) for _ in range(4)]  # 8 MiB each
during = libc.mallinfo2().hblks
print(applied, during - before)
"""


def _glibc() -> bool:
    name = ctypes.util.find_library("c")
    return name is not None and hasattr(ctypes.CDLL(name), "mallinfo2")


@pytest.mark.skipif(not _glibc(), reason="glibc only")
@pytest.mark.parametrize("switch, applied, mmapped", [(None, "True", "0"), ("0", "False", "4")])
def test_large_buffers_come_from_the_heap_unless_switched_off(switch, applied, mmapped):
    env = {"PATH": "/usr/bin:/bin"}
    if switch is not None:
        env["RECBALANCE_KEEP_FREED_MEMORY"] = switch
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [applied, mmapped]
