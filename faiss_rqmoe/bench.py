"""Benchmark CLI (DESIGN.md §4).

    python -m faiss_rqmoe.bench codec  --dataset default --bytes 8 --time-budget-s 600 --device cuda
    python -m faiss_rqmoe.bench search --dataset default --nlist 1024 --device cuda
    python -m faiss_rqmoe.bench report results/*.json --md table.md

``codec`` trains/fits every codec on the same split and measures MSE,
recall@1/10/100 of exhaustive search over the reconstructions, training
time, encode/decode vectors a second. ``search`` measures recall and
queries a second of IndexRQMoE over an nprobe × nshort grid against faiss
IVF baselines at the same code size. Every run writes JSON with the
command, data, device and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import faiss
import numpy as np
import torch

from . import datasets, evaluation
from ._openmp import rerun_with_passive_openmp
from .model import RQMoE, RQMoEConfig
from .train import resolve_device, train_rqmoe

logger = logging.getLogger("faiss_rqmoe.bench")

LEARNED = {"rqmoe": "instruction", "qinco": "reconstruction", "rq-sgd": "none"}
LEARNED_NAMES = {"rqmoe": "RQ-MoE", "qinco": "QINCo-style", "rq-sgd": "RQ (ours, trained)"}
DECODE_BATCHES = (1024, 100_000)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int = 1, warmup: bool = True):
    """Run fn once to warm up (unless warmup=False), then `repeats` times; returns (last result, seconds a run)."""
    if warmup:
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    _sync(device)
    return result, (time.perf_counter() - start) / repeats


def run_meta(args, device: torch.device) -> dict:
    """Who/what/where/when of a run, stored with its results."""
    return {
        "command": "python -m faiss_rqmoe.bench " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "versions": {"torch": torch.__version__, "faiss": faiss.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
    }


def load_split(args) -> datasets.Dataset:
    sizes = {k: v for k, v in (("n_train", args.n_train), ("n_db", args.n_db), ("n_query", args.n_query))
             if v is not None}
    return datasets.load_dataset(args.dataset, gt_path=args.gt, **sizes)


def dataset_meta(ds: datasets.Dataset) -> dict:
    return {"name": ds.name, "d": ds.d, "n_train": len(ds.xt), "n_val": len(ds.xval), "n_db": len(ds.xb),
            "n_query": len(ds.xq)}


def _quality(ds: datasets.Dataset, recon: np.ndarray) -> dict:
    """MSE on the database and recall of exhaustive search over its reconstructions."""
    _, I = evaluation.knn_search_exhaustive(recon, ds.xq, 100)
    row = {"mse": evaluation.mse(ds.xb, recon)}
    row.update(evaluation.recall_at(I, ds.gt, ks=(1, 10, 100)))
    return row


# ------------------------------------------------------------------ codec rows
def static_row(codec, ds: datasets.Dataset, train_max: Optional[int] = None) -> dict:
    """Train a static (faiss / data-oblivious) codec on (the first train_max of) ds.xt and measure it."""
    xt = ds.xt if train_max is None else ds.xt[:train_max]
    start = time.perf_counter()
    codec.train(xt)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    codes = codec.encode(ds.xb)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    recon = codec.decode(codes)
    decode_s = time.perf_counter() - start
    row = {"method": codec.name, "bytes": float(codec.bytes_per_vector), "train_s": train_s, "train_n": len(xt),
           "encode_vps": len(ds.xb) / encode_s, "decode_vps": len(ds.xb) / decode_s}
    row.update(_quality(ds, recon))
    if getattr(codec, "native_search", False):
        native = evaluation.recall_at(codec.search(ds.xb, ds.xq, 100), ds.gt, ks=(1, 10, 100))
        row.update({f"{key} (own search)": value for key, value in native.items()})
    return row


def mse_per_step(model: RQMoE, x: np.ndarray, codes: torch.Tensor) -> List[float]:
    """MSE of the partial reconstruction after each step: x (n, d), codes (n, M) -> M floats."""
    with torch.inference_mode():
        partial = torch.cumsum(model.decode_steps(codes), dim=1) * model.scale  # (n, M, d)
        err = torch.from_numpy(x).to(partial.device).unsqueeze(1) - partial
        return [float(v) for v in (err * err).sum(-1).mean(0).cpu()]


def learned_row(key: str, ds: datasets.Dataset, n_bytes: int, args, device: torch.device):
    """Train one of our learned codecs with the run's budget and measure it. Returns (row, extras)."""
    arch = dict(n_experts=args.n_experts, n_layers=args.n_layers, hidden=args.hidden)
    config = RQMoEConfig(ds.d, n_bytes, 8, condition=LEARNED[key], **arch)
    torch.manual_seed(args.seed)
    model = RQMoE(config, mem_budget_bytes=args.mem_budget_gib << 30)
    start = time.perf_counter()
    history = train_rqmoe(model, ds.xt, ds.xval, max_epochs=args.max_epochs, time_budget_s=args.time_budget_s,
                          batch_size=args.batch_size, lr=args.lr, device=device, seed=args.seed,
                          epoch_size=args.epoch_size, encode_candidates=args.train_candidates,
                          lr_patience=args.lr_patience, stop_patience=args.stop_patience,
                          lr_schedule=args.lr_schedule,
                          progress=not args.quiet)
    train_s = time.perf_counter() - start
    model.to(device)
    candidates, beam = args.encode_candidates, args.encode_beam
    model.encode(ds.xb[:4096], candidates, beam)  # warm-up
    codes, encode_s = _timed(lambda: model.encode(ds.xb, candidates, beam), device, warmup=False)
    recon = model.decode(codes)
    row = {"method": LEARNED_NAMES[key], "bytes": float(config.code_size), "train_s": train_s,
           "encode_vps": len(ds.xb) / encode_s, "encode_candidates": candidates, "encode_beam": beam,
           "config": config.to_dict(), "epochs": len(history.epoch), "stop_reason": history.stop_reason}
    for bs in DECODE_BATCHES:
        batch = codes[:bs]
        _, par_s = _timed(lambda: model.decode(batch), device, repeats=5)
        _, seq_s = _timed(lambda: model.decode_sequential(batch), device, repeats=5)
        row[f"decode_vps_bs{bs}"] = len(batch) / par_s
        row[f"decode_seq_vps_bs{bs}"] = len(batch) / seq_s
    row["decode_vps"] = row[f"decode_vps_bs{DECODE_BATCHES[-1]}"]
    if args.encode_candidates is not None and args.exact_sample > 0:
        sample = ds.xb[:args.exact_sample]
        exact = model.decode(model.encode(sample)).cpu().numpy()
        fast = recon[:args.exact_sample].cpu().numpy()
        row["mse_exact_encode_sample"] = evaluation.mse(sample, exact)
        row["mse_fast_encode_sample"] = evaluation.mse(sample, fast)
    if beam > 1 and args.exact_sample > 0:
        sample = ds.xb[:args.exact_sample]
        greedy_codes, greedy_s = _timed(lambda: model.encode(sample, candidates), device, warmup=False)
        row["mse_greedy_encode_sample"] = evaluation.mse(sample, model.decode(greedy_codes).cpu().numpy())
        row["mse_beam_encode_sample"] = evaluation.mse(sample, recon[:args.exact_sample].cpu().numpy())
        row["encode_greedy_vps"] = len(sample) / greedy_s
    row.update(_quality(ds, recon.cpu().numpy()))
    extras = {"history": history.to_dict(),
              "mse_per_step": mse_per_step(model, ds.xb[:20_000], codes[:20_000])}
    return row, extras


