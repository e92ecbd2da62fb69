"""``bench build``: filling a trained index with an on-disk database, then searching it, with wall time and
peak host memory a process.

Modes: ``single`` (one ``add`` of the whole database in this process),
``sharded`` (resumable shards encoded in this process, merged in memory),
``cluster`` (shards encoded by the workers of a Dask cluster, a local one by
default, merged into faiss's on-disk inverted lists here, and searched by the
workers, each holding a contiguous part of the shards).
"""
from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

import numpy as np

from ..devices import resolve_device
from ..io import read_index
from ..shards import build_shards, merge_shards, open_vectors
from .meta import run_meta, write_result


def _peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _search(search, xq: np.ndarray, k: int, params: dict, row: dict) -> None:
    search(xq[:10], k, params)  # first-call work (lookup structures, thread pools) is not a query's cost
    start = time.perf_counter()
    search(xq, k, params)
    row["search_s"] = time.perf_counter() - start
    row["qps"] = len(xq) / row["search_s"]


def run_build(args) -> dict:
    """One build of args.vectors into the trained index args.index; see the module docstring."""
    gpus = None
    if args.devices:  # the option of earlier results: several devices were several local workers
        if len(args.devices) == 1:
            args.device = args.device or args.devices[0]
        else:
            args.mode, args.workers = "cluster", len(args.devices)
            if all(d.startswith("cuda:") for d in args.devices):
                gpus = [int(d.split(":")[1]) for d in args.devices]  # each worker sees its GPU as cuda
            else:
                args.device = args.device or args.devices[0]
    device = resolve_device(args.device)
    vectors = open_vectors(args.vectors)
    xq = np.ascontiguousarray(open_vectors(args.queries)[:args.nq], dtype=np.float32) if args.queries else None
    params = {"nprobe": args.nprobe, "nshort": args.nshort}
    row = {"mode": args.mode, "n": int(vectors.shape[0]), "device": str(device),
           "database_float32_mb": vectors.shape[0] * vectors.shape[1] * 4 / 2**20}
    work = Path(args.work_dir)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    start = time.perf_counter()
    client = None
    if args.mode == "single":
        index = read_index(args.index, device=device)
        index.add(vectors)  # the whole database in memory as float32, as a plain add needs it
        row["build_s"] = time.perf_counter() - start
        search = index.search
    elif args.mode == "sharded":
        paths = build_shards(args.index, args.vectors, work, args.shard_size, device)
        row["encode_s"] = time.perf_counter() - start
        index = merge_shards(args.index, paths)
        row["build_s"] = time.perf_counter() - start
        search = index.search
    else:
        from .. import cluster

        client = (cluster._distributed().Client(args.scheduler) if args.scheduler
                  else cluster.local_client(args.workers, threads_per_worker=args.threads_per_worker, gpus=gpus))
        row["workers"] = len(client.scheduler_info()["workers"])
        row["threads_per_worker"] = args.threads_per_worker
        row["cluster_start_s"] = time.perf_counter() - start
        start = time.perf_counter()
        paths = cluster.build_shards(client, args.index, args.vectors, work, args.shard_size,
                                     device=None if args.device is None else str(device),
                                     resources={"GPU": 1} if gpus else None)
        row["encode_s"] = time.perf_counter() - start
        index = merge_shards(args.index, paths, work / "full.rqmoe", ondisk_path=work / "full.ivfdata")
        row["build_s"] = time.perf_counter() - start
        row["merged_ondisk_mb"] = (work / "full.ivfdata").stat().st_size / 2**20
        loaded = time.perf_counter()
        held = cluster.ClusterIndex(client, args.index, paths, device=args.device)
        row["search_load_s"] = time.perf_counter() - loaded
        search = held.search
    row["ntotal"] = int(index.ntotal)
    row["shard_size"] = args.shard_size if args.mode != "single" else None
    if xq is not None:
        row.update(nq=len(xq), k=args.k, **params)
        _search(search, xq, args.k, params, row)
    row["peak_rss_mb"] = _peak_rss_mb()  # this process: the whole run in single/sharded, the driver's part here
    if client is not None:
        row["worker_peak_rss_mb"] = sorted(client.run(_peak_rss_mb).values())
        if not args.scheduler:
            local = client.cluster
            client.close()
            local.close()
        else:
            client.close()
    row["wall_s"] = time.perf_counter() - start + row.get("cluster_start_s", 0)
    result = {"kind": "build", "meta": run_meta(args.argv, device), "rows": [row]}
    write_result(result, args.out)
    return result
