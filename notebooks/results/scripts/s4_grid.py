"""Session 4, issue 3: the search grid of an IVF index at longer shortlists, and the same index with its
database re-encoded with a wider beam. The index comes from a bundle directory (written by
`bench search --save-bundle`, carried without its queries) or, with --train DESCRIPTION BUDGET_S, is trained
here on the default split (batch 1024, lr 1e-3, plateau patience 5/12, 32 training candidates, database beam
8 x 16, as s3_qinco_centroid.py) and written to OUT_DIR/bundle. faiss's IVF-RQ comes from BUNDLE_DIR.
Queries, ground truth and database are the default split's; one row a grid point (10 results; 2 000 queries unless --queries).
Run on the GPU machine after `source .scratch/setup.sh`:
python3 notebooks/results/scripts/s4_grid.py BUNDLE_DIR OUT_JSON [--train DESCRIPTION BUDGET_S] [--beam B A]...
"""
import argparse
import json
import os
import sys
import time

import faiss
import torch

from faiss_rqmoe import datasets, evaluation, index_factory, io

torch.set_num_threads(16)
faiss.omp_set_num_threads(16)
torch.backends.cuda.matmul.allow_tf32 = True  # as bench does on CUDA unless --no-tf32
parser = argparse.ArgumentParser()
parser.add_argument("bundle")
parser.add_argument("out")
parser.add_argument("--train", nargs=2, metavar=("DESCRIPTION", "BUDGET_S"))
parser.add_argument("--beam", nargs=2, type=int, action="append", default=[], metavar=("B", "A"))
parser.add_argument("--queries", type=int, default=2000)
parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
parser.add_argument("--nshort", type=int, nargs="+", default=[50, 100, 200, 400])
args = parser.parse_args()
ds = datasets.load_default(progress=False)
xq, gt = ds.xq[:args.queries], ds.gt[:args.queries]
result = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(),
          "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": []}
if args.train:
    description, budget = args.train[0], float(args.train[1])
    index = index_factory(ds.d, description, time_budget_s=budget, max_epochs=1000, batch_size=1024, lr=1e-3,
                          device="cuda", seed=0, epoch_size=100_000, encode_candidates=16, encode_beam=8,
                          lr_patience=5, stop_patience=12, progress=False)
    index.train_options["encode_candidates"] = 32
    index.model.mem_budget_bytes = 8 << 30
    start = time.perf_counter()
    index.train(ds.xt, ds.xval)
    history = index.train_history.to_dict()
    result.update(description=description, train_s=time.perf_counter() - start, train_history=history)
    print(f"{description}: val mse {history['init_val_mse']:.0f} -> {history['best_val_mse']:.0f} "
          f"({history['stop_reason']}, {len(history['epoch'])} epochs)", flush=True)
    os.makedirs(os.path.dirname(args.out) + "/bundle", exist_ok=True)
    if not args.beam:
        index.add(ds.xb)
        io.write_index(index, os.path.dirname(args.out) + "/bundle/index.rqmoe")
else:
    result["bundle"] = json.load(open(f"{args.bundle}/bundle.json"))
    index = io.read_index(f"{args.bundle}/index.rqmoe", device="cuda")
    index.model.mem_budget_bytes = 8 << 30
ref = faiss.read_index(f"{args.bundle}/IVF-RQ8x8_Nqint8.faissindex")


def timed(search, params):
    search(xq[:100], params)  # warm-up
    start = time.perf_counter()
    I = search(xq, params)
    return dict(params, **evaluation.recall_at(I, gt, ks=(1, 10)), qps=len(xq) / (time.perf_counter() - start))


def grid(label):
    rows = []
    for nprobe in args.nprobe:
        for nshort in args.nshort:
            rows.append(timed(lambda q, p: index.search(q, 10, params=p)[1], {"nprobe": nprobe, "nshort": nshort}))
            print(label, rows[-1], flush=True)
    return rows


faiss_rows = [timed(lambda q, p: ref.search(q, 10, params=faiss.SearchParametersIVF(nprobe=p["nprobe"]))[1],
                    {"nprobe": nprobe}) for nprobe in (8, 16, 32, 64, 128)]
for row in faiss_rows:
    print("faiss IVF-RQ8x8_Nqint8", row, flush=True)
result["faiss_ivf_rq"] = faiss_rows
if index.ntotal:
    mse = evaluation.mse(ds.xb, index.reconstruct_n(0, index.ntotal))
    result["runs"].append({"encode_beam": index.encode_beam, "encode_candidates": index.encode_candidates,
                           "mse": mse, "grid": grid(f"beam {index.encode_beam}x{index.encode_candidates}")})
    print("db mse", round(mse), flush=True)
    json.dump(result, open(args.out, "w"), indent=1)
for beam, candidates in args.beam:
    index.reset()
    index.encode_beam, index.encode_candidates = beam, candidates
    start = time.perf_counter()
    index.add(ds.xb)
    add_s = time.perf_counter() - start
    mse = evaluation.mse(ds.xb, index.reconstruct_n(0, index.ntotal))
    print(f"beam {beam}x{candidates}: add {add_s:.0f} s, db mse {mse:.0f}", flush=True)
    if args.train:  # before the grid: the index is what a time-out must not lose
        io.write_index(index, os.path.dirname(args.out) + "/bundle/index.rqmoe")
    result["runs"].append({"encode_beam": beam, "encode_candidates": candidates, "add_s": add_s, "mse": mse,
                           "grid": grid(f"beam {beam}x{candidates}")})
    json.dump(result, open(args.out, "w"), indent=1)
