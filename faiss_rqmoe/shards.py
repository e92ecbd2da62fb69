"""Past one machine's memory and one process: sharded, resumable index builds and sharded search.

Build: the database rows of an on-disk array (.npy memory map, .fvecs, .bvecs)
are cut into shards of ``shard_size`` rows; worker processes (one a GPU, or a
few on the CPU) encode shards with a trained index and write each shard's
codes, list numbers and ids to its own file (written whole or not at all), so
a crash loses at most the shards in progress and ``build_shards`` run again
skips the finished ones. ``merge_shards`` adds the shards' codes to the
trained index through faiss (``add_sa_codes``: faiss's inverted lists),
one shard in memory at a time. Search: ``search_shards`` queries several
index files or objects in threads and merges their results as
``faiss.IndexShards`` does (the k best of the concatenation, ids as stored).
"""
from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
from pathlib import Path
from typing import List, Optional, Sequence

import faiss
import numpy as np

from . import lut
from .storage import load_arrays, save_arrays

logger = logging.getLogger(__name__)

SHARD_FORMAT = "faiss_rqmoe.shard/1"


def open_vectors(path) -> np.ndarray:
    """A read-only (n, d) view of an on-disk array without loading it: .npy (memory-mapped), .fvecs or
    .bvecs (a memory-mapped row layout that skips the per-row dimension header)."""
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    item = {".fvecs": np.float32, ".bvecs": np.uint8}.get(path.suffix)
    if item is None:
        raise ValueError(f"{path}: expected a .npy, .fvecs or .bvecs file, got suffix {path.suffix!r}")
    d = int(np.fromfile(path, dtype=np.int32, count=1)[0])
    row_bytes = 4 + d * np.dtype(item).itemsize
    size = path.stat().st_size
    if d <= 0 or size % row_bytes:
        raise ValueError(f"{path} is not a valid {path.suffix} file: {size} bytes for rows of {row_bytes}")
    rows = np.memmap(path, dtype=np.uint8, mode="r", shape=(size // row_bytes, row_bytes))
    return rows[:, 4:].view(item)


def shard_ranges(n: int, shard_size: int) -> List[tuple]:
    """[(start, end), ...] covering rows 0..n-1 in shards of at most shard_size."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(i0, min(n, i0 + shard_size)) for i0 in range(0, n, shard_size)]


def _shard_path(out_dir: Path, start: int, end: int) -> Path:
    return out_dir / f"shard_{start:012d}_{end:012d}.npz"


def encode_shard(index, vectors: np.ndarray, start: int, end: int, out_dir: Path, first_id: int = 0) -> Path:
    """Encode rows start..end-1 of vectors with a trained index and write their codes, list numbers and
    ids (first_id + row) to one shard file, atomically. Returns its path."""
    from .arrays import as_vectors

    x = as_vectors(vectors[start:end], index.d, "vectors")
    list_nos = index._assign(x)
    codes = index._encode(x - index.centroids[list_nos], list_nos, desc=f"shard {start}-{end}")
    path = _shard_path(out_dir, start, end)
    save_arrays(path, {"codes": codes.astype(np.int32), "list_nos": list_nos,
                       "ids": np.arange(first_id + start, first_id + end, dtype=np.int64)},
                {"format": SHARD_FORMAT, "start": start, "end": end})
    return path


def _worker(index_path: str, vectors_path: str, ranges: Sequence[tuple], out_dir: str, device: Optional[str],
            threads: Optional[int], first_id: int) -> List[str]:
    import torch

    from .io import read_index

    if threads:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    index = read_index(index_path, device=device)
    index.train_config = index.train_config.replace(progress=False)
    vectors = open_vectors(vectors_path)
    return [str(encode_shard(index, vectors, start, end, Path(out_dir), first_id)) for start, end in ranges]


def build_shards(index_path, vectors_path, out_dir, shard_size: int = 1_000_000, devices: Sequence = (None,),
                 threads_per_worker: Optional[int] = None, first_id: int = 0) -> List[Path]:
    """Encode an on-disk database in shards with a trained, saved index; resumable.

    index_path: a file written by ``write_index`` (trained, empty or not);
    vectors_path: .npy/.fvecs/.bvecs with the database rows; devices: one
    worker process a device (e.g. ["cuda:0", "cuda:1"] or [None, None] for
    two CPU workers). Finished shards (their files exist) are skipped.
    Returns every shard's path, in row order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = open_vectors(vectors_path).shape[0]
    ranges = shard_ranges(n, shard_size)
    todo = [r for r in ranges if not _shard_path(out_dir, *r).exists()]
    logger.info("%d shards of %d rows: %d done, %d to encode", len(ranges), shard_size, len(ranges) - len(todo),
                len(todo))
    if todo:
        if len(devices) == 1:
            _worker(str(index_path), str(vectors_path), todo, str(out_dir), devices[0], threads_per_worker, first_id)
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(len(devices), mp_context=context) as pool:
                jobs = [pool.submit(_worker, str(index_path), str(vectors_path), todo[w::len(devices)],
                                    str(out_dir), devices[w], threads_per_worker, first_id)
                        for w in range(len(devices))]
                for job in jobs:
                    job.result()
    return [_shard_path(out_dir, *r) for r in ranges]


def merge_shards(index_path, shard_paths: Sequence, out_path=None):
    """Add the codes of encoded shards to the trained index of index_path, in order, through faiss;
    writes the full index to out_path when given and returns it. One shard is in memory at a time."""
    from .io import read_index, write_index

    index = read_index(index_path, device="cpu")
    for path in shard_paths:
        arrays, meta = load_arrays(path, "a shard file")
        if meta.get("format") != SHARD_FORMAT:
            raise ValueError(f"{path} is not a shard file (format {meta.get('format')!r})")
        sa_codes = lut.encode_sa_codes(index.ivf, arrays["codes"], arrays["list_nos"])
        index.ivf.add_sa_codes(sa_codes, arrays["ids"])
    index._mirror = None
    if out_path is not None:
        write_index(index, out_path)
    return index


def search_shards(indexes: Sequence, xq, k: int, params=None, threads: Optional[int] = None):
    """Search several indexes (IndexRQMoE objects, faiss indexes, or paths to either) and merge as
    faiss.IndexShards does: D, I (nq, k) of the k best results over all shards, best first.

    Each shard is searched in its own thread (faiss and torch release the GIL).
    """
    from .io import read_index

    shards = [read_index(s) if isinstance(s, (str, os.PathLike)) else s for s in indexes]
    if not shards:
        raise ValueError("search_shards needs at least one index")
    metric = shards[0].metric_type
    if any(s.metric_type != metric for s in shards):
        raise ValueError("all shards must use the same metric")
    xq = np.ascontiguousarray(xq, dtype=np.float32)

    def one(shard):
        if isinstance(shard, faiss.Index):
            return shard.search(xq, k) if params is None else shard.search(xq, k, params=params)
        return shard.search(xq, k, params)

    with concurrent.futures.ThreadPoolExecutor(threads or len(shards)) as pool:
        results = list(pool.map(one, shards))
    heap = faiss.ResultHeap(len(xq), k, keep_max=metric == faiss.METRIC_INNER_PRODUCT)
    for D, I in results:
        heap.add_result(np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I, dtype=np.int64))
    heap.finalize()
    return heap.D, heap.I
