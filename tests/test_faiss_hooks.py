"""faiss's module functions, Python's copy and pickle protocols, merge_from and the last faiss conventions
(range_search dtypes, missing folders, indexIVF_stats) on IndexRQMoE, each against faiss itself."""
import copy
import io
import os
import pickle
import pickletools
import subprocess
import sys
import warnings

import faiss
import numpy as np
import pytest
import torch

import faiss_rqmoe
from faiss_rqmoe import faiss_hooks, lut
from faiss_rqmoe.storage import FileFormatError, load_arrays, save_arrays

from conftest import clustered

D = 32
TRAIN = dict(max_epochs=1, progress=False, device="cpu")


def _trained(description, n_add, seed=0):
    data = clustered(3000 + n_add, D, seed=seed)
    index = faiss_rqmoe.index_factory(D, description, **TRAIN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a one-epoch codec may keep its RQ start: that is fine here
        index.train(data[:3000])
    index.add(data[3000:])
    return index, data[3000:]


@pytest.fixture(scope="module")
def flat():
    index, _ = _trained("RQMoE4x6_N1L1H8", 500)
    index.nshort = 64
    return index


@pytest.fixture(scope="module")
def ivf():
    index, data = _trained("IVF8,RQMoE4x6_N1L1H8", 1000, seed=1)
    index.nprobe, index.nshort = 3, 64
    return index, data


@pytest.fixture(scope="module")
def queries():
    return clustered(20, D, seed=7)


def assert_same_index(a, b):
    """Same stored entries (ids, lists, code bytes), same codec weights, same settings, same faiss bytes."""
    for mine, theirs in zip(lut.all_codes(a.ivf), lut.all_codes(b.ivf)):
        np.testing.assert_array_equal(mine, theirs)
    assert np.array_equal(faiss.serialize_index(a.ivf), faiss.serialize_index(b.ivf))
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert (a.config, a.nlist, a.metric_type, a.nprobe, a.nshort, a.encode_beam, a.encode_candidates) == \
           (b.config, b.nlist, b.metric_type, b.nprobe, b.nshort, b.encode_beam, b.encode_candidates)


def assert_same_search(a, b, xq, k=5):
    D_a, I_a = a.search(xq, k)
    D_b, I_b = b.search(xq, k)
    assert np.array_equal(D_a, D_b) and np.array_equal(I_a, I_b)


# ------------------------------------------------------- faiss's functions
def test_faiss_write_and_read_index_round_trip(flat, queries, tmp_path):
    path = str(tmp_path / "index.rqmoe")
    faiss.write_index(flat, path)
    loaded = faiss.read_index(path)
    assert isinstance(loaded, faiss_rqmoe.IndexRQMoE)
    assert_same_index(flat, loaded)
    assert_same_search(flat, loaded, queries)
    assert isinstance(faiss.read_index(path, faiss.IO_FLAG_MMAP), faiss_rqmoe.IndexRQMoE)  # clients pass flags
    assert isinstance(faiss_rqmoe.read_index(path), faiss_rqmoe.IndexRQMoE)  # the package's own reader agrees


def test_faiss_serialize_deserialize_and_io_objects(flat, queries):
    data = faiss.serialize_index(flat)
    assert data.dtype == np.uint8 and data.ndim == 1
    for loaded in (faiss.deserialize_index(data), faiss.deserialize_index(data.tobytes()),
                   faiss_rqmoe.deserialize_index(faiss_rqmoe.serialize_index(flat))):
        assert_same_index(flat, loaded)
        assert_same_search(flat, loaded, queries)
    writer = faiss.VectorIOWriter()
    faiss.write_index(flat, writer)
    reader = faiss.VectorIOReader()
    faiss.copy_array_to_vector(faiss.vector_to_array(writer.data), reader.data)
    assert_same_index(flat, faiss.read_index(reader))


def test_faiss_clone_index_copy_and_deepcopy_are_independent(flat, queries):
    for clone in (faiss.clone_index(flat), faiss_rqmoe.clone_index(flat), copy.copy(flat), copy.deepcopy(flat),
                  copy.deepcopy([flat])[0]):
        assert clone is not flat and clone.ivf is not flat.ivf and clone.model is not flat.model
        assert_same_index(flat, clone)
        assert_same_search(flat, clone, queries)
        ntotal = flat.ntotal
        clone.add(queries)
        clone.reset()  # neither reaches the original (copy.copy used to share its storage)
        assert flat.ntotal == ntotal and clone.ntotal == 0
    assert_same_search(flat, copy.copy(flat), queries)


def test_copies_of_an_untrained_index_keep_its_settings():
    index = faiss_rqmoe.index_factory(D, "IVF4,RQMoE4x6", max_epochs=3, progress=False, device="cpu")
    index.nprobe, index.nshort, index.encode_beam = 2, 30, 3
    for clone in (copy.copy(index), copy.deepcopy(index), pickle.loads(pickle.dumps(index)), faiss.clone_index(index)):
        assert not clone.is_trained
        assert (clone.config, clone.nlist, clone.nprobe, clone.nshort, clone.encode_beam, clone.train_config,
                clone.auto_architecture) == (index.config, index.nlist, 2, 30, 3, index.train_config,
                                             index.auto_architecture)


def test_pickle_holds_the_file_format_and_only_its_reader(flat, queries):
    payload = pickle.dumps(flat)
    loaded = pickle.loads(payload)
    assert_same_index(flat, loaded)
    assert_same_search(flat, loaded, queries)
    # the pickle names one function, the package's reader, and its one argument is the format's bytes
    globals_named = [op.name for op, _, _ in pickletools.genops(payload) if "GLOBAL" in op.name]
    strings = [arg for op, arg, _ in pickletools.genops(payload) if op.name.endswith("UNICODE")]
    assert globals_named == ["STACK_GLOBAL"] and strings == ["faiss_rqmoe.index", "index_from_pickle"]
    blobs = [arg for op, arg, _ in pickletools.genops(payload) if op.name.endswith("BYTES")]
    assert len(blobs) == 1 and faiss_rqmoe.io.is_serialized_index(blobs[0])
    with pytest.raises(FileFormatError):
        faiss_rqmoe.index.index_from_pickle(pickle.dumps(["not", "an", "index"]))


def test_a_file_nested_in_the_faiss_part_is_refused(flat, tmp_path):
    """The faiss part of a file is read by faiss's own reader, so a file cannot smuggle in another."""
    arrays, meta = load_arrays(io.BytesIO(faiss_rqmoe.serialize_index(flat).tobytes()))
    arrays["faiss_index"] = faiss_rqmoe.serialize_index(flat)
    path = tmp_path / "nested.rqmoe"
    save_arrays(path, arrays, meta)
    for read in (faiss.read_index, faiss_rqmoe.read_index):
        with pytest.raises(FileFormatError, match="corrupted"):
            read(str(path))


def test_faiss_parameter_space_sets_search_parameters(ivf, queries):
    index, _ = ivf
    clone = faiss_rqmoe.clone_index(index)
    space = faiss.ParameterSpace()
    space.set_index_parameter(clone, "nprobe", 5)
    space.set_index_parameters(clone, "nshort=40")
    assert (clone.nprobe, clone.nshort) == (5, 40)
    space.set_index_parameters(clone, "nprobe=2,nshort=17")
    assert (clone.nprobe, clone.nshort, clone.ivf.nprobe) == (2, 17, 2)
    D1, I1 = clone.search(queries, 5)
    D2, I2 = index.search(queries, 5, params="nprobe=2,nshort=17")
    assert np.array_equal(D1, D2) and np.array_equal(I1, I2)
    # what faiss raises for a parameter an IVF index does not have, it raises here
    faiss_ivf = faiss.index_factory(D, "IVF8,Flat")
    for target in (faiss_ivf, clone):
        with pytest.raises(RuntimeError, match="could not set parameter efConstruction"):
            space.set_index_parameter(target, "efConstruction", 3)
    with pytest.raises(ValueError, match="nshort"):
        space.set_index_parameter(clone, "nshort", 0)


def test_faiss_parameter_space_reaches_an_hnsw_coarse_quantizer():
    index, _ = _trained("IVF8_HNSW4,RQMoE4x6_N1L1H8", 10)
    reference = faiss.index_factory(D, "IVF8_HNSW4,Flat")
    space = faiss.ParameterSpace()
    for target in (reference, index):
        space.set_index_parameters(target, "nprobe=3,quantizer_efSearch=7")
        hnsw = faiss.downcast_index(target.quantizer).hnsw
        assert (target.nprobe, hnsw.efSearch) == (3, 7)


def _faiss_outcomes(folder):
    """What faiss's hooked functions give for faiss's own objects and files: results or (type, message)."""
    rng = np.random.default_rng(0)
    xb, xq = rng.random((200, 8), dtype=np.float32), rng.random((3, 8), dtype=np.float32)
    flat_index = faiss.IndexFlatL2(8)
    flat_index.add(xb)
    ivf_index = faiss.index_factory(8, "IVF4,Flat")
    ivf_index.train(xb)
    ivf_index.add(xb)
    path, text, missing = folder / "flat.faiss", folder / "notes.txt", folder / "absent"
    text.write_text("not an index")
    np.savez(folder / "plain.npz", a=np.arange(3))  # a zip archive of someone else's
    space = faiss.ParameterSpace()

    def searched(index):
        return type(index).__name__, index.ntotal, index.search(xq, 3)[1].tolist()

    calls = [
        lambda: faiss.write_index(flat_index, str(path)) or path.read_bytes(),
        lambda: searched(faiss.read_index(str(path))),
        lambda: searched(faiss.read_index(str(path), faiss.IO_FLAG_MMAP)),
        lambda: faiss.read_index(str(missing / "x.faiss")),
        lambda: faiss.read_index(str(folder)),
        lambda: faiss.read_index(str(text)),
        lambda: faiss.read_index(str(folder / "plain.npz")),
        lambda: faiss.read_index(123),
        lambda: faiss.read_index(),
        lambda: faiss.write_index(flat_index, str(missing / "x.faiss")),
        lambda: faiss.write_index(object(), str(path)),
        lambda: faiss.write_index(flat_index),
        lambda: faiss.serialize_index(ivf_index).tobytes(),
        lambda: searched(faiss.deserialize_index(faiss.serialize_index(ivf_index))),
        lambda: faiss.deserialize_index(np.zeros(16, dtype=np.uint8)),
        lambda: faiss.deserialize_index(np.frombuffer((folder / "plain.npz").read_bytes(), dtype=np.uint8)),
        lambda: faiss.serialize_index(object()),
        lambda: faiss.serialize_index(ivf_index, io_flags=0).tobytes(),
        lambda: searched(faiss.clone_index(ivf_index)),
        lambda: faiss.clone_index(object()),
        lambda: space.set_index_parameter(ivf_index, "nprobe", 3) or ivf_index.nprobe,
        lambda: space.set_index_parameters(ivf_index, "nprobe=4") or ivf_index.nprobe,
        lambda: space.set_index_parameters(ivf_index, "nshort=4"),
        lambda: space.set_index_parameter(object(), "nprobe", 3),
    ]
    outcomes = []
    for call in calls:
        try:
            outcomes.append(("ok", call()))
        except Exception as exc:  # noqa: BLE001 -- the exception itself is the outcome compared
            outcomes.append(("raised", type(exc), str(exc)))
    return outcomes


def test_faiss_objects_and_files_get_faiss_own_behaviour(tmp_path):
    assert faiss_hooks.installed()
    hooked = _faiss_outcomes(tmp_path)
    faiss_hooks.uninstall()
    try:
        assert not faiss_hooks.installed()
        plain = _faiss_outcomes(tmp_path)
    finally:
        faiss_hooks.install()
    assert hooked == plain
    assert sum(o[0] == "raised" for o in plain) >= 10  # the error cases did raise


def test_hooks_install_once_and_switch_off(flat, tmp_path):
    hooked = faiss.write_index
    faiss_hooks.install()
    faiss_hooks.install()
    assert faiss.write_index is hooked  # never wrapped twice
    original = getattr(hooked, faiss_hooks._ORIGINAL)
    assert not hasattr(original, faiss_hooks._ORIGINAL) and original is faiss.swigfaiss.write_index.__wrapped__
    faiss_hooks.uninstall()
    try:
        assert faiss.write_index is original
        with pytest.raises(TypeError):  # faiss's own function cannot take an IndexRQMoE
            faiss.write_index(flat, str(tmp_path / "x.rqmoe"))
    finally:
        faiss_hooks.install()
    assert faiss_hooks.installed()
    # the environment variable, read at import (this process imported with the hooks on: installed above)
    code = ("import faiss, faiss_rqmoe\n"
            "print(faiss_rqmoe.faiss_hooks.installed(), hasattr(faiss.write_index, '__wrapped__'))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **{faiss_hooks.ENV_VAR: "0"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ------------------------------------------------------------- merge_from
def test_merge_from_moves_codes_and_offsets_ids_as_faiss_ivf(ivf, queries):
    index, data = ivf
    a, b = faiss_rqmoe.clone_index(index), faiss_rqmoe.clone_index(index)
    a.reset()
    b.reset()
    a.add(data[:600])
    b.add(data[600:])
    both = faiss_rqmoe.clone_index(index)  # everything added in one index, ids 0..999
    a.merge_from(b, add_id=600)
    assert (a.ntotal, b.ntotal) == (1000, 0) and b.is_trained
    # the same entries, byte for byte, as the index that added everything (the order within a list aside)
    entries = [sorted(zip(ids.tolist(), lists.tolist(), map(bytes, codes))) for ids, lists, codes in
               (lut.all_codes(a.ivf), lut.all_codes(both.ivf))]
    assert entries[0] == entries[1]
    assert_same_search(a, both, queries)
    # faiss's IVF merge does the same with ids: other's ids + add_id, other emptied
    ref_a, ref_b = faiss.index_factory(D, "IVF8,Flat"), faiss.index_factory(D, "IVF8,Flat")
    ref_a.train(data)
    ref_b.train(data)  # same data, same seed: the same centroids, as faiss's merge requires
    ref_a.add(data[:600])
    ref_b.add(data[600:])
    ref_a.merge_from(ref_b, 600)
    assert (ref_a.ntotal, ref_b.ntotal) == (a.ntotal, b.ntotal)
    assert sorted(lut.all_codes(ref_a)[0].tolist()) == sorted(lut.all_codes(a.ivf)[0].tolist())
    # add_id=0 (faiss's default) keeps other's ids as they are
    c, d = faiss_rqmoe.clone_index(index), faiss_rqmoe.clone_index(index)
    c.merge_from(d)
    assert sorted(lut.all_codes(c.ivf)[0].tolist()) == sorted(list(range(1000)) * 2)


def test_merge_from_refuses_what_faiss_refuses(ivf, flat):
    index, data = ivf
    clone = faiss_rqmoe.clone_index(index)
    other_codec, _ = _trained("IVF8,RQMoE4x6_N1L1H8", 10, seed=2)
    other_weights, other_tables = faiss_rqmoe.clone_index(index), faiss_rqmoe.clone_index(index)
    with torch.no_grad():
        other_weights.model.codebooks.add_(1e-3)
    other_tables.static_codebooks = other_tables.static_codebooks + 1e-3
    for other, error, message in (
            (flat, ValueError, "differ in nlist"),
            (other_codec, ValueError, "differ in coarse centroids"),
            (other_weights, ValueError, "differ in codec weights"),
            (other_tables, ValueError, "differ in lookup-table codebooks"),
            (faiss.IndexFlatL2(D), TypeError, "expects an IndexRQMoE")):
        with pytest.raises(error, match=message):
            clone.merge_from(other)
    with pytest.raises(TypeError, match="add_id must be an integer"):
        clone.merge_from(faiss_rqmoe.clone_index(index), add_id="1")
    with pytest.raises(ValueError, match="into itself"):
        clone.merge_from(clone)
    with pytest.raises(RuntimeError, match="trained"):
        faiss_rqmoe.index_factory(D, "IVF8,RQMoE4x6").merge_from(clone)
    assert clone.ntotal == other_weights.ntotal == index.ntotal  # nothing moved


# ---------------------------------------------------------- conventions
def test_range_search_has_faiss_dtypes(flat, queries):
    reference = faiss.IndexFlatL2(D)
    reference.add(flat.reconstruct_n(0, flat.ntotal))
    radius = float(np.median(reference.search(queries, 10)[0][:, -1]))
    flat_all = faiss_rqmoe.clone_index(flat)
    flat_all.nshort = flat.ntotal
    got, want = flat_all.range_search(queries, radius), reference.range_search(queries, radius)
    assert [a.dtype for a in got] == [b.dtype for b in want] == [np.uint64, np.float32, np.int64]
    np.testing.assert_array_equal(got[0], want[0])
    for q in range(len(queries)):
        rows_got, rows_want = slice(got[0][q], got[0][q + 1]), slice(want[0][q], want[0][q + 1])
        assert sorted(got[2][rows_got]) == sorted(want[2][rows_want])
        np.testing.assert_allclose(np.sort(got[1][rows_got]), np.sort(want[1][rows_want]), rtol=1e-5, atol=1e-4)
    lims = flat_all.range_search(torch.from_numpy(queries), radius)[0]
    assert lims.dtype == torch.int64  # as faiss.contrib.torch_utils gives torch callers


def test_writing_into_a_missing_folder_raises_as_faiss(flat, tmp_path):
    target = tmp_path / "absent" / "index.rqmoe"
    with pytest.raises(RuntimeError, match="could not open .* for writing") as faiss_error:
        faiss.write_index(faiss.IndexFlatL2(D), str(target))
    for write in (faiss.write_index, faiss_rqmoe.write_index):
        with pytest.raises(RuntimeError, match="could not open .* for writing") as ours:
            write(flat, str(target))
        assert isinstance(ours.value, FileNotFoundError) and isinstance(faiss_error.value, RuntimeError)
    assert not (tmp_path / "absent").exists()


def test_ivf_stats_count_as_faiss_ivf_does(ivf, queries):
    index, data = ivf
    reference = faiss.IndexIVFFlat(faiss.IndexFlatL2(D), D, index.nlist)
    reference.quantizer.add(index.centroids)
    reference.is_trained = True
    reference.add(data)  # the lists faiss assigns are the index's: one quantizer, the same vectors
    counts = {}
    for name, target in (("faiss", reference), ("ours", index)):
        for nprobe in (1, 3, 8):
            target.nprobe = nprobe
            faiss.cvar.indexIVF_stats.reset()
            target.search(queries, 5)
            stats = faiss.cvar.indexIVF_stats
            counts[name, nprobe] = (stats.nq, stats.nlist, stats.ndis)
    index.nprobe = 3
    for nprobe in (1, 3, 8):
        assert counts["ours", nprobe] == counts["faiss", nprobe]
    assert counts["ours", 8] == (len(queries), len(queries) * index.nlist, len(queries) * index.ntotal)
