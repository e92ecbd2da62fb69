"""Progress for long steps, including the ones that run inside faiss's C++ code, and one place that
folds faiss's repeated clustering warnings into a single line of ours."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import threading
import time
import warnings

logger = logging.getLogger("faiss_rqmoe")

# faiss's k-means prints this from C++ whenever it gets fewer than 39 vectors a centroid
_FEW_POINTS = re.compile(rb"WARNING clustering (\d+) points to (\d+) centroids: please provide at least "
                         rb"\d+ training points\n")


@functools.lru_cache(maxsize=None)
def matmul_rate() -> float:
    """Multiply-adds a second of this process's float32 matrix products on the CPU (measured once)."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((512, 256), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((256, 1024), dtype=np.float32)
    a @ b
    start = time.perf_counter()
    for _ in range(4):
        a @ b
    return 4 * 512 * 256 * 1024 / max(time.perf_counter() - start, 1e-6)


@contextlib.contextmanager
def timed_stage(desc: str, expected_s: float, enabled: bool = True):
    """A progress bar in seconds for one long call that reports no progress of its own (faiss k-means,
    RQ training, a least-squares solve): total = the expected seconds, advanced by a clock thread,
    ended at the real duration (full). Logs the expectation first."""
    from tqdm.auto import tqdm

    logger.info("%s: about %.0f s expected", desc, expected_s)
    if not enabled:
        yield
        return
    total = max(1, int(round(expected_s)))
    bar = tqdm(total=total, desc=desc, unit="s", bar_format="{desc}: {percentage:3.0f}%|{bar}| "
               "{n:.0f}/{total:.0f} s expected [{elapsed}]")
    done = threading.Event()
    start = time.perf_counter()

    def tick():
        while not done.wait(0.5):
            bar.n = min(time.perf_counter() - start, bar.total)
            bar.refresh()

    clock = threading.Thread(target=tick, daemon=True)
    clock.start()
    try:
        yield
    finally:
        done.set()
        clock.join()
        bar.total = bar.n = time.perf_counter() - start
        bar.refresh()
        bar.close()


@contextlib.contextmanager
def folded_faiss_warnings(what: str):
    """Pass everything written to file descriptor 2 through, except faiss's per-call k-means warnings
    about too few training points, which become one ``UserWarning`` naming ``what``."""
    if os.name != "posix" or not _stderr_is_redirectable():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    seen = []

    def forward():
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                lines = pending.split(b"\n")
                pending = lines.pop()
                kept = []
                for line in lines:
                    match = _FEW_POINTS.fullmatch(line + b"\n")
                    if match:
                        seen.append((int(match.group(1)), int(match.group(2))))
                    else:
                        kept.append(line + b"\n")
                if kept or pending:
                    os.write(saved, b"".join(kept) + pending)
                    pending = b""

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the reader sees EOF
        reader.join(timeout=5)
        os.close(saved)
        if seen:
            n_points, n_centroids = seen[0]
            warnings.warn(f"{what}: faiss k-means ran {len(seen)} time(s) with fewer than 39 training vectors "
                          f"a centroid (e.g. {n_points} vectors for {n_centroids} centroids); its codebooks "
                          "are less well placed than with more training data", stacklevel=3)


def _stderr_is_redirectable() -> bool:
    try:
        os.fstat(2)
        return True
    except OSError:
        return False
