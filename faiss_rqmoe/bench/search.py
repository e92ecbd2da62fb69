"""``bench search``: IndexRQMoE against faiss IVF indexes at the same nlist and code size.

Our index runs an nprobe x nshort grid on the run's device (on CUDA the
whole search runs on the GPU; ``--cpu-points`` re-runs some points with the
same index on the CPU path; ``--gpu-scans`` repeats the grid with the fused
Triton scan and the torch gather). faiss IVF-PQ, IVF-RQ and IVF-PQ FastScan
with exact refinement run an nprobe grid on the CPU threads. Every row carries
nprobe, nshort, R@1, R@10 and queries a second; ``--latency`` adds the time
of one query searched alone, and every method records its bytes a vector.
``--dataset synthetic`` draws Gaussian clusters here (``synthetic_split``),
so a run needs no data files.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional

import faiss
import numpy as np
import torch

from . import baselines, datasets, evaluation
from .. import lutscan, scan_kernel
from ..devices import resolve_device
from ..factory import index_factory
from ..io import read_index, write_index
from .meta import dataset_meta, load_split, run_meta, write_result
from .options import train_config_from_args

logger = logging.getLogger("faiss_rqmoe.bench")
BASELINE_SUFFIX = ".faissindex"
K = 10


def _finish(result):
    """Wait for a CUDA result (a search returns before its last kernels end)."""
    if isinstance(result, torch.Tensor) and result.is_cuda:
        torch.cuda.synchronize(result.device)
    return result


def synthetic_split(n_train: int, n_db: int, n_query: int, n_val: Optional[int] = None, d: int = 128,
                    clusters: int = 1024, seed: int = 0) -> datasets.Dataset:
    """Gaussian clusters: centres drawn from N(0, 3² I), each vector a random centre plus N(0, I) noise,
    float32 (d columns), with exact ground truth (100 neighbours) by faiss; deterministic for a seed.
    n_val: validation vectors (default: a tenth of n_train, at most 10 000)."""
    n_val = min(10_000, max(1, n_train // 10)) if n_val is None else n_val
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32) * 3

    def draw(n):
        x = centres[rng.integers(0, clusters, n)]
        x += rng.standard_normal((n, d), dtype=np.float32)
        return x

    xt, xval, xb, xq = draw(n_train), draw(n_val), draw(n_db), draw(n_query)
    return datasets.Dataset(f"synthetic-{clusters}-clusters", xt, xval, xb, xq, datasets.ground_truth(xb, xq, k=100))


def latency(search, xq, params: dict, n: int) -> dict:
    """Milliseconds to answer one query searched alone (numpy in, numpy out, as a server would), over n
    queries after a warm-up: median and 90th percentile."""
    for q in xq[:min(20, n)]:
        search(q[None], params)
    times = []
    for q in xq[:n]:
        start = time.perf_counter()
        _finish(search(q[None], params))
        times.append(time.perf_counter() - start)
    return dict(params, n=len(times), median_ms=1e3 * float(np.median(times)),
                p90_ms=1e3 * float(np.percentile(times, 90)))


def profile_search(search, queries, params: dict, repeats: int = 3) -> dict:
    """Where one search(queries, params) spends its time (torch.profiler over ``repeats`` searches after a
    warm-up): the wall time of one, and each CUDA kernel's (on a GPU) or operator's (on a CPU) own time in one
    and its share of their sum, largest first. A diagnostic: it shows whether the scan, the decode or the
    launches between them bound a search."""
    from torch.profiler import ProfilerActivity, profile

    cuda = isinstance(queries, torch.Tensor) and queries.is_cuda
    _finish(search(queries, params))
    start = time.perf_counter()
    for _ in range(repeats):
        _finish(search(queries, params))
    wall_ms = (time.perf_counter() - start) / repeats * 1e3
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            _finish(search(queries, params))
    # own times: an operator's total would count the kernels it launched a second time
    own = [(e.key, (e.self_device_time_total if cuda else e.self_cpu_time_total) / repeats / 1e3)
           for e in prof.key_averages()]
    own = sorted(((name, ms) for name, ms in own if ms > 0), key=lambda item: -item[1])
    total_ms = max(sum(ms for _, ms in own), 1e-9)
    kernels = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    return dict(params, queries=len(queries), repeats=repeats, wall_ms=wall_ms, profiled_ms=total_ms,
                kernels_per_search=kernels / repeats if cuda else None,
                top=[{"name": name[:120], "ms": ms, "share": ms / total_ms} for name, ms in own[:15]])


def latency_stages(index, xq: np.ndarray, params: dict, n: int, host_top: int = 12) -> dict:
    """Where the time of one query searched alone goes on a GPU with search graphs (a diagnostic of the
    latency target), as medians over n queries:

    - numpy_ms: numpy in, numpy out (what ``latency`` times);
    - device_ms: the query already on the GPU and the results left there, until they are ready;
    - host_ms: the same search until it returns: the host's share (Python, copies and the replay queued);
    - replay_ms: the recorded search graph replayed alone, timed on the GPU by CUDA events: the device's share;

    and host_top: the host functions with the most own time over those n searches (cProfile, which slows
    the host: shares, not times)."""
    import cProfile
    import pstats

    device = index.model.device
    on_device = torch.from_numpy(xq[:n]).to(device)
    numpy_ms = latency(lambda q, p: index.search(q, K, params=p), xq, params, n)["median_ms"]
    host, total = [], []
    for i in range(n):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        index.search(on_device[i:i + 1], K, params=params)
        host.append(time.perf_counter() - start)
        torch.cuda.synchronize(device)
        total.append(time.perf_counter() - start)
    nshort = max(params["nshort"], K)
    scan_setting = tuple(sorted(scan_kernel.CONFIG.items()))  # (the graphs of the scan these searches ran)
    keys = [key for key in index._search_graphs.keys()
            if key[:2] == ("search", 1) and key[2:5] == (K, nshort, min(params["nprobe"], index.nlist))
            and key[-1] == scan_setting]
    replay_ms = index._search_graphs.replay_ms(keys[0]) if keys else None
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(n):
        index.search(on_device[i:i + 1], K, params=params)
    torch.cuda.synchronize(device)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, function) -> (calls, primitive, own s, cumulative s, _)
    own = sorted(stats.items(), key=lambda item: -item[1][2])[:host_top]
    total_own = sum(value[2] for value in stats.values())
    return dict(params, n=n, numpy_ms=numpy_ms, device_ms=1e3 * float(np.median(total)),
                host_ms=1e3 * float(np.median(host)), replay_ms=replay_ms, graphed=bool(keys),
                host_top=[{"function": f"{Path(file).name}:{line}:{name}", "calls_per_search": calls / n,
                           "share": own_s / total_own}
                          for (file, line, name), (calls, _, own_s, _, _) in own])


def memory_per_vector(index) -> dict:
    """Bytes a stored vector: faiss's lists (codes with the norm byte, int64 id) and the scan's store beside
    them (on the CPU the terms only, on a GPU the copy there), as the index holds them now."""
    n = max(1, index.ntotal)
    store = index._code_mirror()
    return {"faiss_lists": (index.ivf.code_size + 8) * index.ntotal / n, "scan_store": store.nbytes / n,
            "scan_store_device": str(store.device)}


def qps_grid(search, xq, gt: np.ndarray, grid: List[dict]) -> List[dict]:
    """Recall and queries a second of search(xq, params) -> I (nq, >=10) at every grid point."""
    rows = []
    for params in grid:
        # warm-up on the timed batch itself: a kernel compiled or tuned for its shapes is not timed
        _finish(search(xq, params))
        start = time.perf_counter()
        I = _finish(search(xq, params))
        elapsed = time.perf_counter() - start
        I = I.cpu().numpy() if isinstance(I, torch.Tensor) else I
        row = dict(params)
        row.update(evaluation.recall_at(I, gt, ks=(1, 10)))
        row["qps"] = len(gt) / elapsed
        rows.append(row)
        logger.info("%s", json.dumps(row))
    return rows


def build_faiss_baselines(args, ds: datasets.Dataset, n_bytes: int, nlist: int) -> Dict[str, tuple]:
    """faiss IVF indexes at our index's nlist and code size, trained and filled: name -> (index, train_s, mse)."""
    built = {}
    for name, description in baselines.ivf_baselines(ds.d, nlist, n_bytes, refine=not args.no_refine):
        logger.info("training faiss %s", description)
        ref = baselines.build_ivf_baseline(description, ds.d, metric=evaluation.faiss_metric(ds.metric))
        start = time.perf_counter()
        ref.train(ds.xt[:args.faiss_train_max])
        train_s = time.perf_counter() - start
        ref.add(ds.xb)
        built[name] = (ref, train_s, evaluation.mse(ds.xb, ref.reconstruct_n(0, ref.ntotal)))
    return built


