import faiss
import numpy as np
import pytest
import torch

import faiss_rqmoe

from conftest import assert_same_neighbours


TRAIN = dict(max_epochs=2, batch_size=256, progress=False, device="cpu")


def build(sift, description="IVF16,RQMoE4x6_N2L1H32", metric=faiss.METRIC_L2, n_db=3000):
    index = faiss_rqmoe.index_factory(128, description, metric, **TRAIN)
    index.train(sift.xt[:3000], sift.xval[:300])
    index.add(sift.xb[:n_db])
    return index


@pytest.fixture(scope="module")
def ivf_l2(sift):
    return build(sift)


@pytest.fixture(scope="module")
def ivf_ip(sift):
    return build(sift, metric=faiss.METRIC_INNER_PRODUCT)


def brute_force(reconstructions, xq, k, metric, ids=None):
    flat = faiss.IndexFlat(reconstructions.shape[1], metric)
    if ids is None:
        flat.add(reconstructions)
    else:
        flat = faiss.IndexIDMap(flat)
        flat.add_with_ids(reconstructions, ids)
    return flat.search(xq, k)


@pytest.mark.parametrize("which", ["ivf_l2", "ivf_ip"])
def test_exhaustive_search_equals_brute_force_over_reconstructions(sift, which, request):
    index = request.getfixturevalue(which)
    xq = sift.xq[:50]
    D, I = index.search(xq, 10, params={"nprobe": 16, "nshort": index.ntotal})
    recons = index.reconstruct_n(0, index.ntotal)
    D_ref, _ = brute_force(recons, xq, 10, index.metric_type)
    assert_same_neighbours(D, I, xq, recons, D_ref, "l2" if index.metric_type == faiss.METRIC_L2 else "ip")


def test_flat_variant_scans_everything(sift):
    index = build(sift, "RQMoE4x8_N2L1H32", n_db=1500)
    D, I = index.search(sift.xq[:30], 5, params={"nshort": index.ntotal})
    recon = index.reconstruct_n(0, index.ntotal)
    D_ref, I_ref = brute_force(recon, sift.xq[:30], 5, faiss.METRIC_L2)
    assert (I == I_ref).mean() > 0.95  # the rest: near ties, ordered differently by float rounding
    exact = ((sift.xq[:30, None, :] - recon[I]) ** 2).sum(-1)  # true distances of what the search returned
    np.testing.assert_allclose(exact, D_ref, rtol=1e-4)
    np.testing.assert_allclose(D, D_ref, rtol=1e-4)
    assert index.sa_code_size() == 4 + 1  # 4 bytes of codes + 1 norm byte, no list number


def test_the_cpu_index_keeps_a_term_a_vector_beside_faiss_and_searches_as_the_gpu_layout(ivf_l2, sift):
    """On the CPU the scan reads codes and ids from faiss's lists in place and keeps 4 bytes a vector (its
    term); the GPU's layout (codes, int32 id offsets and terms in one copy), built here on the CPU, gives the
    same neighbours and distances."""
    from faiss_rqmoe import scan

    params = {"nprobe": 4, "nshort": 40}
    D, I = ivf_l2.search(sift.xq[:40], 10, params)
    mirror = ivf_l2._code_mirror()
    assert isinstance(mirror, scan.ListMirror) and mirror.nbytes == 4 * ivf_l2.ntotal
    copy = scan.CodeMirror.from_faiss(ivf_l2.ivf, ivf_l2.static_codebooks, ivf_l2.centroids, ivf_l2.config.M,
                                      ivf_l2.config.nbits, torch.device("cpu"), with_terms=True)
    assert copy.segments[0].codes.dtype == torch.uint8 and copy.segments[0].ids.dtype == torch.int32
    try:
        ivf_l2._mirror = copy
        Dc, Ic = ivf_l2.search(sift.xq[:40], 10, params)
    finally:
        ivf_l2._mirror = None
    np.testing.assert_array_equal(Ic, I)
    np.testing.assert_allclose(Dc, D, rtol=1e-5, atol=1e-3)


def test_nprobe_beyond_nlist_and_k_beyond_ntotal_as_faiss(sift):
    """nprobe > nlist probes every list; k > ntotal pads with -1 ids and infinite distances, as faiss does."""
    index = build(sift, "IVF4,RQMoE4x6_N2L1H32", n_db=30)
    D, I = index.search(sift.xq[:5], 40, params={"nprobe": 10, "nshort": 100})
    assert (I[:, :30] >= 0).all() and (I[:, 30:] == -1).all() and np.isinf(D[:, 30:]).all()
    assert all(sorted(row[:30]) == list(range(30)) for row in I)
    reference = faiss.IndexIVFFlat(faiss.IndexFlatL2(128), 128, 4)
    reference.train(sift.xt[:300])
    reference.add(sift.xb[:30])
    reference.nprobe = 10
    _, I_ref = reference.search(sift.xq[:5], 40)
    np.testing.assert_array_equal(I == -1, I_ref == -1)


