"""arc.alloc: glibc's mmap for large blocks off, so a freed large tensor's pages are reused."""
import ctypes
import subprocess
import sys

import pytest

_GLIBC = hasattr(ctypes.CDLL(None), "gnu_get_libc_version")

# Page faults of filling a 48 MiB tensor after a 64 MiB one was freed (a smaller block, so the freed
# one fits it whatever the alignment padding).
_PROBE = """
import resource, sys, torch
from arc import alloc
if sys.argv[1] == "tune":
    print(alloc.tune())
def fill(n):
    x = torch.empty(n).fill_(1.0)  # float32
    del x
fill(16 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
fill(12 * 2**20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, **env}).stdout.splitlines()
    return (out[0] if mode == "tune" else ""), int(out[-1])


@pytest.mark.skipif(not _GLIBC, reason="the setting is glibc's (mallopt); other C libraries are left alone")
def test_a_freed_large_tensor_is_reused_without_page_faults():
    """With glibc's defaults the 48 MiB tensor is a fresh mmap (12k pages faulted in); after tune()
    it reuses the freed 64 MiB block's heap pages."""
    _, default = _faults("plain")
    said, tuned = _faults("tune")
    assert default > 10_000
    assert tuned < 1_000
    assert "large blocks kept for reuse" in said


def test_the_system_defaults_can_be_kept():
    said, faults = _faults("tune", ARC_MALLOC="system")
    assert said.startswith("malloc: the C library's defaults")
    if _GLIBC:
        assert faults > 10_000


def test_tune_is_applied_once_and_says_the_same_each_time():
    from arc import alloc
    assert alloc.tune() == alloc.tune()