def run_codec(args) -> dict:
    """The codec table: every requested method at every requested code size."""
    from . import baselines

    device = resolve_device(args.device)
    ds = load_split(args)
    result = {"kind": "codec", "meta": run_meta(args, device), "dataset": dataset_meta(ds), "rows": [],
              "extras": {}}
    for n_bytes in args.bytes:
        static = {codec.key: codec for codec in baselines.make_baselines(ds.d, n_bytes)}
        for key in args.methods:
            if key in LEARNED:
                logger.info("%d bytes: training %s", n_bytes, LEARNED_NAMES[key])
                row, extras = learned_row(key, ds, n_bytes, args, device)
                result["extras"][f"{row['method']}@{n_bytes}"] = extras
            elif key in static:
                logger.info("%d bytes: %s", n_bytes, static[key].name)
                row = static_row(static[key], ds, args.static_train_max)
            else:
                continue  # e.g. RaBitQ exists only at 1 bit a dimension
            row["code_bytes"] = n_bytes
            result["rows"].append(row)
            logger.info("%s", json.dumps(row))
            _write(result, args.out)
    return result


# ------------------------------------------------------------------ search rows
def _qps_grid(search, xq: np.ndarray, gt: np.ndarray, grid) -> List[dict]:
    rows = []
    for params in grid:
        search(xq[:100], params)  # warm-up
        start = time.perf_counter()
        I = search(xq, params)
        elapsed = time.perf_counter() - start
        row = dict(params)
        row.update(evaluation.recall_at(I, gt, ks=(1, 10)))
        row["qps"] = len(xq) / elapsed
        rows.append(row)
        logger.info("%s", json.dumps(row))
    return rows


