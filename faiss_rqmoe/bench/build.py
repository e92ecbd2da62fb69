"""``bench build``: filling a trained index with an on-disk database, in one ``add`` or in shards
(encoded by worker processes, merged through faiss), with wall time and peak host memory."""
from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

from ..devices import resolve_device
from ..io import read_index
from ..shards import build_shards, merge_shards, open_vectors
from .meta import run_meta, write_result


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def run_build(args) -> dict:
    """One build of args.vectors into the trained index args.index; see the module docstring."""
    devices = [None if d == "cpu" else d for d in args.devices]
    device = resolve_device(devices[0])
    vectors = open_vectors(args.vectors)
    row = {"mode": args.mode, "n": int(vectors.shape[0]), "devices": args.devices}
    start = time.perf_counter()
    if args.mode == "single":
        index = read_index(args.index, device=device)
        index.add(vectors)  # the whole database in memory as float32, as a plain add needs it
        row["ntotal"] = index.ntotal
    else:
        work = Path(args.work_dir)
        if args.fresh and work.exists():
            shutil.rmtree(work)
        paths = build_shards(args.index, args.vectors, work, args.shard_size, devices)
        row["encode_s"] = time.perf_counter() - start
        index = merge_shards(args.index, paths)
        row.update(ntotal=index.ntotal, shards=len(paths), shard_size=args.shard_size)
    row["wall_s"] = time.perf_counter() - start
    row["peak_rss_mb"] = _peak_rss_mb()
    row["database_float32_mb"] = vectors.shape[0] * vectors.shape[1] * 4 / 2**20
    result = {"kind": "build", "meta": run_meta(args.argv, device), "rows": [row]}
    write_result(result, args.out)
    return result
