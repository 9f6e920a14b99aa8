"""Shared settings for the numerics tests.

On a small shared machine a multi-threaded OpenBLAS can spin for seconds on a 1000x1000 inverse
when the cores are busy; one thread is faster and deterministic. This only takes effect if numpy
was not imported yet (it is a default, an explicit setting wins).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
