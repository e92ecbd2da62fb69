"""Building and searching an IndexRQMoE on a Dask cluster: one host or many, CPU or GPU workers.

Needs Dask's distributed scheduler (``pip install "faiss_rqmoe[cluster]"``);
nothing else in faiss_rqmoe imports this module or Dask.

Build: ``build_shards`` sends one task a shard of an on-disk database
(.npy, .fvecs, .bvecs, read where every worker sees it, e.g. a shared file
system) to the cluster's workers; each writes its shard file whole (see
``shards.encode_shard``), so a killed worker loses only its shard in
progress, which Dask reruns elsewhere, and a build run again after its
driver died skips every finished shard. ``build_index`` then merges the
shards through ``shards.merge_shards`` into faiss's on-disk inverted lists:
no process holds the whole database.

Search: ``ClusterIndex`` holds the shards in long-lived workers (one Dask
actor a worker: a GPU or a host), fans every query batch out to them and
merges their answers as ``faiss.IndexShards`` does (``shards.merge_results``).

Command line (``python -m faiss_rqmoe.cluster build --help``): a build on a
running cluster (``--scheduler tcp://host:8786``) or on a local one.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from . import shards

logger = logging.getLogger(__name__)

EXTRA_HINT = 'faiss_rqmoe.cluster needs Dask\'s distributed scheduler: pip install "faiss_rqmoe[cluster]"'


def _distributed():
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(EXTRA_HINT) from exc
    return distributed


def local_client(n_workers: int = 2, threads_per_worker: int = 1, gpus: Optional[Sequence[int]] = None,
                 **cluster_options):
    """A Dask client of a new cluster of worker processes on this host (127.0.0.1, free ports).

    gpus: GPU numbers, one worker each that sees only its GPU
    (``CUDA_VISIBLE_DEVICES``, kept when a worker restarts) and offers the
    resource ``GPU=1``; n_workers is then ignored. Close it with
    ``client.close(); client.cluster.close()``. cluster_options go to
    ``distributed.LocalCluster`` (or ``SpecCluster`` with gpus).
    """
    distributed = _distributed()
    if gpus is None:
        options = dict(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                       host="127.0.0.1", dashboard_address="127.0.0.1:0")
        options.update(cluster_options)
        return distributed.Client(distributed.LocalCluster(**options))
    scheduler = {"cls": distributed.Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    workers = {f"gpu{gpu}": {"cls": distributed.Nanny,
                             "options": {"nthreads": threads_per_worker, "host": "127.0.0.1", "resources": {"GPU": 1},
                                         "env": {"CUDA_VISIBLE_DEVICES": str(gpu)}}}
               for gpu in gpus}
    return distributed.Client(distributed.SpecCluster(workers=workers, scheduler=scheduler, **cluster_options))


# ------------------------------------------------------------------- build
# A worker process keeps the last index it read: the shard tasks of one build
# share it instead of reading the file once a shard.
_WORKER_INDEX: dict = {}


def _worker_index(index_path: str, device):
    from .io import read_index

    key = (index_path, os.stat(index_path).st_mtime_ns, device)
    if _WORKER_INDEX.get("key") != key:
        _WORKER_INDEX.clear()
        index = read_index(index_path, device=device)
        index.train_config = index.train_config.replace(progress=False)
        _WORKER_INDEX.update(key=key, index=index)
    return _WORKER_INDEX["index"]


def encode_shard_task(index_path: str, vectors_path: str, start: int, end: int, out_dir: str, first_id: int,
                      device=None) -> str:
    """One shard of a build, run on a worker: encode rows start..end-1 unless their shard file exists.

    device: None picks the worker's GPU when it has one (a worker a GPU:
    each sees only its own), else its CPU. Returns the shard's path.
    """
    path = shards.shard_path(out_dir, start, end)
    if not path.exists():  # a task rerun after its worker died, or one finished by an earlier build
        index = _worker_index(index_path, device)
        shards.encode_shard(index, shards.open_vectors(vectors_path), start, end, Path(out_dir), first_id)
    return str(path)


def build_shards(client, index_path, vectors_path, out_dir, shard_size: int = 1_000_000, first_id: int = 0,
                 device=None, resources: Optional[dict] = None, _task=encode_shard_task) -> List[Path]:
    """Encode an on-disk database in shards on a Dask cluster's workers; resumable.

    client: a ``distributed.Client``; index_path: a trained index file
    (``write_index``); vectors_path: .npy/.fvecs/.bvecs; out_dir: where the
    shard files go. Every path must name the same file on every worker (a
    shared file system; absolute paths are sent). Finished shards are
    skipped. resources: Dask resources a shard task needs, e.g.
    ``{"GPU": 1}`` for workers started with ``--resources GPU=1``.
    Returns every shard's path, in row order; raises the first failed task's error.
    """
    distributed = _distributed()
    index_path, vectors_path, out_dir = (os.path.abspath(p) for p in (index_path, vectors_path, out_dir))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    ranges = shards.shard_ranges(shards.open_vectors(vectors_path).shape[0], shard_size)
    todo = [r for r in ranges if not shards.shard_path(out_dir, *r).exists()]
    logger.info("%d shards of %d rows: %d done, %d to encode on the cluster", len(ranges), shard_size,
                len(ranges) - len(todo), len(todo))
    futures = [client.submit(_task, index_path, vectors_path, start, end, out_dir, first_id, device, pure=False,
                             resources=resources)
               for start, end in todo]
    try:
        for future in distributed.as_completed(futures):
            future.result()
    finally:
        client.cancel(futures)
    return [shards.shard_path(out_dir, *r) for r in ranges]


def build_index(client, index_path, vectors_path, work_dir, out_path, shard_size: int = 1_000_000,
                first_id: int = 0, device=None, resources: Optional[dict] = None):
    """A full index from an on-disk database: ``build_shards`` on the cluster, then ``shards.merge_shards``
    here into faiss's on-disk inverted lists, ``out_path`` with ``.ivfdata`` for suffix, beside
    out_path. Returns the merged index (its codes stay on disk until searched)."""
    paths = build_shards(client, index_path, vectors_path, work_dir, shard_size, first_id, device, resources)
    return shards.merge_shards(index_path, paths, out_path, ondisk_path=Path(out_path).with_suffix(".ivfdata"))


# ------------------------------------------------------------------ search
class ShardServer:
    """A Dask actor: one worker's part of the database, an IndexRQMoE merged from its shard files."""

    def __init__(self, index_path: str, shard_paths: Sequence[str], device=None):
        from .devices import resolve_device

        self.index = shards.merge_shards(index_path, shard_paths)
        self.index.to(resolve_device(device))

    def search(self, xq: np.ndarray, k: int, params=None):
        return self.index.search(xq, k, params)

    def describe(self) -> dict:
        return {"d": self.index.d, "ntotal": self.index.ntotal, "metric_type": int(self.index.metric_type)}


