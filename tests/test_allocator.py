"""The malloc settings rcam's processes run with (rcam.codec.allocator): large freed buffers are reused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rcam.codec.allocator import tune_allocator

# Allocates and frees a 64 MiB buffer (a tile-sized tensor) six times and prints the page faults the last
# five cost: each fresh mapping faults its pages in again (16384 of 4 KiB, or 32 huge pages where the kernel
# gives them), a reused heap block does not.
FAULTS = """
import resource, sys
import numpy as np
from rcam.codec.allocator import tune_allocator
if sys.argv[1] == "tuned":
    assert tune_allocator()
buffer = np.ones(8 * 2**20); del buffer
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    buffer = np.ones(8 * 2**20); del buffer
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str, **environment: str) -> int:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, env=env | environment, check=True)
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_reuses_large_freed_buffers():
    plain, tuned = page_faults("plain"), page_faults("tuned")
    assert plain >= 5 * 32  # every buffer faulted in afresh, a huge page at a time at least
    assert tuned < plain / 20


def test_the_users_malloc_settings_stand(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert tune_allocator() is False
