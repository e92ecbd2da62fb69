"""Never worse than faiss's residual quantizer at the same bytes, even where learning cannot help."""
import warnings

import faiss
import numpy as np
import pytest

import faiss_rqmoe
from faiss_rqmoe.bench import evaluation


@pytest.mark.parametrize("description", ["RQMoE4x6_N2L1H16", "IVF4,RQMoE4x6_N2L1H16"])
def test_the_index_is_never_worse_than_faiss_rq_on_structureless_data(description):
    """Gaussian noise has nothing for the networks to learn; a second of training cannot beat the RQ start.
    The index must then keep that start, which is faiss's own RQ (same data, same recipe, same beam)."""
    rng = np.random.default_rng(0)
    xt, xval, xb = (rng.standard_normal((n, 32)).astype(np.float32) for n in (4000, 500, 2000))
    index = faiss_rqmoe.index_factory(32, description, max_epochs=1, progress=False, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the index says it kept its start; that is the point
        index.train(xt, xval)
    index.add(xb)
    ours = evaluation.mse(xb, index.reconstruct_n())
    # faiss's defaults (progressive training, beam 5) over the same coarse quantizer, so the comparison is
    # the codec's; for the flat variant that is faiss's IVF1 over the training mean
    quantizer = faiss.IndexFlatL2(32)
    quantizer.add(index.centroids)
    reference = faiss.IndexIVFResidualQuantizer(quantizer, 32, index.nlist, 4, 6)
    reference.train(xt)
    reference.add(xb)
    theirs = evaluation.mse(xb, reference.reconstruct_n(0, reference.ntotal))
    assert ours <= theirs * (1 + 1e-3), (ours, theirs)


def _per_cluster_shapes(n, d=16, k=16, seed=0):
    """Clusters, each with its own orientation of one anisotropic shape: RQ's later steps share one
    codebook over all clusters, while RQ-MoE can reshape it by the first step's code."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)).astype(np.float32) * 4
    rotations = np.linalg.qr(rng.standard_normal((k, d, d)))[0].astype(np.float32)
    labels = rng.integers(0, k, n)
    local = rng.standard_normal((n, d)).astype(np.float32) * np.geomspace(2, 0.05, d).astype(np.float32)
    return centers[labels] + np.einsum("nij,nj->ni", rotations[labels], local)


def test_default_cpu_training_beats_its_rq_start_in_seconds():
    """The untrained codec is its RQ start; the default CPU schedule (warm-up, then annealed over the
    budget) must turn a couple of seconds into a codec the index keeps over that start, encoded as the index
    encodes it (faiss's RQ with beam 5 against our greedy candidates)."""
    x = _per_cluster_shapes(8000)
    index = faiss_rqmoe.index_factory(16, "RQMoE3x4_N2L1H32", time_budget_s=2, progress=False, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # keeping the start warns: here it must not happen
        index.train(x[:7000], x[7000:])
    history = index.train_history
    assert history.learned_val_mse < 0.8 * history.rq_val_mse, (history.learned_val_mse, history.rq_val_mse)
    assert index.config.condition == "instruction"  # the learned codec, not its start, is what the index holds
