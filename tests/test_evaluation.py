import numpy as np
import pytest
from faiss.contrib.evaluation import knn_intersection_measure

from faiss_rqmoe.bench import evaluation


def constructed_case():
    """10 queries, 5 results each; the true nearest neighbour sits at a chosen rank (or is absent)."""
    rng = np.random.default_rng(0)
    gt = np.stack([rng.permutation(1000)[:5] for _ in range(10)]).astype(np.int64)
    I = np.full((10, 5), -1, dtype=np.int64)
    ranks = [0, 0, 1, 2, 4, None, 0, 3, None, 1]  # rank of gt[:, 0] in I, None: not found
    for q, rank in enumerate(ranks):
        others = iter(gt[q, 1:].tolist() + [2000 + q, 3000 + q, 4000 + q])
        for j in range(5):
            I[q, j] = gt[q, 0] if j == rank else next(others)
    return I, gt, ranks


def test_recall_matches_hand_count_and_faiss_contrib():
    I, gt, ranks = constructed_case()
    recall = evaluation.recall_at(I, gt, ks=(1, 2, 5, 10))
    for k in (1, 2, 5):
        assert recall[f"R@{k}"] == pytest.approx(sum(r is not None and r < k for r in ranks) / len(ranks))
    assert "R@10" not in recall  # more than the 5 results returned
    # faiss's 1-recall@1 is its intersection measure at rank 1
    assert recall["R@1"] == pytest.approx(knn_intersection_measure(I[:, :1], gt[:, :1]))
    # 1-recall@k: is the true nearest neighbour among the first k? (k copies of it intersect once)
    for k in (2, 5):
        nn_k = np.repeat(gt[:, :1], k, axis=1)
        assert recall[f"R@{k}"] == pytest.approx(k * knn_intersection_measure(I[:, :k], nn_k))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_knn_intersection_matches_faiss_contrib(k):
    I, gt, _ = constructed_case()
    assert evaluation.knn_intersection(I, gt, k, chunk=3) == pytest.approx(knn_intersection_measure(I[:, :k], gt[:, :k]))


def test_mse_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1000, 16)).astype(np.float32)
    x_rec = x + rng.standard_normal((1000, 16)).astype(np.float32) * 0.1
    expected = ((x.astype(np.float64) - x_rec) ** 2).sum(1).mean()
    assert evaluation.mse(x, x_rec, chunk=77) == pytest.approx(expected, rel=1e-6)


def test_knn_search_exhaustive_matches_brute_force():
    rng = np.random.default_rng(2)
    xb, xq = rng.standard_normal((500, 8)).astype(np.float32), rng.standard_normal((20, 8)).astype(np.float32)
    D, I = evaluation.knn_search_exhaustive(xb, xq, 5)
    dist = ((xq[:, None, :].astype(np.float64) - xb[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(I, np.argsort(dist, axis=1)[:, :5])
    np.testing.assert_allclose(D, np.sort(dist, axis=1)[:, :5], rtol=1e-4)
    _, I_ip = evaluation.knn_search_exhaustive(xb, xq, 5, "ip")
    np.testing.assert_array_equal(I_ip, np.argsort(-(xq @ xb.T), axis=1)[:, :5])


def test_clear_errors():
    with pytest.raises(ValueError, match="same number of queries"):
        evaluation.recall_at(np.zeros((3, 2)), np.zeros((4, 1)))
    with pytest.raises(ValueError, match="same shape"):
        evaluation.mse(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="metric must be"):
        evaluation.knn_search_exhaustive(np.zeros((3, 2)), np.zeros((1, 2)), 1, "cosine")
    with pytest.raises(ValueError, match="k=6"):
        evaluation.knn_intersection(np.zeros((3, 5)), np.zeros((3, 5)), 6)
