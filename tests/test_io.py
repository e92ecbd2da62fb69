import pickle
import zipfile

import numpy as np
import pytest

import faiss_rqmoe
from faiss_rqmoe.io import load_arrays, save_arrays


@pytest.fixture(scope="module")
def index(sift):
    index = faiss_rqmoe.index_factory(128, "IVF8,RQMoE4x6_N2L1H32", max_epochs=1, progress=False, device="cpu",
                                      keep_rq_if_better=False)  # keep the learned codec: beams matter for it
    index.train(sift.xt[:2000])
    index.add(sift.xb[:1000])
    index.nprobe, index.nshort = 4, 64
    return index


def test_write_read_search_is_bit_identical(index, sift, tmp_path):
    path = tmp_path / "index.rqmoe"
    faiss_rqmoe.write_index(index, path)
    loaded = faiss_rqmoe.read_index(path)
    assert (loaded.ntotal, loaded.nprobe, loaded.nshort, loaded.config) == \
           (index.ntotal, index.nprobe, index.nshort, index.config)
    D, I = index.search(sift.xq[:50], 10)
    D2, I2 = loaded.search(sift.xq[:50], 10)
    assert np.array_equal(D, D2) and np.array_equal(I, I2)
    assert loaded.train_history.best_val_mse == index.train_history.best_val_mse


def test_beam_encoding_settings_survive_write_read(index, sift, tmp_path):
    x = sift.xb[:300]
    greedy_error = ((index.sa_decode(index.sa_encode(x)) - x) ** 2).sum(1).mean()
    saved = index.encode_beam, index.encode_candidates
    index.encode_beam, index.encode_candidates = 4, 16
    try:
        codes = index.sa_encode(x)
        path = tmp_path / "beam.rqmoe"
        faiss_rqmoe.write_index(index, path)
        loaded = faiss_rqmoe.read_index(path)
        assert (loaded.encode_beam, loaded.encode_candidates) == (4, 16)
        assert np.array_equal(loaded.sa_encode(x), codes)
    finally:
        index.encode_beam, index.encode_candidates = saved
    assert ((index.sa_decode(codes) - x) ** 2).sum(1).mean() < greedy_error


def test_execution_and_memory_budget_survive_write_read_and_copies(index, tmp_path):
    """How the codec runs is the index's setting: a file, a clone and a pickle keep it; an older file
    without it reads with the defaults."""
    import copy
    import pickle

    from faiss_rqmoe import Execution

    saved = index.execution, index.mem_budget_bytes
    index.set_execution(kernel="torch", dtype="bfloat16", cuda_graphs=False, mem_budget_bytes=1 << 25)
    try:
        path = tmp_path / "execution.rqmoe"
        faiss_rqmoe.write_index(index, path)
        for other in (faiss_rqmoe.read_index(path), faiss_rqmoe.clone_index(index), copy.copy(index),
                      pickle.loads(pickle.dumps(index))):
            assert other.execution == Execution("torch", "bfloat16", False)
            assert other.mem_budget_bytes == 1 << 25 and other.engine.execution == other.execution
    finally:
        index.execution, index.mem_budget_bytes = saved
    with pytest.raises(ValueError, match="Execution.dtype must be one of"):
        index.set_execution(dtype="float16")
    assert index.execution == saved[0]


class _Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/faiss_rqmoe_pwned",))


def test_loading_a_pickle_payload_never_executes_it(tmp_path, index):
    marker = "/tmp/faiss_rqmoe_pwned"
    import os
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "evil.rqmoe"
    faiss_rqmoe.write_index(index, path)
    # replace the faiss part by an object array that would run code if unpickled
    with zipfile.ZipFile(path, "a") as archive:
        with archive.open("faiss_index.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.array([_Exploit()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        faiss_rqmoe.read_index(path)
    raw = tmp_path / "raw.rqmoe"
    raw.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(ValueError):
        faiss_rqmoe.read_index(raw)
    assert not os.path.exists(marker)


def test_truncated_and_corrupted_files_raise(index, tmp_path):
    path = tmp_path / "index.rqmoe"
    faiss_rqmoe.write_index(index, path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.rqmoe"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        faiss_rqmoe.read_index(truncated)
    arrays, meta = load_arrays(path)
    arrays["faiss_index"] = arrays["faiss_index"][:100]
    broken = tmp_path / "broken.rqmoe"
    save_arrays(broken, arrays, meta)
    with pytest.raises(ValueError, match="corrupted"):
        faiss_rqmoe.read_index(broken)
    arrays, meta = load_arrays(path)
    arrays["model.codebooks"] = arrays["model.codebooks"][:, :3]
    wrong_shape = tmp_path / "wrong_shape.rqmoe"
    save_arrays(wrong_shape, arrays, meta)
    with pytest.raises(ValueError, match="corrupted"):
        faiss_rqmoe.read_index(wrong_shape)
    meta["version"] = 99
    future = tmp_path / "future.rqmoe"
    save_arrays(future, arrays, meta)
    with pytest.raises(ValueError, match="version 99"):
        faiss_rqmoe.read_index(future)


def test_missing_file_and_untrained_index(tmp_path):
    with pytest.raises(FileNotFoundError):
        faiss_rqmoe.read_index(tmp_path / "nope.rqmoe")
    with pytest.raises(ValueError, match="untrained"):
        faiss_rqmoe.write_index(faiss_rqmoe.index_factory(16, "RQMoE2x4"), tmp_path / "x.rqmoe")
