"""Past one process: data-parallel training under torchrun (gloo on CPUs) against one process, sharded
and resumable builds against one add, and sharded search against the merged index."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import faiss_rqmoe
from faiss_rqmoe import index as index_module, shards
from faiss_rqmoe.bench import datasets

from conftest import assert_same_neighbours

TRAIN = dict(max_epochs=1, batch_size=256, progress=False, device="cpu")


@pytest.fixture(scope="module")
def split_file(sift, tmp_path_factory):
    path = tmp_path_factory.mktemp("split") / "small.npz"
    return datasets.export_split(sift, path, n_train=3000, n_val=500, n_db=200, n_query=20)


def train_command(split_file, out, processes: int):
    args = ["-m", "faiss_rqmoe", "train", "--dataset", str(split_file), "--description", "IVF8,RQMoE4x8_N2L1H16",
            "--max-epochs", "2", "--time-budget-s", "none", "--batch-size", "256", "--train-encode-candidates", "8",
            "--no-keep-rq-if-better", "--threads", "1", "--device", "cpu", "--quiet", "--out", str(out)]
    if processes == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
            str(29500 + os.getpid() % 1000), *args]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_two_process_training_equals_one_process(split_file, tmp_path):
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}.rqmoe"
        run = subprocess.run(train_command(split_file, out, processes), capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1])
        assert summary["processes"] == processes
        results[processes] = (faiss_rqmoe.read_index(out, device="cpu"), summary)
    one, two = results[1][0], results[2][0]
    assert results[1][1]["samples"] == results[2][1]["samples"]  # the same samples seen
    np.testing.assert_allclose(one.centroids, two.centroids)  # k-means ran once, on rank 0, in both
    history_1, history_2 = one.train_history, two.train_history
    assert history_1.init_val_mse == pytest.approx(history_2.init_val_mse, rel=1e-6)  # the same faiss RQ start
    assert history_2.best_val_mse == pytest.approx(history_1.best_val_mse, rel=5e-3)
    for key, value in one.model.state_dict().items():
        torch.testing.assert_close(two.model.state_dict()[key], value, rtol=5e-3, atol=5e-4)


@pytest.fixture(scope="module")
def trained(sift, tmp_path_factory):
    index = faiss_rqmoe.index_factory(128, "IVF8,RQMoE4x8_N2L1H16", keep_rq_if_better=False, **TRAIN)
    index.train(sift.xt[:2000])
    path = tmp_path_factory.mktemp("trained") / "trained.rqmoe"
    faiss_rqmoe.write_index(index, path)
    vectors = tmp_path_factory.mktemp("db") / "db.npy"
    np.save(vectors, sift.xb[:2000].astype(np.uint8))  # SIFT rows are bytes; an on-disk uint8 database
    return path, vectors


def single_build(index_path, vectors):
    index = faiss_rqmoe.read_index(index_path, device="cpu")
    index.add(np.load(vectors))
    return index


def all_codes(index):
    ids, lists, codes = faiss_rqmoe.lut.all_codes(index.ivf)
    order = np.argsort(ids)
    return ids[order], lists[order], codes[order]


def test_a_sharded_build_equals_one_add(trained, tmp_path, sift, monkeypatch):
    index_path, vectors = trained
    monkeypatch.setattr(index_module, "ENCODE_CHUNK", 256)  # shards of 512 rows: the same chunks as one add
    reference = single_build(index_path, vectors)
    paths = shards.build_shards(index_path, vectors, tmp_path / "work", shard_size=512)
    merged = shards.merge_shards(index_path, paths, tmp_path / "merged.rqmoe")
    assert merged.ntotal == reference.ntotal == 2000
    for a, b in zip(all_codes(merged), all_codes(reference)):
        np.testing.assert_array_equal(a, b)
    params = {"nprobe": 4, "nshort": 50}
    for a, b in zip(merged.search(sift.xq[:30], 10, params), reference.search(sift.xq[:30], 10, params)):
        np.testing.assert_array_equal(a, b)
    reread = faiss_rqmoe.read_index(tmp_path / "merged.rqmoe", device="cpu")
    np.testing.assert_array_equal(reread.search(sift.xq[:30], 10, params)[1], reference.search(sift.xq[:30], 10, params)[1])


def test_a_build_killed_between_shards_resumes_and_ends_identical(trained, tmp_path, monkeypatch):
    index_path, vectors = trained
    monkeypatch.setattr(index_module, "ENCODE_CHUNK", 256)
    work = tmp_path / "work"
    real_encode = shards.encode_shard
    done = []

    def dying(index, vectors, start, end, out_dir, first_id=0):
        if len(done) == 2:
            raise KeyboardInterrupt  # killed while the third shard was being encoded
        done.append(start)
        return real_encode(index, vectors, start, end, out_dir, first_id)

    monkeypatch.setattr(shards, "encode_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        shards.build_shards(index_path, vectors, work, shard_size=512)
    assert len(list(work.glob("shard_*.npz"))) == 2 and not list(work.glob("*.tmp"))
    monkeypatch.setattr(shards, "encode_shard", real_encode)
    resumed = []
    monkeypatch.setattr(shards, "encode_shard", lambda *a, **k: resumed.append(a[2]) or real_encode(*a, **k))
    paths = shards.build_shards(index_path, vectors, work, shard_size=512)
    assert resumed == [1024, 1536]  # only the unfinished shards were encoded again
    merged = shards.merge_shards(index_path, paths)
    for a, b in zip(all_codes(merged), all_codes(single_build(index_path, vectors))):
        np.testing.assert_array_equal(a, b)


def test_sharded_search_equals_search_on_the_merged_index(trained, tmp_path, sift):
    index_path, vectors = trained
    data = np.load(vectors)
    parts = []
    for start in (0, 700, 1400):
        part = faiss_rqmoe.read_index(index_path, device="cpu")
        part.add_with_ids(data[start:start + 700], np.arange(start, min(start + 700, 2000)))
        parts.append(part)
    merged = single_build(index_path, vectors)
    params = {"nprobe": 8, "nshort": 2000}  # exhaustive in every shard: the k best of the union
    D, I = shards.search_shards(parts, sift.xq[:25], 10, params)
    D_ref, I_ref = merged.search(sift.xq[:25], 10, params)
    assert_same_neighbours(D, I, sift.xq[:25], merged.reconstruct_batch, D_ref, rtol=1e-5, atol=1e-3)
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"part{i}.rqmoe")
        faiss_rqmoe.write_index(part, paths[-1])
    D2, I2 = shards.search_shards(paths, sift.xq[:25], 10, params)
    np.testing.assert_array_equal(I2, I)
