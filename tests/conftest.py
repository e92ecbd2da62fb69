import os

# faiss and torch each load their own OpenMP runtime; on a shared 2-core machine their worker threads,
# spinning while they wait, starve each other (a 1000-vector faiss RQ training: 0.05 s passive, up to
# 8 s spinning). Set before either library is imported, for this test process only.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def sift():
    """Small split of the default real SIFT set (built and cached on first use)."""
    from faiss_rqmoe.bench import datasets

    return datasets.load_small(n_train=6_000, n_val=1_000, n_db=5_000, n_query=200)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def assert_same_neighbours(D, I, xq, reconstructions, D_ref, metric="l2", rtol=1e-4, atol=1e-2):
    """Search results agree with a reference up to ties: D matches D_ref position by position, and every
    returned id really lies at its reported distance. reconstructions: (ntotal, d) with row = id, or a
    function of ids (n,) int64 -> (n, d). Small codecs give many vectors the same code, so exact distance
    ties are common and their order is the search's own: comparing ids position by position fails on them."""
    np.testing.assert_allclose(D, D_ref, rtol=rtol, atol=atol)
    found = I >= 0
    assert (found == np.isfinite(D_ref)).all()
    q_rows = np.nonzero(found)[0]
    x = reconstructions(I[found]) if callable(reconstructions) else reconstructions[I[found]]
    assert all(len(set(row[row >= 0])) == (row >= 0).sum() for row in I), "an id returned twice"
    q = xq[q_rows]
    true = ((q - x) ** 2).sum(1) if metric == "l2" else (q * x).sum(1)
    np.testing.assert_allclose(D[found], true, rtol=rtol, atol=atol)


def clustered(n, d=32, seed=0, n_clusters=40):
    """Synthetic clustered float32 data for tests that need no real data."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d)).astype(np.float32) * 3
    return centers[rng.integers(0, n_clusters, n)] + rng.standard_normal((n, d)).astype(np.float32)