BASELINE_SUFFIX = ".faissindex"


def _faiss_ivf_baselines(args, ds: datasets.Dataset, n_bytes: int) -> Dict[str, tuple]:
    """faiss IVF-PQ and IVF-RQ at the same nlist and code size, trained and filled: name -> (index, train_s)."""
    baselines = {}
    for name, factory in ((f"IVF-PQ{n_bytes}x8", f"IVF{args.nlist},PQ{n_bytes}x8"),
                          (f"IVF-RQ{n_bytes}x8_Nqint8", f"IVF{args.nlist},RQ{n_bytes}x8_Nqint8")):
        logger.info("training faiss %s", factory)
        ref = faiss.index_factory(ds.d, factory)
        start = time.perf_counter()
        ref.train(ds.xt[:args.faiss_train_max])
        train_s = time.perf_counter() - start
        ref.add(ds.xb)
        baselines[name] = (ref, train_s)
    return baselines


def _load_bundle(path: Path, device: torch.device):
    """What ``--save-bundle`` wrote: (our index, baselines, xq, gt, meta)."""
    from . import io

    meta = json.loads((path / "bundle.json").read_text())
    index = io.read_index(path / "index.rqmoe", device=device)
    baselines = {name: (faiss.read_index(str(path / f"{name}{BASELINE_SUFFIX}")), train_s)
                 for name, train_s in meta["baselines"].items()}
    return index, baselines, np.load(path / "xq.npy"), np.load(path / "gt.npy"), meta


def _save_bundle(path: Path, index, baselines: Dict[str, tuple], ds: datasets.Dataset, meta: dict) -> None:
    """Everything a search benchmark needs without the data set: our index, faiss baselines, queries, truth."""
    from . import io

    path.mkdir(parents=True, exist_ok=True)
    io.write_index(index, path / "index.rqmoe")
    for name, (ref, _) in baselines.items():
        faiss.write_index(ref, str(path / f"{name}{BASELINE_SUFFIX}"))
    np.save(path / "xq.npy", ds.xq)
    np.save(path / "gt.npy", ds.gt)
    meta = dict(meta, baselines={name: train_s for name, (_, train_s) in baselines.items()})
    (path / "bundle.json").write_text(json.dumps(meta, indent=1))


