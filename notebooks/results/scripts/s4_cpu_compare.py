"""Session 4, issue 3: the 2-core comparison at equal speed, measured in one process with alternating runs so that
both sides see the same machine state. Our index (the bundle of s4_call6.sh, `IVF1024,RQMoE8x8_N4L2H128_qinco_centroid`)
at nprobe 16 with nshort 20 and 30, faiss IVF-RQ8x8_Nqint8 (same split, same nlist) at nprobe 32, 64 and 128; all
10 000 queries, 10 results, 2 threads each; two rounds (nprobe 128 once). Run on the 2-core machine from the
repository root: OMP_WAIT_POLICY=PASSIVE python notebooks/results/scripts/s4_cpu_compare.py .data/bundle_qinco_h128_s4
"""
import json
import sys
import time

import faiss
import numpy as np
import torch

from faiss_rqmoe import evaluation, io

torch.set_num_threads(2)
faiss.omp_set_num_threads(2)
bundle = sys.argv[1]
index = io.read_index(f"{bundle}/index.rqmoe", device="cpu")
ref = faiss.read_index(f"{bundle}/IVF-RQ8x8_Nqint8.faissindex")
xq, gt = np.load(f"{bundle}/xq.npy"), np.load(f"{bundle}/gt.npy")
points = [("IVF-RQ-MoE", {"nprobe": 16, "nshort": 20}), ("IVF-RQ-MoE", {"nprobe": 16, "nshort": 30}),
          ("faiss IVF-RQ8x8_Nqint8", {"nprobe": 32}), ("faiss IVF-RQ8x8_Nqint8", {"nprobe": 64})]


def search(name, params, queries):
    if name == "IVF-RQ-MoE":
        return index.search(queries, 10, params=params)[1]
    return ref.search(queries, 10, params=faiss.SearchParametersIVF(nprobe=params["nprobe"]))[1]


rows = []
for round_ in (1, 2):
    for name, params in points + ([("faiss IVF-RQ8x8_Nqint8", {"nprobe": 128})] if round_ == 1 else []):
        search(name, params, xq[:100])  # warm-up
        start = time.perf_counter()
        I = search(name, params, xq)
        row = dict(method=name, round=round_, **params, **evaluation.recall_at(I, gt, ks=(1, 10)),
                   qps=len(xq) / (time.perf_counter() - start))
        rows.append(row)
        print(row, flush=True)
out = {"command": "python notebooks/results/scripts/s4_cpu_compare.py " + bundle,
       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": 2, "rows": rows}
json.dump(out, open("notebooks/results/scripts/s4_cpu_compare.json", "w"), indent=1)