def _description(args, n_bytes: int) -> str:
    if args.description:
        return args.description
    description = f"IVF{args.nlist},RQMoE{n_bytes}x8_N{args.n_experts}L{args.n_layers}H{args.hidden}"
    if args.instr_dim is not None:
        description += f"E{args.instr_dim}"
    if args.routing != "dense":
        description += f"_{args.routing}"
    if args.codec != "moe":
        description += f"_{args.codec}"
    return description + ("_centroid" if args.centroid else "")


def build_index(args, ds: datasets.Dataset, device: torch.device, result: dict):
    """Our index, trained on ds.xt (or from --pretrained) and filled with ds.xb; records what it did."""
    n_bytes = args.bytes[0]
    options = dict(device=device, encode_candidates=args.encode_candidates, encode_beam=args.encode_beam)
    if args.trained_index:
        if args.pretrained or args.description:
            raise ValueError("--trained-index names a trained index: leave out --pretrained and --description")
        index = read_index(args.trained_index, device=device)
        if index.ntotal:
            raise ValueError(f"{args.trained_index} holds {index.ntotal} vectors: give a trained, empty index "
                             "(faiss-rqmoe train writes one)")
        if index.d != ds.d:
            raise ValueError(f"{args.trained_index} has d={index.d}, the data set d={ds.d}")
        index.encode_candidates, index.encode_beam = args.encode_candidates, args.encode_beam
        description = f"file:{Path(args.trained_index).name}"
    elif args.pretrained:
        from ..pretrained_codecs import load

        training = train_config_from_args(args, device).to_dict(non_default_only=True)
        training.pop("device", None)
        index = load(args.pretrained, **options, **training)
        description = f"pretrained:{args.pretrained}"
    else:
        description = _description(args, n_bytes)
        index = index_factory(ds.d, description, evaluation.faiss_metric(ds.metric), train_config=train_config_from_args(args, device),
                              **options)
    index.set_execution(kernel=args.kernel, dtype=args.precision, mem_budget_bytes=args.mem_budget_gib << 30)
    if args.trained_index:
        result["train_s"] = None  # trained by another command
    else:
        start = time.perf_counter()
        index.train(ds.xt, ds.xval)
        result["train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    index.add(ds.xb)
    result["add_s"] = time.perf_counter() - start
    result["description"] = description
    result["encode"] = {"candidates": index.encode_candidates, "beam": index.encode_beam}
    result["train_history"] = None if index.train_history is None else index.train_history.to_dict()
    result["mse"] = evaluation.mse(ds.xb, index.reconstruct_n(0, index.ntotal))
    return index


def _save_bundle(path: Path, index, refs: Dict[str, tuple], ds: datasets.Dataset, meta: dict) -> None:
    """Everything a search benchmark needs without the data set: our index, faiss's, queries, truth."""
    path.mkdir(parents=True, exist_ok=True)
    write_index(index, path / "index.rqmoe")
    for name, (ref, _, _) in refs.items():
        faiss.write_index(ref, str(path / f"{name}{BASELINE_SUFFIX}"))
    np.save(path / "xq.npy", ds.xq)
    np.save(path / "gt.npy", ds.gt)
    meta = dict(meta, baselines={name: [train_s, mse] for name, (_, train_s, mse) in refs.items()})
    (path / "bundle.json").write_text(json.dumps(meta, indent=1))


def _load_bundle(path: Path, device: torch.device):
    meta = json.loads((path / "bundle.json").read_text())
    index = read_index(path / "index.rqmoe", device=device)
    refs = {name: (faiss.read_index(str(path / f"{name}{BASELINE_SUFFIX}")), *values)
            for name, values in meta["baselines"].items()}
    return index, refs, np.load(path / "xq.npy"), np.load(path / "gt.npy"), meta


def run_search(args) -> dict:
    """IndexRQMoE vs faiss IVF indexes over an nprobe x nshort grid; see the module docstring."""
    device = resolve_device(args.device)
    result = {"kind": "search", "meta": run_meta(args.argv, device), "methods": {}}
    if args.bundle:
        index, refs, xq, gt, bundle_meta = _load_bundle(Path(args.bundle), device)
        # a file keeps no execution settings
        index.set_execution(kernel=args.kernel, dtype=args.precision, mem_budget_bytes=args.mem_budget_gib << 30)
        result.update(dataset=bundle_meta["dataset"], built_on=bundle_meta["built_on"])
        result["train_s"] = bundle_meta["train_s"]
    else:
        if args.dataset == "synthetic":
            ds = synthetic_split(args.n_train or 200_000, args.n_db or 1_000_000, args.n_query or 10_000,
                                 clusters=args.clusters)
        else:
            ds = load_split(args)
        xq, gt = ds.xq, ds.gt
        result["dataset"] = dataset_meta(ds)
        index = build_index(args, ds, device, result)
        refs = build_faiss_baselines(args, ds, index.config.code_size, index.nlist) if not args.no_baselines else {}
        if args.save_bundle:
            _save_bundle(Path(args.save_bundle), index, refs, ds,
                         {"dataset": result["dataset"], "built_on": result["meta"], "train_s": result["train_s"]})
    if args.search_queries:
        xq, gt = xq[:args.search_queries], gt[:args.search_queries]
    result["n_search_queries"] = len(xq)
    memory = memory_per_vector(index)
    result["mirror_bytes_per_vector"] = memory["scan_store"]
    queries = torch.from_numpy(xq).to(device) if device.type == "cuda" else xq

    def ours(q, params):
        return index.search(q, K, params=params)[1]

    def points(specs):
        return [dict(zip(("nprobe", "nshort"), map(int, p.split(":")))) for p in specs]

    grid = [{"nprobe": p, "nshort": s} for p in args.nprobe for s in args.nshort]
    rows, latencies = [], []
    saved = scan_kernel.CONFIG["enabled"], lutscan.CONFIG["enabled"]
    if device.type == "cpu" and "compiled" in args.cpu_scans and not lutscan.built():
        raise SystemExit("--cpu-scans compiled: the compiled scan is not built in this install")
    try:  # each scan the run names: on CUDA the fused Triton scan or the torch gather; on the CPU the C scan or torch
        for scan_name in (args.gpu_scans if device.type == "cuda" else args.cpu_scans):
            scan_kernel.CONFIG["enabled"] = scan_name != "gather"
            lutscan.CONFIG["enabled"] = scan_name != "torch"
            stamp = {} if scan_name == "auto" else {"scan": scan_name}
            rows += [dict(row, **stamp) for row in qps_grid(ours, queries, gt, grid)]
            latencies += [dict(row, **stamp) for row in (latency(ours, xq, p, args.latency_queries)
                                                         for p in points(args.latency))]
            if device.type == "cuda" and index.execution.cuda_graphs:  # the same queries without search graphs
                execution = index.execution
                index.set_execution(cuda_graphs=False)
                latencies += [dict(row, cuda_graphs=False, **stamp) for row in (
                    latency(ours, xq, p, args.latency_queries) for p in points(args.latency))]
                index.execution = execution
            if args.profile and device.type == "cuda" and index.execution.cuda_graphs:
                result.setdefault("latency_stages", []).extend(
                    dict(latency_stages(index, xq, p, args.latency_queries), **stamp) for p in points(args.profile))
        if args.profile:
            # eager decodes: replaying a CUDA graph recorded before the profiler starts is not safe
            execution = index.execution
            index.set_execution(cuda_graphs=False)
            scan_kernel.CONFIG["enabled"], lutscan.CONFIG["enabled"] = saved
            result["profile"] = [dict(profile_search(ours, q, p), batch=name) for p in points(args.profile)
                                 for name, q in (("all queries", queries), ("one query", queries[:1]))]
            index.execution = execution
    finally:
        scan_kernel.CONFIG["enabled"], lutscan.CONFIG["enabled"] = saved
    result["methods"]["IVF-RQ-MoE"] = {"config": index.config.to_dict(), "device": str(device), "mse": result.get("mse"),
                                       "bytes": index.code_size, "memory_bytes_per_vector": memory,
                                       "grid": rows, "latency": latencies}
    write_result(result, args.out)
    if args.cpu_points and device.type == "cuda":
        index.to("cpu")
        cpu_points = points(args.cpu_points)
        result["methods"]["IVF-RQ-MoE (CPU path)"] = {"config": index.config.to_dict(), "device": "cpu",
                                                      "bytes": index.code_size,
                                                      "memory_bytes_per_vector": memory_per_vector(index),
                                                      "grid": qps_grid(ours, xq, gt, cpu_points)}
        write_result(result, args.out)
    for name, (ref, train_s, ref_mse) in refs.items():
        refine = isinstance(faiss.downcast_index(ref), faiss.IndexRefine)
        factors = args.refine_k_factors if refine else [1]

        def search(q, params, ref=ref):
            return ref.search(q, K, params=baselines.search_params(ref, params["nprobe"],
                                                                     params.get("k_factor", 1)))[1]

        ref_points = [dict({"nprobe": p}, **({"k_factor": f} if refine else {})) for p in args.nprobe for f in factors]
        ref_latency = [latency(search, xq, dict({"nprobe": p["nprobe"]}, **({"k_factor": 1} if refine else {})),
                               args.latency_queries) for p in points(args.latency)]
        result["methods"][name] = {"train_s": train_s, "mse": ref_mse, "bytes": baselines.stored_bytes(ref),
                                   "device": "cpu",
                                   "grid": qps_grid(search, xq, gt, ref_points), "latency": ref_latency}
        write_result(result, args.out)
    return result