def run_search(args) -> dict:
    """IndexRQMoE vs faiss IVF-PQ / IVF-RQ at the same nlist and code size, over an nprobe × nshort grid.

    With ``--bundle DIR`` the indexes, queries and ground truth come from a
    directory written by ``--save-bundle`` (e.g. built on a GPU machine and
    searched on a CPU one); otherwise everything is built from the data set.
    """
    from .factory import index_factory

    device = resolve_device(args.device)
    n_bytes = args.bytes[0]
    result = {"kind": "search", "meta": run_meta(args, device), "methods": {}}
    if args.bundle:
        index, baselines, xq, gt, bundle_meta = _load_bundle(Path(args.bundle), device)
        result["dataset"] = bundle_meta["dataset"]
        result["built_on"] = bundle_meta["built_on"]
        train_s = bundle_meta["train_s"]
    else:
        ds = load_split(args)
        xq, gt = ds.xq, ds.gt
        result["dataset"] = dataset_meta(ds)
        description = f"IVF{args.nlist},RQMoE{n_bytes}x8_N{args.n_experts}L{args.n_layers}H{args.hidden}"
        if args.codec != "moe":
            description += f"_{args.codec}"
        if args.centroid:
            description += "_centroid"
        index = index_factory(ds.d, description, max_epochs=args.max_epochs, time_budget_s=args.time_budget_s,
                              batch_size=args.batch_size, lr=args.lr, device=device, seed=args.seed,
                              epoch_size=args.epoch_size, encode_candidates=args.encode_candidates,
                              encode_beam=args.encode_beam, lr_patience=args.lr_patience,
                              stop_patience=args.stop_patience, lr_schedule=args.lr_schedule,
                              train_encode_candidates=args.train_candidates, progress=not args.quiet)
        index.model.mem_budget_bytes = args.mem_budget_gib << 30
        start = time.perf_counter()
        index.train(ds.xt, ds.xval)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        index.add(ds.xb)
        result["add_s"] = time.perf_counter() - start
        result["description"] = description
        result["encode_candidates"], result["encode_beam"] = index.encode_candidates, index.encode_beam
        result["train_history"] = index.train_history.to_dict()
        result["mse"] = evaluation.mse(ds.xb, index.reconstruct_n(0, index.ntotal))
        baselines = _faiss_ivf_baselines(args, ds, n_bytes)
        if args.save_bundle:
            _save_bundle(Path(args.save_bundle), index, baselines, ds,
                         {"dataset": result["dataset"], "built_on": result["meta"], "train_s": train_s})

    if args.search_queries:
        xq, gt = xq[:args.search_queries], gt[:args.search_queries]
    result["n_search_queries"] = len(xq)

    def ours(queries, params):
        return index.search(queries, 10, params=params)[1]

    grid = [{"nprobe": p, "nshort": s} for p in args.nprobe for s in args.nshort]
    result["methods"]["IVF-RQ-MoE"] = {"train_s": train_s, "config": index.config.to_dict(),
                                       "bytes": index.sa_code_size() - index.ivf.coarse_code_size(),
                                       "grid": _qps_grid(ours, xq, gt, grid)}
    _write(result, args.out)
    for name, (ref, ref_train_s) in baselines.items():
        def search(queries, params, ref=ref):
            return ref.search(queries, 10, params=faiss.SearchParametersIVF(nprobe=params["nprobe"]))[1]

        result["methods"][name] = {"train_s": ref_train_s, "bytes": faiss.extract_index_ivf(ref).code_size,
                                   "grid": _qps_grid(search, xq, gt, [{"nprobe": p} for p in args.nprobe])}
        _write(result, args.out)
    return result


# ----------------------------------------------------------------- reporting
def _write(result: dict, out: Optional[str]):
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))


