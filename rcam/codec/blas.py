"""numpy's BLAS on one thread in rcam's own processes.

Why: numpy's OpenBLAS keeps a thread per core and splits even tiny products among them. rcam's numpy work is
small (the tone fit's three solves of 72 unknowns and its Gram sums, the colour conversion a band of rows at a
time) and runs while torch's threads, LibRaw's render thread or another worker hold the cores, so OpenBLAS's
threads wait for one: on our 2-core machine, one core busy, a 72 x 72 solve took 30-80 ms, against 0.04 ms on
one thread, and the three solves were a third of the encode time of a 384 x 256 file (a profile of 39 files).
torch's own threads are not BLAS threads here (torch.set_num_threads sets those).

A process-wide setting, so only entry points call single_threaded_blas (the CLI, the --jobs workers, the Dask
workers' plugin, which sets torch's thread count there too, the benchmarks that time them), never library code,
as for rcam.codec.allocator. Where the user set a BLAS thread
count in the environment, theirs stands.
"""

from __future__ import annotations

import os

from threadpoolctl import threadpool_info, threadpool_limits

USER_SETTINGS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def single_threaded_blas() -> bool:
    """Limit the BLAS libraries loaded in this process (numpy's) to one thread; False (nothing changed) where
    the environment sets a BLAS thread count or no BLAS is loaded."""
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    if not any(library["user_api"] == "blas" for library in threadpool_info()):
        return False
    threadpool_limits(limits=1, user_api="blas")  # stays in force: it is not used as a context manager
    return True
