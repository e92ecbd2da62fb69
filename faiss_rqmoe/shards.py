"""Sharded, resumable index builds and the merge of shards and of search results, in one process.

Build: the database rows of an on-disk array (.npy memory map, .fvecs, .bvecs)
are cut into shards of ``shard_size`` rows; ``encode_shard`` writes one
shard's codes, list numbers and ids to its own file (written whole or not at
all), so a crash loses at most the shard in progress and ``build_shards`` run
again skips the finished ones. Several workers, on one host or many, encode
the same shards through ``faiss_rqmoe.cluster`` (Dask). ``merge_shards`` is
the one merge: it writes the shards' codes into the trained index's faiss
inverted lists, in memory or in faiss's on-disk inverted lists
(``OnDiskInvertedLists``), one shard in memory at a time. Search:
``search_shards`` queries several index files or objects in threads of one
process and ``merge_results`` merges per-shard results as
``faiss.IndexShards`` does (the k best of the concatenation, ids as stored).
"""
from __future__ import annotations

import concurrent.futures
import logging
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


def shard_path(out_dir, start: int, end: int) -> Path:
    """The file of the shard of rows start..end-1 under out_dir."""
    return Path(out_dir) / f"shard_{start:012d}_{end:012d}.npz"


def encode_shard(index, vectors: np.ndarray, start: int, end: int, out_dir: Path, first_id: int = 0) -> Path:
    """Encode rows start..end-1 of vectors with a trained index and write their codes, list numbers and
    ids (first_id + row) to one shard file, atomically. Returns its path."""
    from .arrays import as_vectors

    x = as_vectors(vectors[start:end], index.d, "vectors")
    list_nos = index._assign(x)
    codes = index._encode(x - index.centroids[list_nos], list_nos, desc=f"shard {start}-{end}")
    path = shard_path(out_dir, start, end)
    code_dtype = np.uint8 if index.config.nbits <= 8 else np.uint16 if index.config.nbits <= 16 else np.int32
    save_arrays(path, {"codes": codes.astype(code_dtype), "list_nos": list_nos,
                       "ids": np.arange(first_id + start, first_id + end, dtype=np.int64)},
                {"format": SHARD_FORMAT, "start": start, "end": end})
    return path


def build_shards(index_path, vectors_path, out_dir, shard_size: int = 1_000_000, device=None,
                 first_id: int = 0) -> List[Path]:
    """Encode an on-disk database in shards with a trained, saved index, in this process; resumable.

    index_path: a file written by ``write_index`` (trained, empty or not);
    vectors_path: .npy/.fvecs/.bvecs with the database rows; device: where
    the codec runs (None: cuda if available). Finished shards (their files
    exist) are skipped. Several workers or hosts: ``faiss_rqmoe.cluster.build_shards``.
    Returns every shard's path, in row order.
    """
    from .io import read_index

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vectors = open_vectors(vectors_path)
    ranges = shard_ranges(vectors.shape[0], shard_size)
    todo = [r for r in ranges if not shard_path(out_dir, *r).exists()]
    logger.info("%d shards of %d rows: %d done, %d to encode", len(ranges), shard_size, len(ranges) - len(todo),
                len(todo))
    if todo:
        index = read_index(index_path, device=device)
        index.train_config = index.train_config.replace(progress=False)
        for start, end in todo:
            encode_shard(index, vectors, start, end, out_dir, first_id)
    return [shard_path(out_dir, *r) for r in ranges]


def load_shard(path):
    """The arrays of one shard file: codes (n, M) (uint8 up to 8 bits a step, uint16 up to 16, else int32),
    list_nos (n,) int64, ids (n,) int64."""
    arrays, meta = load_arrays(path, "a shard file")
    if meta.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path} is not a shard file (format {meta.get('format')!r})")
    return arrays


def merge_shards(index_path, shard_paths: Sequence, out_path=None, ondisk_path=None):
    """Add the codes of encoded shards to the trained index of index_path, in order; returns the index and
    writes it to out_path when given. One shard is in memory at a time.

    The entries go straight into faiss's inverted lists, sized once from the
    shards' list counts, in the order one ``add`` of the same rows gives.
    ondisk_path: a file for faiss's on-disk inverted lists
    (``OnDiskInvertedLists``, memory-mapped): the codes and ids stay there,
    not in memory, and the index file written to out_path refers to it by
    its absolute path, so keep the two together. The trained index must then
    be empty. Without it the lists are in memory, after any entries the
    trained index already holds.
    """
    from .io import read_index, write_index

    index = read_index(index_path, device="cpu")
    ivf = index.ivf
    shard_paths = list(shard_paths)
    counts = np.zeros(ivf.nlist, dtype=np.int64)
    for path in shard_paths:  # a first pass sizes every list once: no regrowth, an exact on-disk layout
        counts += np.bincount(load_shard(path)["list_nos"], minlength=ivf.nlist)
    invlists = ivf.invlists
    if ondisk_path is not None:
        if ivf.ntotal:
            raise ValueError(f"{index_path} holds {ivf.ntotal} vectors; on-disk lists are filled into an empty "
                             "trained index")
        invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, os.path.abspath(ondisk_path))
        total_bytes = int(counts.sum()) * (ivf.code_size + 8)
        if total_bytes:
            invlists.update_totsize(total_bytes)
        sizes = counts.astype(np.uint64)  # named: swig_ptr keeps no reference to its array
        invlists.set_all_lists_sizes(faiss.swig_ptr(sizes))
        ivf.replace_invlists(invlists, True)
        invlists.this.disown()
        filled = np.zeros(ivf.nlist, dtype=np.int64)
    else:
        filled = np.array([invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
        for list_no in np.flatnonzero(counts):
            invlists.resize(int(list_no), int(filled[list_no] + counts[list_no]))
    coarse_size = ivf.coarse_code_size()
    for path in shard_paths:
        arrays = load_shard(path)
        order = np.argsort(arrays["list_nos"], kind="stable")  # rows keep their order within a list
        list_nos = arrays["list_nos"][order]
        packed = np.ascontiguousarray(lut.encode_sa_codes(ivf, arrays["codes"][order], list_nos)[:, coarse_size:])
        ids = np.ascontiguousarray(arrays["ids"][order], dtype=np.int64)
        lists, firsts, sizes = np.unique(list_nos, return_index=True, return_counts=True)
        for list_no, i0, size in zip(lists.tolist(), firsts.tolist(), sizes.tolist()):
            invlists.update_entries(list_no, int(filled[list_no]), size, faiss.swig_ptr(ids[i0:]),
                                    faiss.swig_ptr(packed[i0:]))
            filled[list_no] += size
    ivf.ntotal += int(counts.sum())
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
    return merge_results(results, k, metric)


def merge_results(results: Sequence, k: int, metric: int):
    """Merge per-shard search results as faiss.IndexShards does: results is a sequence of (D, I), each
    (nq, k); returns D, I (nq, k) of the k best over all shards, best first (-1 ids where none)."""
    nq = len(results[0][0])
    heap = faiss.ResultHeap(nq, k, keep_max=metric == faiss.METRIC_INNER_PRODUCT)
    for D, I in results:
        heap.add_result(np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I, dtype=np.int64))
    heap.finalize()
    return heap.D, heap.I
