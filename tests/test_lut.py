import faiss
import numpy as np
import pytest

from faiss_rqmoe import lut



def test_least_squares_codebooks_recover_an_additive_model():
    rng = np.random.default_rng(0)
    M, K, d, n = 3, 16, 8, 4000
    truth = rng.standard_normal((M, K, d)).astype(np.float32)
    codes = rng.integers(0, K, (n, M))
    targets = truth[np.arange(M), codes].sum(1)
    fitted = lut.fit_additive_codebooks(codes, targets, K)
    # constants can move between steps; the reconstructions are what must match
    np.testing.assert_allclose(fitted[np.arange(M), codes].sum(1), targets, atol=1e-3)


@pytest.mark.parametrize("nbits", [4, 6, 8, 10])
def test_pack_unpack_round_trip_in_faiss_bit_order(nbits):
    rng = np.random.default_rng(1)
    M = 5
    codes = rng.integers(0, 1 << nbits, (50, M))
    packed = lut.pack_bits(codes, nbits)
    assert packed.shape == (50, (M * nbits + 7) // 8) and packed.dtype == np.uint8
    np.testing.assert_array_equal(lut.unpack_bits(packed, M, nbits), codes)
    rq = faiss.ResidualQuantizer(8, M, nbits)  # faiss's own packing agrees
    faiss_packed = np.empty((50, rq.code_size), dtype=np.uint8)
    codes32 = np.ascontiguousarray(codes, dtype=np.int32)
    rq.pack_codes(50, faiss.swig_ptr(codes32), faiss.swig_ptr(faiss_packed))
    np.testing.assert_array_equal(faiss_packed, packed)