def codec_table(results: List[dict]) -> str:
    """Markdown table of codec rows from one or more codec result files."""
    rows = sorted((row for r in results if r["kind"] == "codec" for row in r["rows"]),
                  key=lambda row: (row["code_bytes"], -row["mse"]))
    with_device = any("device" in row for row in rows)
    lines = ["| bytes | method | MSE | R@1 | R@10 | R@100 | train s | encode vec/s | decode vec/s |"
             + (" measured on |" if with_device else ""),
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if with_device else "")]
    for row in rows:
        lines.append(f"| {row['bytes']:g} | {row['method']} | {row['mse']:.5g} | {row['R@1']:.4f} | "
                     f"{row['R@10']:.4f} | {row['R@100']:.4f} | {row['train_s']:.1f} | "
                     f"{row['encode_vps']:.3g} | {row['decode_vps']:.3g} |"
                     + (f" {row.get('device', '')} |" if with_device else ""))
    return "\n".join(lines)


def search_table(result: dict) -> str:
    """Markdown table of a search result: best R@1 a method reaches, and its queries/s."""
    lines = ["| method | bytes | params | R@1 | R@10 | queries/s |", "|---|---:|---|---:|---:|---:|"]
    for name, method in result["methods"].items():
        for row in method["grid"]:
            params = ", ".join(f"{k}={row[k]}" for k in ("nprobe", "nshort") if k in row)
            lines.append(f"| {name} | {method['bytes']} | {params} | {row['R@1']:.4f} | {row['R@10']:.4f} | "
                         f"{row['qps']:.0f} |")
    return "\n".join(lines)


def merge_codec_results(results: List[dict]) -> dict:
    """One codec result from several runs on the same split (e.g. static codecs on a CPU, learned ones
    on a GPU): rows and extras concatenated, each row stamped with the device it was measured on.
    A method measured in several files at the same code size keeps the row of the last file."""
    if not results or any(r["kind"] != "codec" for r in results):
        raise ValueError("merge takes one or more codec result files")
    datasets_seen = {json.dumps(r["dataset"], sort_keys=True) for r in results}
    if len(datasets_seen) != 1:
        raise ValueError(f"cannot merge results measured on different splits: {sorted(datasets_seen)}")
    rows = {}
    merged = {"kind": "codec", "meta": [r["meta"] for r in results], "dataset": results[0]["dataset"],
              "extras": {}}
    for r in results:
        metas = r["meta"] if isinstance(r["meta"], list) else [r["meta"]]
        for row in r["rows"]:
            rows.pop((row["method"], row["code_bytes"]), None)  # the later measurement goes last
            rows[(row["method"], row["code_bytes"])] = dict(row, device=row.get("device", metas[0]["device"]))
        merged["extras"].update(r["extras"])
    merged["rows"] = list(rows.values())
    return merged


def run_merge(args) -> None:
    merged = merge_codec_results([json.loads(Path(p).read_text()) for p in args.files])
    _write(merged, args.out)


def run_plot(args) -> None:
    from . import plots

    for path in plots.plot_all(args.files, args.out_dir):
        print(path)


def run_report(args) -> str:
    results = [json.loads(Path(p).read_text()) for p in args.files]
    parts = []
    if any(r["kind"] == "codec" for r in results):
        parts.append(codec_table(results))
    parts.extend(search_table(r) for r in results if r["kind"] == "search")
    text = "\n\n".join(parts)
    if args.md:
        Path(args.md).write_text(text + "\n")
    print(text)
    return text


