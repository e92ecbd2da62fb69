"""``python -m faiss_rqmoe demo``: train, fill, search and save an IVF RQ-MoE index on real SIFT data,
next to faiss IVF-RQ and IVF-PQ at the same code size."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

# (n_train, n_db, n_query, nlist, architecture, training seconds, encode candidates)
SIZES = {
    "quick": (10_000, 20_000, 500, 64, "N2L1H64", 20, 16),
    "full": (60_000, 200_000, 2_000, 512, "N2L1H128", 150, 16),
}


def _missing_dependency(exc: ImportError) -> int:
    print(f"error: {exc}\nThe demo needs the data extras: pip install -e \".[data]\"", file=sys.stderr)
    return 2


def demo(args) -> int:
    """Run the demo; returns a process exit code."""
    try:
        import faiss
        import torch

        import faiss_rqmoe
        from faiss_rqmoe import datasets, evaluation
    except ImportError as exc:
        return _missing_dependency(exc)

    n_train, n_db, n_query, nlist, arch, budget_s, candidates = SIZES["quick" if args.quick else "full"]
    if args.time_budget_s is not None:
        budget_s = args.time_budget_s
    try:
        ds = datasets.load_small(n_train=n_train, n_val=2_000, n_db=n_db, n_query=n_query)
    except ImportError as exc:
        return _missing_dependency(exc)
    d, n_bytes = ds.d, args.bytes
    description = f"IVF{nlist},RQMoE{n_bytes}x8_{arch}"
    print(f"data: {ds.name}: {len(ds.xt)} train, {len(ds.xb)} database, {len(ds.xq)} queries, d={d}")
    print(f"building faiss_rqmoe.index_factory({d}, {description!r}) with {budget_s:g} s of training")
    index = faiss_rqmoe.index_factory(d, description, device=args.device, time_budget_s=budget_s,
                                      max_epochs=1000, batch_size=512, encode_candidates=candidates)
    index.encode_candidates = candidates
    rows = []
    start = time.perf_counter()
    index.train(ds.xt, ds.xval)
    index.add(ds.xb)
    build_s = time.perf_counter() - start
    ground_truth = ds.gt
    nprobe = max(1, nlist // 16)
    index.nprobe, index.nshort = nprobe, 50
    start = time.perf_counter()
    _, I = index.search(ds.xq, 10)
    qps = len(ds.xq) / (time.perf_counter() - start)
    mse = evaluation.mse(ds.xb, index.reconstruct_n(0, index.ntotal))
    rows.append(("IVF-RQ-MoE", index.sa_code_size() - index.ivf.coarse_code_size(), mse, I, qps, build_s))

    for name, factory in ((f"IVF-RQ{n_bytes}x8", f"IVF{nlist},RQ{n_bytes}x8_Nqint8"),
                          (f"IVF-PQ{n_bytes}x8", f"IVF{nlist},PQ{n_bytes}x8")):
        ref = faiss.index_factory(d, factory)
        start = time.perf_counter()
        ref.train(ds.xt)
        ref.add(ds.xb)
        ref_build_s = time.perf_counter() - start
        faiss.extract_index_ivf(ref).nprobe = nprobe
        start = time.perf_counter()
        _, I = ref.search(ds.xq, 10)
        qps = len(ds.xq) / (time.perf_counter() - start)
        ivf = faiss.extract_index_ivf(ref)
        mse = evaluation.mse(ds.xb, ivf.reconstruct_n(0, ivf.ntotal) if isinstance(ivf, faiss.IndexIVFResidualQuantizer)
                             else ref.sa_decode(ref.sa_encode(ds.xb)))
        rows.append((name, ivf.code_size, mse, I, qps, ref_build_s))

    print(f"\nnprobe={nprobe}, k=10 (IVF-RQ-MoE re-ranks a shortlist of nshort={index.nshort}); "
          f"torch threads={torch.get_num_threads()}, device={index.device}")
    print(f"{'index':<16}{'bytes':>6}{'MSE':>11}{'R@1':>8}{'R@10':>8}{'queries/s':>11}{'build s':>9}")
    for name, code_bytes, mse, I, qps, seconds in rows:
        recall = evaluation.recall_at(I, ground_truth, ks=(1, 10))
        print(f"{name:<16}{code_bytes:>6}{mse:>11.5g}{recall['R@1']:>8.3f}{recall['R@10']:>8.3f}"
              f"{qps:>11.0f}{seconds:>9.1f}")

    out = Path(args.out)
    faiss_rqmoe.write_index(index, out)
    print(f"\nsaved to {out} ({out.stat().st_size / 1e6:.1f} MB). Load it with:\n"
          f"    import faiss_rqmoe\n    index = faiss_rqmoe.read_index({str(out)!r})\n"
          f"    D, I = index.search(xq, 10)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m faiss_rqmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train and search an IVF RQ-MoE index on the built-in SIFT set")
    p.add_argument("--quick", action="store_true", help="a sub-minute run on a smaller split")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--bytes", type=int, default=8, help="code bytes a vector (8-bit steps)")
    p.add_argument("--time-budget-s", type=float, default=None, help="training time budget")
    p.add_argument("--out", default="demo_index.rqmoe", help="where to save the index")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
