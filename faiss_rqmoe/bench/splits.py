"""A data set's fixed split and its exact ground truth, shared by the SIFT sets (``datasets``) and the
sentence-embedding set (``textset``)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import numpy as np

from .evaluation import knn_search_exhaustive


def cache_dir() -> Path:
    """Where built data sets live: $FAISS_RQMOE_CACHE or ~/.cache/faiss_rqmoe (created on demand)."""
    path = Path(os.environ.get("FAISS_RQMOE_CACHE", Path.home() / ".cache" / "faiss_rqmoe"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A fixed split: train xt, validation xval, database xb, queries xq (float32),
    gt (nq, k_gt) int64: exact nearest neighbours of each query in xb, nearest first, for
    ``metric`` ("l2", or "ip" for inner product)."""

    name: str
    xt: np.ndarray
    xval: np.ndarray
    xb: np.ndarray
    xq: np.ndarray
    gt: np.ndarray
    metric: str = "l2"

    @property
    def d(self) -> int:
        return self.xb.shape[1]


def ground_truth(xb: np.ndarray, xq: np.ndarray, k: int = 100, metric: str = "l2",
                 chunk_bytes: int = 256 << 20) -> np.ndarray:
    """Exact k nearest neighbours with faiss, over the database in chunks of at most chunk_bytes of float32.

    xb: (n, d) any numeric dtype (a uint8 memory map is fine: only one chunk is converted at a time);
    xq: (nq, d). Returns (nq, min(k, n)) int64 row numbers of xb, nearest first.
    """
    import faiss

    if metric not in ("l2", "ip"):
        raise ValueError(f"metric must be 'l2' or 'ip', got {metric!r}")
    if xb.ndim != 2 or xq.ndim != 2 or xb.shape[1] != xq.shape[1]:
        raise ValueError(f"xb and xq must be 2-D with the same number of columns, got {xb.shape} and {xq.shape}")
    k = min(k, len(xb))
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    heap = faiss.ResultHeap(len(xq), k, keep_max=metric == "ip")
    bs = max(k, chunk_bytes // (4 * xb.shape[1]))
    for i0 in range(0, len(xb), bs):
        chunk = np.ascontiguousarray(xb[i0:i0 + bs], dtype=np.float32)
        D, I = knn_search_exhaustive(chunk, xq, min(k, len(chunk)), metric)
        heap.add_result(D, I + i0)
    heap.finalize()
    return heap.I


def split(name: str, data: np.ndarray, n_train: Optional[int], n_val: int, n_db: int, n_query: int,
          gt: Optional[np.ndarray] = None, cache_gt: bool = False) -> Dataset:
    """Deterministic split of rows: queries first, then database, validation, train (None: the rest).

    data: (n, d) any numeric dtype. gt: precomputed ground truth for these
    queries and database; else computed (and cached on disk if cache_gt).
    """
    needed = n_query + n_db + n_val
    n_train = len(data) - needed if n_train is None else n_train
    if min(n_query, n_db, n_train) <= 0 or n_val < 0 or needed + n_train > len(data):
        raise ValueError(f"{name}: cannot split {len(data)} vectors into n_query={n_query}, n_db={n_db}, "
                         f"n_val={n_val}, n_train={n_train}")
    as_float = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    xq = as_float(data[:n_query])
    xb = as_float(data[n_query:n_query + n_db])
    xval = as_float(data[n_query + n_db:needed])
    xt = as_float(data[needed:needed + n_train])
    if gt is None:
        gt_path = cache_dir() / f"{name}_gt_q{n_query}_db{n_db}.npy"
        if cache_gt and gt_path.exists():
            gt = np.load(gt_path, allow_pickle=False)
        else:
            gt = ground_truth(xb, xq, 100)
            if cache_gt:
                np.save(gt_path, gt)
    elif gt.shape[0] != n_query:
        raise ValueError(f"{name}: ground truth has {gt.shape[0]} rows, expected n_query={n_query}")
    return Dataset(name, xt, xval, xb, xq, np.ascontiguousarray(gt, dtype=np.int64))