def test_recall_grows_with_nprobe_and_nshort(ivf_l2, sift):
    xq, gt = sift.xq, sift.gt
    # ground truth restricted to the 3000 stored vectors
    _, gt = brute_force(sift.xb[:3000], xq, 1, faiss.METRIC_L2)

    def recall(nprobe, nshort):
        _, I = ivf_l2.search(xq, 10, params={"nprobe": nprobe, "nshort": nshort})
        return float((I[:, :1] == gt[:, :1]).mean())

    by_nprobe = [recall(p, 50) for p in (1, 2, 4, 16)]
    by_nshort = [recall(16, s) for s in (10, 20, 50, 200)]
    # two stored vectors with the same code tie exactly, and which comes first is arbitrary: a query or two
    tol = 2 / len(xq)
    assert all(b >= a - tol for a, b in zip(by_nprobe, by_nprobe[1:])) and by_nprobe[-1] > by_nprobe[0]
    assert all(b >= a - tol for a, b in zip(by_nshort, by_nshort[1:])) and by_nshort[-1] >= by_nshort[0] - tol
    assert by_nshort[-1] > 0.1  # 3-byte codes; chance is 1/3000


def test_search_params_object_like_faiss(ivf_l2, sift):
    class Params:
        nprobe = 16
        nshort = 100

    D1, I1 = ivf_l2.search(sift.xq[:20], 5, params=Params())
    ivf_l2.nprobe, ivf_l2.nshort = 16, 100
    D2, I2 = ivf_l2.search(sift.xq[:20], 5)
    ivf_l2.nprobe, ivf_l2.nshort = 1, 100
    assert np.array_equal(I1, I2) and np.array_equal(D1, D2)


def test_add_with_ids_and_remove_ids_match_faiss_idmap(sift):
    index = faiss_rqmoe.index_factory(128, "IVF8,RQMoE4x6_N2L1H32", **TRAIN)
    index.train(sift.xt[:2000])
    rng = np.random.default_rng(0)
    ids = rng.choice(10**9, 1000, replace=False).astype(np.int64)
    index.add_with_ids(sift.xb[:1000], ids)
    recons = index.reconstruct_batch(ids)
    reference = faiss.IndexIDMap(faiss.IndexFlatL2(128))
    reference.add_with_ids(recons, ids)
    to_remove = np.concatenate([ids[::3], [-5, 10**12]])  # includes ids that are not there
    assert index.remove_ids(to_remove) == reference.remove_ids(to_remove)
    assert index.ntotal == reference.ntotal
    selector = faiss.IDSelectorRange(0, 10**8)
    assert index.remove_ids(selector) == reference.remove_ids(faiss.IDSelectorRange(0, 10**8))
    D, I = index.search(sift.xq[:40], 10, params={"nprobe": 8, "nshort": 1000})
    D_ref, _ = reference.search(sift.xq[:40], 10)
    assert_same_neighbours(D, I, sift.xq[:40], index.reconstruct_batch, D_ref)
    with pytest.raises(KeyError, match="not in the index"):
        index.reconstruct(int(ids[0]))


def test_sa_encode_decode_round_trip(ivf_l2, sift):
    codes = ivf_l2.sa_encode(sift.xb[:200])
    assert codes.dtype == np.uint8 and codes.shape == (200, ivf_l2.sa_code_size())
    np.testing.assert_array_equal(ivf_l2.sa_decode(codes), ivf_l2.reconstruct_n(0, 200))
    np.testing.assert_array_equal(ivf_l2.sa_encode(ivf_l2.sa_decode(codes)) .shape, codes.shape)
    with pytest.raises(ValueError, match="uint8"):
        ivf_l2.sa_decode(codes.astype(np.int32))


def test_reconstruct_forms_agree(ivf_l2):
    batch = ivf_l2.reconstruct_batch([5, 0, 17])
    np.testing.assert_array_equal(batch[0], ivf_l2.reconstruct(5))
    np.testing.assert_array_equal(ivf_l2.reconstruct_n(0, 20)[17], batch[2])


def test_range_search_equals_brute_force(ivf_l2, sift):
    xq = sift.xq[:10]
    D, _ = ivf_l2.search(xq, 20, params={"nprobe": 16, "nshort": ivf_l2.ntotal})
    radius = float(np.median(D[:, -1]))
    lims, Dr, Ir = ivf_l2.range_search(xq, radius, params={"nprobe": 16, "nshort": ivf_l2.ntotal})
    flat = faiss.IndexFlatL2(128)
    flat.add(ivf_l2.reconstruct_n(0, ivf_l2.ntotal))
    lims_ref, D_ref, I_ref = flat.range_search(xq, radius)
    assert lims.shape == (11,) and (lims.dtype, Dr.dtype, Ir.dtype) == (lims_ref.dtype, D_ref.dtype, I_ref.dtype)
    for q in range(10):
        assert set(Ir[lims[q]:lims[q + 1]]) == set(I_ref[lims_ref[q]:lims_ref[q + 1]])


