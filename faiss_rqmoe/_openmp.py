"""OpenMP wait policy for our command-line programs."""
from __future__ import annotations

import os
import sys
from typing import Sequence


def rerun_with_passive_openmp(module: str, argv: Sequence[str]) -> None:
    """Re-run ``python -m <module> <argv>`` with OMP_WAIT_POLICY=PASSIVE unless the caller set a policy.

    faiss and torch each bring an OpenMP runtime; on a machine with few, busy cores their idle
    workers spin and starve each other (faiss's k-means ran up to 100x slower here, and our IVF
    search 4x). The policy is read when the runtimes load, which ``import faiss_rqmoe`` has already
    done, hence the re-exec. Returns only where nothing was re-run.
    """
    if os.environ.get("OMP_WAIT_POLICY") or os.name != "posix":
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, "-m", module, *argv])
    except OSError:
        pass  # carry on with the runtimes as they are
