import os
import subprocess
import sys

import pytest

from seglab.memory import keep_freed_memory

# A child process: apply the setting (or not), then allocate and free a 64 MB block ten times.
_CHILD = """
import resource, sys
from seglab.memory import keep_freed_memory, keeps_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "apply" else False
assert keeps_freed_memory() == applied
block = bytearray(64 << 20); del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    block = bytearray(64 << 20)  # written through: every fresh page faults
    del block
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""


def _child(mode: str, **env: str) -> tuple[bool, int]:
    result = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True,
                            env={**os.environ, **env})
    applied, faults = result.stdout.split()
    return applied == "True", int(faults)


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_freed_large_blocks_are_reused_instead_of_mapped_again():
    applied, faults = _child("apply")
    assert applied
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert faults < pages // 4, f"{faults} page faults per 64 MB block of {pages} pages"
    _, default_faults = _child("default")
    assert faults < default_faults


def test_the_users_own_malloc_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_memory() is False
    assert _child("apply", MALLOC_MMAP_THRESHOLD_="131072")[0] is False
