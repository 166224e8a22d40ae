"""A preloaded module that records the thread-pool variables it saw at import."""

import os

SEEN = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
