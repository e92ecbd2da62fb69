"""Quality measures shared by the benchmark, the demo and the tests."""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np


def recall_at(I: np.ndarray, gt: np.ndarray, ks: Sequence[int] = (1, 10, 100)) -> Dict[str, float]:
    """faiss's 1-recall@k: the fraction of queries whose true nearest neighbour gt[:, 0] is in I[:, :k].

    I: (nq, k_max) int64 search results; gt: (nq, >=1) int64. Returns
    {"R@k": float} for each k in ks not larger than k_max.
    """
    I, gt = np.asarray(I), np.asarray(gt)
    if I.ndim != 2 or gt.ndim != 2 or len(I) != len(gt):
        raise ValueError(f"I and gt must be 2-D with the same number of queries, got {I.shape} and {gt.shape}")
    return {f"R@{k}": float((I[:, :k] == gt[:, :1]).any(axis=1).mean()) for k in ks if k <= I.shape[1]}


def knn_intersection(I: np.ndarray, gt: np.ndarray, k: int, chunk: int = 4096) -> float:
    """k@k intersection recall: mean over queries of |I[:, :k] ∩ gt[:, :k]| / k.

    Same value as faiss.contrib.evaluation.knn_intersection_measure(I[:, :k], gt[:, :k]) for result rows
    without repeated ids (as search returns them; -1 padding never matches). I: (nq, >=k) int64,
    gt: (nq, >=k) int64. Returns a float in [0, 1].
    """
    I, gt = np.asarray(I), np.asarray(gt)
    if I.ndim != 2 or gt.ndim != 2 or len(I) != len(gt):
        raise ValueError(f"I and gt must be 2-D with the same number of queries, got {I.shape} and {gt.shape}")
    if not 1 <= k <= min(I.shape[1], gt.shape[1]):
        raise ValueError(f"k={k} must be in 1..{min(I.shape[1], gt.shape[1])} for I {I.shape} and gt {gt.shape}")
    hits = 0
    for i0 in range(0, len(I), chunk):
        found, truth = I[i0:i0 + chunk, :k], gt[i0:i0 + chunk, :k]
        hits += int((found[:, :, None] == truth[:, None, :]).any(axis=2).sum())
    return hits / (len(I) * k)


def mse(x: np.ndarray, x_rec: np.ndarray, chunk: int = 65_536) -> float:
    """Mean over vectors of the squared L2 reconstruction error: x, x_rec (n, d) -> float (float64 sums)."""
    x, x_rec = np.asarray(x), np.asarray(x_rec)
    if x.shape != x_rec.shape:
        raise ValueError(f"x and x_rec must have the same shape, got {x.shape} and {x_rec.shape}")
    total = 0.0
    for i0 in range(0, len(x), chunk):
        diff = x[i0:i0 + chunk].astype(np.float64) - x_rec[i0:i0 + chunk].astype(np.float64)
        total += float((diff * diff).sum())
    return total / len(x)


def faiss_metric(metric: str) -> int:
    """faiss's metric constant for the data sets' names: "l2" or "ip" (inner product)."""
    import faiss

    if metric not in ("l2", "ip"):
        raise ValueError(f"metric must be 'l2' or 'ip', got {metric!r}")
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def knn_search_exhaustive(xb: np.ndarray, xq: np.ndarray, k: int, metric: str = "l2"):
    """Exact k-NN with a faiss flat index: xb (n, d), xq (nq, d) -> D, I of shape (nq, k)."""
    import faiss

    xb = np.ascontiguousarray(xb, dtype=np.float32)
    index = faiss.IndexFlat(xb.shape[1], faiss_metric(metric))
    index.add(xb)
    return index.search(np.ascontiguousarray(xq, dtype=np.float32), k)