# ----------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m faiss_rqmoe.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("codec", "search"):
        p = sub.add_parser(name)
        p.add_argument("--dataset", default="default",
                       help="default | small | wallpaper | a split written by datasets.export_split (.npz) | "
                            "path to .npy/.fvecs/.bvecs")
        p.add_argument("--gt", default=None, help="ground-truth .ivecs/.npy for a dataset given as a file")
        p.add_argument("--n-train", type=int, default=None)
        p.add_argument("--n-db", type=int, default=None)
        p.add_argument("--n-query", type=int, default=None)
        p.add_argument("--bytes", type=int, nargs="+", default=[8], help="code sizes (M steps of 8 bits)")
        p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
        p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and faiss")
        p.add_argument("--time-budget-s", type=float, default=600.0, help="training budget of each learned codec")
        p.add_argument("--max-epochs", type=int, default=1000)
        p.add_argument("--epoch-size", type=int, default=None, help="vectors an epoch (default: all)")
        p.add_argument("--batch-size", type=int, default=1024)
        p.add_argument("--lr", type=float, default=1e-3)
        p.add_argument("--lr-patience", type=int, default=3, help="validations without gain before lr / 10")
        p.add_argument("--stop-patience", type=int, default=8, help="validations without gain before stopping")
        p.add_argument("--lr-schedule", choices=["plateau", "cosine"], default="plateau",
                       help="plateau: lr / 10 on a validation plateau; cosine: half cosine to 0 over the budget")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--n-experts", type=int, default=4)
        p.add_argument("--n-layers", type=int, default=2)
        p.add_argument("--hidden", type=int, default=256)
        p.add_argument("--train-candidates", type=int, default=None,
                       help="candidate pre-selection while training (default: exact)")
        p.add_argument("--encode-candidates", type=int, default=None,
                       help="candidate pre-selection when encoding the database (default: exact)")
        p.add_argument("--encode-beam", type=int, default=1,
                       help="beam size when encoding the database (1: greedy; training always encodes greedily)")
        p.add_argument("--mem-budget-gib", type=int, default=1)
        p.add_argument("--no-tf32", action="store_true", help="keep full float32 matmuls on CUDA")
        p.add_argument("--out", default=None, help="JSON output path")
        p.add_argument("--quiet", action="store_true")
    codec = sub.choices["codec"]
    codec.add_argument("--methods", nargs="+",
                       default=["pq", "opq", "rq1", "rq32", "lsq", "rabitq", "turboquant", "rqmoe", "qinco", "rq-sgd"])
    codec.add_argument("--static-train-max", type=int, default=None,
                       help="train static codecs on the first N training vectors only (LSQ is slow)")
    codec.add_argument("--exact-sample", type=int, default=10_000,
                       help="with --encode-candidates, also measure exact encoding on this many vectors")
    search = sub.choices["search"]
    search.add_argument("--nlist", type=int, default=1024)
    search.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    search.add_argument("--nshort", type=int, nargs="+", default=[10, 20, 50, 100, 200])
    search.add_argument("--codec", choices=["moe", "qinco", "rq"], default="moe",
                        help="condition mode of the codec: RQ-MoE, QINCo-style (partial reconstruction) or plain RQ")
    search.add_argument("--centroid", action="store_true",
                        help="condition the codec on each vector's IVF centroid (the _centroid option)")
    search.add_argument("--faiss-train-max", type=int, default=500_000)
    search.add_argument("--save-bundle", default=None,
                        help="directory to write our index, the faiss baselines, queries and ground truth to")
    search.add_argument("--search-queries", type=int, default=None, help="time only the first N queries")
    search.add_argument("--bundle", default=None, help="search the indexes of a --save-bundle directory instead")
    merge = sub.add_parser("merge", help="combine codec results measured on the same split")
    merge.add_argument("files", nargs="+")
    merge.add_argument("--out", required=True)
    plot = sub.add_parser("plot", help="PNG figures of result files")
    plot.add_argument("files", nargs="+")
    plot.add_argument("--out-dir", default="notebooks/results")
    report = sub.add_parser("report")
    report.add_argument("files", nargs="+")
    report.add_argument("--md", default=None)
    return parser


def main(argv=None) -> int:
    if argv is None:
        rerun_with_passive_openmp("faiss_rqmoe.bench", sys.argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command in ("report", "merge", "plot"):
        {"report": run_report, "merge": run_merge, "plot": run_plot}[args.command](args)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32  # an application-level choice, recorded in meta
    result = run_codec(args) if args.command == "codec" else run_search(args)
    if args.command == "codec":
        print(codec_table([result]))
    else:
        print(search_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
