import faiss
import numpy as np
import pytest

from faiss_rqmoe import lut

from conftest import clustered


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


@pytest.mark.parametrize("nprobe, k", [(1, 5), (4, 20), (16, 300), (1, 3000)])
def test_search_shortlist_equals_faiss_search_and_return_codes(nprobe, k):
    x = clustered(3000, d=16)
    index = faiss.index_factory(16, "IVF16,RQ4x6_Nqint8")
    index.train(x)
    index.add_with_ids(x, np.arange(len(x)) * 7 + 3)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)  # the threaded scan (queries split, or one query's lists split)
    try:
        for xq in (clustered(40, d=16, seed=5), clustered(1, d=16, seed=6)):
            ids, list_nos, codes = lut.search_shortlist(index, xq, k, nprobe)
            _, ref_ids, ref_codes = index.search_and_return_codes(
                xq, k, include_listnos=True, params=faiss.SearchParametersIVF(nprobe=nprobe))
            np.testing.assert_array_equal(ids, ref_ids)
            valid = ref_ids >= 0
            coarse = index.coarse_code_size()
            ref_list_nos = sum(ref_codes[valid][:, b].astype(np.int64) << (8 * b) for b in range(coarse))
            np.testing.assert_array_equal(list_nos, ref_list_nos)
            np.testing.assert_array_equal(codes, ref_codes[valid][:, coarse:])
            if k == 3000:  # one list holds fewer than k: the -1 padding is exercised
                assert not valid.all()
    finally:
        faiss.omp_set_num_threads(threads)
