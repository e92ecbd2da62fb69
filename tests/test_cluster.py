"""Builds and search on a local Dask cluster (two worker processes on 127.0.0.1) against one process: the same
codes, ids and list contents bit for bit, the same search answers, and a build whose worker is killed that
resumes and ends identical."""
import functools
import os
import sys

import numpy as np
import pytest

distributed = pytest.importorskip("distributed", reason="needs the cluster extra: pip install faiss_rqmoe[cluster]")

import cloudpickle  # noqa: E402  (installed with distributed)
import dask  # noqa: E402
import faiss  # noqa: E402

import faiss_rqmoe  # noqa: E402
from faiss_rqmoe import cluster, index as index_module, shards  # noqa: E402

from conftest import assert_same_neighbours  # noqa: E402

# the workers cannot import this test module: its functions travel by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

N_DB = 3000
SHARD_SIZE = 512


@pytest.fixture(scope="module")
def client():
    client = cluster.local_client(n_workers=2, threads_per_worker=1)
    yield client
    local = client.cluster
    client.close()
    local.close()


@pytest.fixture(scope="module")
def trained(sift, tmp_path_factory):
    index = faiss_rqmoe.index_factory(128, "IVF16,RQMoE4x8_N2L1H16", keep_rq_if_better=False, max_epochs=1,
                                      batch_size=256, progress=False, device="cpu")
    index.train(sift.xt[:2000])
    folder = tmp_path_factory.mktemp("cluster")
    path = folder / "trained.rqmoe"
    faiss_rqmoe.write_index(index, path)
    rows = sift.xb[:N_DB].astype(np.uint8)  # SIFT rows are bytes: an on-disk uint8 database
    np.save(folder / "db.npy", rows)
    header = np.full((N_DB, 4), 0, dtype=np.uint8)
    header.view(np.int32)[:] = 128
    np.hstack([header, rows]).tofile(folder / "db.bvecs")
    return path, folder / "db.npy", folder / "db.bvecs"


def list_contents(index):
    """Every list's ids and codes in stored order: equal only if every list holds the same entries in the
    same order."""
    return faiss_rqmoe.lut.all_codes(index.ivf)


def assert_same_storage(a, b):
    assert a.ntotal == b.ntotal
    for x, y in zip(list_contents(a), list_contents(b)):
        np.testing.assert_array_equal(x, y)


def set_encode_chunk(rows: int):
    index_module.ENCODE_CHUNK = rows


def test_a_cluster_build_equals_one_add_bit_for_bit(client, trained, tmp_path, sift, monkeypatch):
    index_path, npy, bvecs = trained
    default_chunk = index_module.ENCODE_CHUNK
    # chunks of 256 rows in every process: one add and 512-row shards encode the same batches
    monkeypatch.setattr(index_module, "ENCODE_CHUNK", 256)
    client.run(set_encode_chunk, 256)
    try:
        merged = cluster.build_index(client, index_path, bvecs, tmp_path / "work", tmp_path / "full.rqmoe",
                                     shard_size=SHARD_SIZE)
    finally:
        client.run(set_encode_chunk, default_chunk)
    reference = faiss_rqmoe.read_index(index_path, device="cpu")
    reference.add(np.load(npy))
    assert isinstance(faiss.downcast_InvertedLists(merged.ivf.invlists), faiss.OnDiskInvertedLists)
    assert (tmp_path / "full.ivfdata").stat().st_size == N_DB * (merged.ivf.code_size + 8)  # exact, no slack
    assert_same_storage(merged, reference)
    reread = faiss_rqmoe.read_index(tmp_path / "full.rqmoe", device="cpu")
    assert_same_storage(reread, reference)
    params = {"nprobe": 4, "nshort": 50}
    for a, b in zip(reread.search(sift.xq[:30], 10, params), reference.search(sift.xq[:30], 10, params)):
        np.testing.assert_array_equal(a, b)
    in_memory = shards.merge_shards(index_path, sorted((tmp_path / "work").glob("shard_*.npz")))
    assert_same_storage(in_memory, reference)  # the one merge, into memory or onto disk


