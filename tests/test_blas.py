"""numpy's BLAS on one thread in rcam's processes (rcam.codec.blas): its threads waited for busy cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Prints what single_threaded_blas answered and the thread count of each BLAS library loaded after it.
PROBE = """
import json
import numpy as np
from threadpoolctl import threadpool_info
from rcam.codec.blas import single_threaded_blas
changed = single_threaded_blas()
print(json.dumps([changed, [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]]))
"""


def probe(**environment: str) -> tuple[bool, list[int]]:
    env = {name: value for name, value in os.environ.items() if not name.endswith("_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env | environment, check=True)
    changed, threads = json.loads(done.stdout)
    return changed, threads


def test_rcam_processes_run_numpy_blas_on_one_thread():
    changed, threads = probe()
    assert changed and threads and all(count == 1 for count in threads)


def test_a_blas_thread_count_the_user_set_stands():
    changed, threads = probe(OPENBLAS_NUM_THREADS="2")
    assert not changed and threads == [2] * len(threads) and threads


# Runs an entry point in a fresh process, then prints the BLAS libraries' thread counts.
ENTRY = """
import json, sys
from threadpoolctl import threadpool_info
if sys.argv[1] == "cli":
    from rcam import cli
    sys.argv = ["rcam", "--help"]
    try:
        cli.main()
    except SystemExit:
        pass
else:
    from rcam.codec import batch
    batch._worker_start("rcam-small", "cpu", 1)
print(json.dumps([lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]))
"""


def test_the_rcam_command_and_its_workers_set_it():
    """Entry points only (like the malloc settings): the CLI's main and the --jobs workers' initializer."""
    env = {name: value for name, value in os.environ.items() if not name.endswith("_NUM_THREADS")}
    for entry in ("cli", "worker"):
        done = subprocess.run([sys.executable, "-c", ENTRY, entry], capture_output=True, text=True, env=env, check=True)
        threads = json.loads(done.stdout.strip().splitlines()[-1])
        assert threads and all(count == 1 for count in threads), (entry, threads)