def test_faiss_conventions_for_missing_results(sift):
    index = faiss_rqmoe.index_factory(128, "IVF4,RQMoE4x6_N2L1H32", **TRAIN)
    index.train(sift.xt[:1000])
    D, I = index.search(sift.xq[:3], 5)  # empty index
    assert (I == -1).all() and np.isinf(D).all() and (D > 0).all()
    index.add(sift.xb[:3])
    D, I = index.search(sift.xq[:2], 5, params={"nprobe": 4})  # k > ntotal
    assert D.shape == (2, 5) and D.dtype == np.float32 and I.dtype == np.int64
    assert (I[:, 3:] == -1).all() and np.isinf(D[:, 3:]).all()
    assert sorted(I[0, :3]) == [0, 1, 2]
    index.reset()
    assert index.ntotal == 0 and index.is_trained
    ip = faiss_rqmoe.index_factory(128, "RQMoE4x6_N2L1H32", faiss.METRIC_INNER_PRODUCT, **TRAIN)
    ip.train(sift.xt[:1000])
    D, I = ip.search(sift.xq[:2], 3)
    assert (I == -1).all() and (D == -np.inf).all()


def test_float64_and_non_contiguous_inputs_are_converted(ivf_l2, sift):
    xq = sift.xq[:20]
    D, I = ivf_l2.search(xq, 5)
    D64, I64 = ivf_l2.search(xq.astype(np.float64), 5)
    strided = np.asfortranarray(xq)
    Ds, Is = ivf_l2.search(strided, 5)
    Dt, It = ivf_l2.search(torch.from_numpy(xq), 5)
    for D2, I2 in ((D64, I64), (Ds, Is), (Dt, It)):
        assert np.array_equal(I, I2) and np.array_equal(D, D2)


@pytest.mark.parametrize("call, error, message", [
    (lambda ix, x: ix.search(x, 0), ValueError, "k must be a positive integer"),
    (lambda ix, x: ix.search(x, -3), ValueError, "k must be a positive integer"),
    (lambda ix, x: ix.search(x[:, :64], 5), ValueError, "64 columns, expected d=128"),
    (lambda ix, x: ix.search(x[0], 5), ValueError, "2-D"),
    (lambda ix, x: ix.add(np.full_like(x, np.nan)), ValueError, "NaN"),
    (lambda ix, x: ix.search(x.astype(str), 5), TypeError, "numeric"),
    (lambda ix, x: ix.add_with_ids(x, np.arange(3)), ValueError, "ids must have shape"),
    (lambda ix, x: ix.search(x, 5, params={"nprobe": 0}), ValueError, "nprobe"),
])
def test_bad_input_raises_clear_errors(ivf_l2, sift, call, error, message):
    ntotal = ivf_l2.ntotal
    with pytest.raises(error, match=message):
        call(ivf_l2, sift.xq[:10])
    assert ivf_l2.ntotal == ntotal  # nothing was half-added


def test_untrained_index_refuses_work(sift):
    index = faiss_rqmoe.index_factory(128, "IVF16,RQMoE4x8", **TRAIN)
    assert not index.is_trained and index.ntotal == 0
    for call in (lambda: index.add(sift.xb[:10]), lambda: index.search(sift.xq[:2], 1),
                 lambda: index.sa_encode(sift.xb[:2]), lambda: index.reconstruct(0)):
        with pytest.raises(RuntimeError, match="must be trained"):
            call()


def test_swaps_into_code_written_for_faiss_ivfpq(sift):
    def recall_at_1(index, xt, xb, xq, nprobe):
        """Ordinary faiss code: train, add, set nprobe, search, score."""
        index.train(xt)
        index.add(xb)
        index.nprobe = nprobe
        D, I = index.search(xq, 10)
        assert D.shape == I.shape == (len(xq), 10)
        _, gt = faiss.knn(xq, xb, 1)
        return (I[:, 0] == gt[:, 0]).mean()

    args = (sift.xt[:3000], sift.xb[:3000], sift.xq[:100], 4)
    pq = recall_at_1(faiss.IndexIVFPQ(faiss.IndexFlatL2(128), 128, 16, 4, 6), *args)
    ours = recall_at_1(faiss_rqmoe.index_factory(128, "IVF16,RQMoE4x6_N2L1H32", **TRAIN), *args)
    assert ours > 0 and pq > 0