def test_cluster_search_equals_one_index(client, trained, tmp_path, sift):
    index_path, npy, _ = trained
    paths = shards.build_shards(index_path, npy, tmp_path / "work", shard_size=SHARD_SIZE, device="cpu")
    held = cluster.ClusterIndex(client, index_path, paths)
    try:
        assert held.ntotal == N_DB and len(held.workers) == 2
        xq = sift.xq[:25]
        exhaustive = {"nprobe": 16, "nshort": N_DB}  # every list, every code: the k best of the union
        D, I = held.search(xq, 10, exhaustive)
        one = shards.merge_shards(index_path, paths)
        D_ref, I_ref = one.search(xq, 10, exhaustive)
        assert_same_neighbours(D, I, xq, one.reconstruct_batch, D_ref, rtol=1e-5, atol=1e-3)
        params = {"nprobe": 4, "nshort": 40}
        parts = [shards.merge_shards(index_path, group) for group in cluster.split_evenly(paths, 2)]
        for a, b in zip(held.search(xq, 10, params), shards.search_shards(parts, xq, 10, params)):
            np.testing.assert_array_equal(a, b)  # IndexShards semantics, shortlist per shard included
    finally:
        held.close()


def encode_or_die(marker, index_path, vectors_path, start, end, out_dir, first_id, device):
    """A shard task whose worker process dies, once, when it starts the third shard."""
    if start == 2 * SHARD_SIZE and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return cluster.encode_shard_task(index_path, vectors_path, start, end, out_dir, first_id, device)


def test_a_build_whose_worker_is_killed_resumes_and_ends_identical(trained, tmp_path):
    index_path, npy, _ = trained
    reference = shards.merge_shards(index_path, shards.build_shards(index_path, npy, tmp_path / "one",
                                                                    shard_size=SHARD_SIZE, device="cpu"))
    work = tmp_path / "work"
    task = functools.partial(encode_or_die, str(tmp_path / "killed"))
    # no retry: the killed worker's task fails the build, as a lost driver would leave it
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        client = cluster.local_client(n_workers=2, threads_per_worker=1)
    try:
        with pytest.raises(distributed.KilledWorker):
            cluster.build_shards(client, index_path, npy, work, shard_size=SHARD_SIZE, _task=task)
        assert (tmp_path / "killed").exists()
        finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in work.glob("shard_*.npz")}
        assert finished and f"shard_{1024:012d}_{1536:012d}.npz" not in finished
        paths = cluster.build_shards(client, index_path, npy, work, shard_size=SHARD_SIZE, _task=task)
    finally:
        local = client.cluster
        client.close()
        local.close()
    for name, stamp in finished.items():  # a finished shard is never redone
        path = work / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp
    merged = shards.merge_shards(index_path, paths, tmp_path / "full.rqmoe", ondisk_path=tmp_path / "full.ivfdata")
    assert_same_storage(merged, reference)


def test_a_killed_worker_s_shard_is_rerun_by_the_cluster(client, trained, tmp_path):
    index_path, npy, _ = trained
    reference = shards.build_shards(index_path, npy, tmp_path / "one", shard_size=SHARD_SIZE, device="cpu")
    task = functools.partial(encode_or_die, str(tmp_path / "killed"))
    paths = cluster.build_shards(client, index_path, npy, tmp_path / "work", shard_size=SHARD_SIZE, _task=task)
    assert (tmp_path / "killed").exists()  # the worker died once; Dask ran its shard again elsewhere
    assert_same_storage(shards.merge_shards(index_path, paths), shards.merge_shards(index_path, reference))


def test_the_build_command_on_a_local_cluster(trained, tmp_path, capsys):
    index_path, npy, _ = trained
    out = tmp_path / "full.rqmoe"
    assert cluster.main(["build", "--workers", "1", "--index", str(index_path), "--vectors", str(npy),
                         "--work-dir", str(tmp_path / "work"), "--out", str(out), "--shard-size", "1000"]) == 0
    assert '"ntotal": 3000' in capsys.readouterr().out
    reference = shards.merge_shards(index_path, shards.build_shards(index_path, npy, tmp_path / "one",
                                                                    shard_size=1000, device="cpu"))
    assert_same_storage(faiss_rqmoe.read_index(out, device="cpu"), reference)
    assert (tmp_path / "full.ivfdata").exists()


def visible_gpus():
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_a_local_cluster_of_one_worker_a_gpu(trained, tmp_path):
    index_path, npy, _ = trained
    client = cluster.local_client(gpus=[0, 1])
    try:
        assert sorted(client.run(visible_gpus).values()) == ["0", "1"]  # each worker sees only its GPU
        paths = cluster.build_shards(client, index_path, npy, tmp_path / "work", shard_size=1000,
                                     resources={"GPU": 1})
    finally:
        local = client.cluster
        client.close()
        local.close()
    reference = shards.build_shards(index_path, npy, tmp_path / "one", shard_size=1000, device="cpu")
    assert_same_storage(shards.merge_shards(index_path, paths), shards.merge_shards(index_path, reference))