def split_evenly(items: Sequence, parts: int) -> List[list]:
    """items cut into at most `parts` contiguous groups whose sizes differ by one at most (none empty)."""
    bounds = np.linspace(0, len(items), min(parts, len(items)) + 1).round().astype(int)
    return [list(items[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


class ClusterIndex:
    """Search of shards held by long-lived Dask workers, with faiss.IndexShards' answers.

    client: a ``distributed.Client``; index_path: the trained index the
    shards were encoded with; shard_paths: shard files (``build_shards``),
    spread in contiguous groups over ``workers`` (addresses; default every
    worker of the cluster), each group merged in memory on its worker (an
    actor); device: where each worker searches (None: its GPU if it has one).
    ``search(x, k, params)`` takes params as a dict (``{"nprobe": 16,
    "nshort": 200}``) and returns D, I (nq, k) as one index over all shards would,
    up to the shortlist: each shard keeps its own ``nshort`` best. A part is
    held by its worker only (a Dask actor): if that worker dies, searches
    raise; a new ClusterIndex places the parts on the workers left.
    """

    def __init__(self, client, index_path, shard_paths: Sequence, workers: Optional[Sequence[str]] = None,
                 device=None):
        _distributed()
        if not shard_paths:
            raise ValueError("ClusterIndex needs at least one shard file")
        workers = list(workers or client.scheduler_info()["workers"])
        if not workers:
            raise ValueError("the cluster has no workers")
        index_path = os.path.abspath(index_path)
        groups = split_evenly([os.path.abspath(p) for p in shard_paths], len(workers))
        futures = [client.submit(ShardServer, index_path, group, device, actor=True, workers=[worker],
                                 allow_other_workers=False)
                   for group, worker in zip(groups, workers)]
        self._futures = futures
        self._actors = [future.result() for future in futures]
        infos = [info.result() for info in [actor.describe() for actor in self._actors]]
        self.d = infos[0]["d"]
        self.metric_type = infos[0]["metric_type"]
        self.ntotal = sum(info["ntotal"] for info in infos)
        self.workers = workers[:len(groups)]

    def search(self, x, k: int, params=None):
        """D, I (nq, k) for queries x (nq, d) float32: every worker searches its part, merged as IndexShards."""
        xq = np.ascontiguousarray(x, dtype=np.float32)
        if xq.ndim != 2 or xq.shape[1] != self.d:
            raise ValueError(f"x has shape {xq.shape}, the index expects (n, {self.d})")
        pending = [actor.search(xq, k, params) for actor in self._actors]
        return shards.merge_results([answer.result() for answer in pending], k, self.metric_type)

    def close(self) -> None:
        """Release the workers' parts."""
        self._actors = []
        for future in self._futures:
            future.release()
        self._futures = []


# ---------------------------------------------------------------- commands
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m faiss_rqmoe.cluster", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="encode an on-disk database on a Dask cluster and merge one index")
    build.add_argument("--index", required=True, help="a trained index file (write_index)")
    build.add_argument("--vectors", required=True, help="the database: .npy, .fvecs or .bvecs")
    build.add_argument("--work-dir", required=True, help="shard files (a build run again resumes from them)")
    build.add_argument("--out", required=True, help="the merged index; its lists go to the same name .ivfdata")
    build.add_argument("--scheduler", default=None, help="a running cluster, e.g. tcp://head:8786 "
                       "(default: a local cluster of --workers processes)")
    build.add_argument("--workers", type=int, default=2, help="local workers (without --scheduler)")
    build.add_argument("--gpus", type=int, nargs="+", default=None, help="local workers on these GPUs, one each "
                       "(without --scheduler), e.g. --gpus 0 1")
    build.add_argument("--shard-size", type=int, default=1_000_000, help="rows a shard (default 1000000)")
    build.add_argument("--first-id", type=int, default=0, help="the id of the database's first row")
    build.add_argument("--gpus-per-task", type=float, default=0, help="GPU resources a shard task needs "
                       "(workers started with --resources GPU=1)")
    return parser


def main(argv=None) -> int:
    """``python -m faiss_rqmoe.cluster build ...``: prints the merged index's path and size as JSON."""
    from ._openmp import rerun_with_passive_openmp

    if argv is None:
        argv = sys.argv[1:]
        rerun_with_passive_openmp("faiss_rqmoe.cluster", argv)  # local workers inherit the policy
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    distributed = _distributed()
    client = (distributed.Client(args.scheduler) if args.scheduler
              else local_client(args.workers, threads_per_worker=1, gpus=args.gpus))
    try:
        gpus_per_task = args.gpus_per_task or (1 if args.gpus and not args.scheduler else 0)
        resources = {"GPU": gpus_per_task} if gpus_per_task else None
        index = build_index(client, args.index, args.vectors, args.work_dir, args.out, args.shard_size,
                            args.first_id, resources=resources)
        print(json.dumps({"out": args.out, "ntotal": index.ntotal, "workers": len(client.scheduler_info()["workers"])}))
    finally:
        cluster = None if args.scheduler else client.cluster
        client.close()
        if cluster is not None:
            cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
