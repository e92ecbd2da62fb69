"""Faiss users' expectations that used to fail: negative ids, selectors, option validation, saved options,
parameter strings and dicts, and concurrent searches."""
import concurrent.futures
import pathlib

import faiss
import numpy as np
import pytest

import faiss_rqmoe

TRAIN = dict(max_epochs=1, batch_size=256, progress=False, device="cpu")


@pytest.fixture(scope="module")
def index(sift):
    index = faiss_rqmoe.index_factory(128, "IVF16,RQMoE4x8_N2L1H16", **TRAIN)
    index.train(sift.xt[:2000])
    index.add(sift.xb[:1000])
    return index


def test_negative_ids_are_stored_and_returned_as_faiss_does(sift):
    index = faiss_rqmoe.index_factory(128, "IVF8,RQMoE4x8_N2L1H16", **TRAIN)
    index.train(sift.xt[:2000])
    ids = -np.arange(5, 505, dtype=np.int64)  # -5, -6, ...
    index.add_with_ids(sift.xb[:500], ids)
    reference = faiss.IndexIDMap(faiss.IndexFlatL2(128))
    reference.add_with_ids(index.reconstruct_batch(ids), ids)
    D, I = index.search(sift.xq[:30], 10, {"nprobe": 8, "nshort": 500})
    D_ref, I_ref = reference.search(sift.xq[:30], 10)
    assert set(I.ravel()) <= set(ids) and (I == I_ref).mean() > 0.95
    np.testing.assert_allclose(D, D_ref, rtol=1e-4, atol=1e-2)
    with pytest.raises(ValueError, match="must not contain -1"):
        index.add_with_ids(sift.xb[:2], np.array([3, -1]))
    assert index.ntotal == 500


def test_selectors_in_search_parameters_are_honoured(index, sift):
    sel = faiss.IDSelectorRange(0, 100)
    for params in (faiss.SearchParametersIVF(nprobe=8, sel=sel), {"nprobe": 8, "sel": sel}):
        D, I = index.search(sift.xq[:50], 10, params=params)
        found = I[I >= 0]
        assert len(found) and ((found >= 0) & (found < 100)).all()
    # against faiss: the same selector over the same reconstructions finds the same neighbours
    kept = np.arange(100)
    flat = faiss.IndexIDMap(faiss.IndexFlatL2(128))
    flat.add_with_ids(index.reconstruct_batch(kept), kept)
    D, I = index.search(sift.xq[:50], 5, {"nprobe": 16, "nshort": 1000, "sel": sel})
    D_ref, I_ref = flat.search(sift.xq[:50], 5)
    np.testing.assert_allclose(D, D_ref, rtol=1e-4, atol=1e-2)
    batch = np.array([3, 7, 500, 999], dtype=np.int64)
    D, I = index.search(sift.xq[:10], 4, {"nprobe": 16, "nshort": 1000,
                                          "sel": faiss.IDSelectorBatch(len(batch), faiss.swig_ptr(batch))})
    assert set(I.ravel()) <= set(batch)
    lims, Dr, Ir = index.range_search(sift.xq[:5], 1e12, params={"nprobe": 16, "sel": sel})
    assert ((Ir >= 0) & (Ir < 100)).all()


@pytest.mark.parametrize("options, message", [
    ({"nprob": 8}, r"unknown option \['nprob'\]"),
    ({"max_epoch": 2}, "max_epochs"),  # the known names are listed
    ({"time_budget_s": "soon"}, "time_budget_s"),
    ({"lr": -1.0}, "lr"),
    ({"dropout": 1.5}, "dropout"),
])
def test_misspelled_or_bad_options_fail_when_the_index_is_built(options, message):
    with pytest.raises(ValueError, match=message):
        faiss_rqmoe.index_factory(64, "IVF64,RQMoE8x8", **options)


def test_numpy_scalars_and_paths_are_accepted_and_saved_as_json(sift, tmp_path):
    index = faiss_rqmoe.index_factory(128, "RQMoE4x8_N2L1H16", max_epochs=np.int64(1), lr=np.float32(1e-3),
                                      checkpoint_path=pathlib.Path(tmp_path / "ckpt"), progress=False,
                                      device="cpu", batch_size=np.int32(256))
    assert index.train_config.max_epochs == 1 and isinstance(index.train_config.max_epochs, int)
    assert index.train_config.checkpoint_path == str(tmp_path / "ckpt")
    index.train(sift.xt[:1000])
    path = tmp_path / "saved.rqmoe"
    faiss_rqmoe.write_index(index, path)
    assert faiss_rqmoe.read_index(path, device="cpu").train_config == index.train_config


@pytest.mark.parametrize("params, message", [
    ({"n_probe": 64}, r"unknown search parameter\(s\) \['n_probe'\]"),
    ({"nprobe": 0}, "nprobe must be an integer >= 1"),
    ("nprobe=16,nshortt=5", "nshortt"),
    ("nprobe16", "name=value"),
    ({"sel": 3}, "faiss.IDSelector"),
])
def test_bad_search_parameters_raise(index, sift, params, message):
    with pytest.raises((ValueError, TypeError), match=message):
        index.search(sift.xq[:2], 3, params=params)


def test_parameter_space_strings_work_like_dicts(index, sift):
    D1, I1 = index.search(sift.xq[:20], 5, "nprobe=4,nshort=30")
    D2, I2 = index.search(sift.xq[:20], 5, {"nprobe": 4, "nshort": 30})
    np.testing.assert_array_equal(I1, I2)
    saved = index.nprobe, index.nshort
    index.set_params("nprobe=4,nshort=30")
    try:
        assert (index.nprobe, index.nshort) == (4, 30)
        np.testing.assert_array_equal(index.search(sift.xq[:20], 5)[1], I1)
    finally:
        index.nprobe, index.nshort = saved


def test_faiss_attributes_are_there(index):
    assert index.nlist == 16 and index.code_size == 5  # 4 code bytes + 1 norm byte, as faiss reports it
    assert index.quantizer.ntotal == 16
    assert sum(index.invlists.list_size(i) for i in range(index.nlist)) == index.ntotal


def test_concurrent_searches_equal_sequential_ones(index, sift):
    queries = [sift.xq[i * 20:(i + 1) * 20] for i in range(8)]
    params = {"nprobe": 8, "nshort": 50}
    sequential = [index.search(q, 10, params) for q in queries]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda q: index.search(q, 10, params), queries * 3))
    for i, (D, I) in enumerate(parallel):
        D_seq, I_seq = sequential[i % len(queries)]
        np.testing.assert_array_equal(I, I_seq)
        np.testing.assert_allclose(D, D_seq, rtol=1e-6)


def test_faiss_descriptions_and_files_pass_through(tmp_path):
    flat = faiss_rqmoe.index_factory(64, "IVF64,PQ8")
    assert isinstance(flat, faiss.IndexIVFPQ)
    assert isinstance(faiss_rqmoe.index_factory(32, "Flat"), faiss.IndexFlat)
    path = tmp_path / "plain.index"
    faiss_rqmoe.write_index(flat, path)
    assert isinstance(faiss_rqmoe.read_index(path), faiss.IndexIVFPQ)
    with pytest.raises(ValueError, match="apply to RQMoE indexes"):
        faiss_rqmoe.index_factory(64, "Flat", nprobe=3)
    with pytest.raises(ValueError, match="faiss cannot build"):
        faiss_rqmoe.index_factory(64, "NotAnIndex12")
    assert isinstance(faiss_rqmoe.clone_index(flat), faiss.Index)