def test_hnsw_coarse_quantizer(sift):
    index = build(sift, "IVF16_HNSW8,RQMoE4x6_N2L1H32", n_db=1000)
    assert isinstance(faiss.downcast_index(index.ivf.quantizer), faiss.IndexHNSWFlat)
    D, I = index.search(sift.xq[:10], 5, params={"nprobe": 16, "nshort": 1000})
    recons = index.reconstruct_n(0, 1000)
    D_ref, _ = brute_force(recons, sift.xq[:10], 5, faiss.METRIC_L2)
    assert_same_neighbours(D, I, sift.xq[:10], recons, D_ref)


def test_too_few_training_vectors_warns(sift):
    index = faiss_rqmoe.index_factory(128, "IVF64,RQMoE4x6_N2L1H32", **TRAIN)
    with pytest.warns(UserWarning, match="30 per list"):
        index.train(sift.xt[:1000])


def test_training_that_never_beats_its_rq_start_warns(sift):
    index = faiss_rqmoe.index_factory(128, "RQMoE2x4_N1L1H8", max_epochs=1, lr=1e-12, progress=False,
                                      device="cpu")
    with pytest.warns(UserWarning, match="did not encode the validation vectors better than its faiss RQ start"):
        index.train(sift.xt[:700], sift.xval[:100])


def test_a_plain_rq_codec_stores_what_faiss_rq_would(sift):
    """A plain-RQ codec (the RQ start an index keeps when training did not beat it) encodes on the CPU with
    faiss's own residual quantizer on its codebooks: the same codes as faiss's RQ with faiss's default beam,
    and the same reconstructions."""
    index = faiss_rqmoe.index_factory(128, "RQMoE4x8_rq", device="cpu", progress=False)
    index.train(sift.xt[:3000])
    rq = faiss.ResidualQuantizer(128, 4, 8)
    faiss.copy_array_to_vector(index.model.rq_codebooks().ravel(), rq.codebooks)
    rq.is_trained, rq.max_beam_size = True, 5
    x = sift.xb[:500]
    residuals = x - index.centroids[0]  # a flat index has one list, centred on the training mean
    codes = index.sa_encode(x)
    # a flat index's standalone code: no list number, the 4 code bytes, then the quantized norm
    assert np.array_equal(codes[:, :4], rq.compute_codes(residuals))
    np.testing.assert_allclose(index.sa_decode(codes), rq.decode(rq.compute_codes(residuals)) + index.centroids[0],
                               rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("fixture", ["ivf_l2", "ivf_ip"])
def test_decoding_every_shortlist_slot_equals_decoding_the_valid_ones(request, sift, fixture):
    """A GPU search decodes every shortlist slot and masks the empty ones after (no host synchronisation,
    so that a CUDA graph can record it); the CPU decodes only the valid slots. Both give the same distances
    and ids, empty slots (nshort > ntotal) included."""
    index = request.getfixturevalue(fixture)
    mirror = index._code_mirror()
    xq = torch.from_numpy(sift.xq[:20])
    for nshort in (10, 4000):  # 4000 > ntotal: the empty slots are decoded and masked
        D_valid, I_valid = index._shortlist_distances(mirror, xq, nshort, 4, decode_every_slot=False)
        D_every, I_every = index._shortlist_distances(mirror, xq, nshort, 4, decode_every_slot=True)
        assert torch.equal(I_every, I_valid)
        torch.testing.assert_close(D_every, D_valid, rtol=1e-5, atol=1e-2)
        assert (I_valid == -1).any() == (nshort == 4000)


@pytest.mark.parametrize("metric", [faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT])
def test_a_plain_rq_index_answers_from_the_table_distance_without_decoding(sift, metric, monkeypatch):
    """A plain-RQ codec reconstructs with the codebooks its lookup table holds, so the table distance is the
    exact distance to the reconstruction: the search decodes nothing and returns brute force's neighbours
    over the reconstructions, within float32 rounding."""
    index = faiss_rqmoe.index_factory(128, "IVF16,RQMoE4x8_rq", metric, device="cpu", progress=False)
    index.train(sift.xt[:3000])
    index.add(sift.xb[:2000])
    recons = index.reconstruct_n(0, index.ntotal)
    monkeypatch.setattr(index, "_decode_on_device", lambda *a: pytest.fail("a plain-RQ search decoded"))
    xq = sift.xq[:50]
    D, I = index.search(xq, 10, {"nprobe": 16, "nshort": 10})  # every list: exhaustive
    D_ref, _ = brute_force(recons, xq, 10, metric)
    np.testing.assert_allclose(D, D_ref, rtol=1e-4, atol=1.0)
    assert_same_neighbours(D, I, xq, recons, D_ref, "l2" if metric == faiss.METRIC_L2 else "ip")
