"""A preloaded module that records the thread-pool variables it saw at import."""

import os

POOLS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
SEEN = {k: os.environ.get(k) for k in POOLS}
