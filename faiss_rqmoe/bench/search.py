"""``bench search``: IndexRQMoE against faiss IVF indexes at the same nlist and code size.

Our index runs an nprobe x nshort grid on the run's device (on CUDA the
whole search runs on the GPU; ``--cpu-points`` re-runs some points with the
same index on the CPU path). faiss IVF-PQ, IVF-RQ and IVF-PQ FastScan with
exact refinement run an nprobe grid on the CPU threads. Every row carries
nprobe, nshort, R@1, R@10 and queries a second.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, List

import faiss
import numpy as np
import torch

from . import baselines, datasets, evaluation
from ..devices import resolve_device
from ..factory import index_factory
from ..io import read_index, write_index
from .meta import dataset_meta, load_split, run_meta, write_result
from .options import train_config_from_args

logger = logging.getLogger("faiss_rqmoe.bench")
BASELINE_SUFFIX = ".faissindex"
K = 10


def qps_grid(search, xq, gt: np.ndarray, grid: List[dict]) -> List[dict]:
    """Recall and queries a second of search(xq, params) -> I (nq, >=10) at every grid point."""
    rows = []
    for params in grid:
        search(xq[:100], params)  # warm-up
        start = time.perf_counter()
        I = search(xq, params)
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
        result.update(dataset=bundle_meta["dataset"], built_on=bundle_meta["built_on"])
        result["train_s"] = bundle_meta["train_s"]
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
    mirror = index._code_mirror()
    result["mirror_bytes_per_vector"] = mirror.nbytes / max(1, mirror.ntotal)
    queries = torch.from_numpy(xq).to(device) if device.type == "cuda" else xq

    def ours(q, params):
        return index.search(q, K, params=params)[1]

    grid = [{"nprobe": p, "nshort": s} for p in args.nprobe for s in args.nshort]
    result["methods"]["IVF-RQ-MoE"] = {"config": index.config.to_dict(), "device": str(device), "mse": result.get("mse"),
                                       "bytes": index.code_size, "grid": qps_grid(ours, queries, gt, grid)}
    write_result(result, args.out)
    if args.cpu_points and device.type == "cuda":
        index.to("cpu")
        points = [dict(zip(("nprobe", "nshort"), map(int, p.split(":")))) for p in args.cpu_points]
        result["methods"]["IVF-RQ-MoE (CPU path)"] = {"config": index.config.to_dict(), "device": "cpu",
                                                      "bytes": index.code_size, "grid": qps_grid(ours, xq, gt, points)}
        write_result(result, args.out)
    for name, (ref, train_s, ref_mse) in refs.items():
        refine = isinstance(faiss.downcast_index(ref), faiss.IndexRefine)
        factors = args.refine_k_factors if refine else [1]

        def search(q, params, ref=ref):
            return ref.search(q, K, params=baselines.search_params(ref, params["nprobe"],
                                                                     params.get("k_factor", 1)))[1]

        points = [dict({"nprobe": p}, **({"k_factor": f} if refine else {})) for p in args.nprobe for f in factors]
        result["methods"][name] = {"train_s": train_s, "mse": ref_mse, "bytes": baselines.stored_bytes(ref),
                                   "device": "cpu",
                                   "grid": qps_grid(search, xq, gt, points)}
        write_result(result, args.out)
    return result
