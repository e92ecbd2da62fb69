"""Why does the IVF RQ-MoE index lose to faiss IVF-RQ, and what does beam encoding change?

Both codecs of the first GPU-built bundle (session 1: 120 s of training, .data/bundle_default8) on
10 000 vectors of the 2-core machine's own default set (statistically the same data): MSE and
recall@1/10 of exhaustive search over their reconstructions (2 000 queries, ground truth among those
10 000), for our codec encoded greedily (32 candidates a step) and with a beam of 4 (16 candidates).
Run from the repository root: OMP_WAIT_POLICY=PASSIVE python notebooks/results/scripts/ivf_quality_check.py
"""
import time

import faiss
import torch

from faiss_rqmoe import datasets, evaluation, io

torch.set_num_threads(2)
ref = faiss.read_index(".data/bundle_default8/IVF-RQ8x8_Nqint8.faissindex")
idx = io.read_index(".data/bundle_default8/index.rqmoe", device="cpu")
ds = datasets.load_default(progress=False)
x = ds.xb[:10000]; xq = ds.xq[:2000]
_, gt = evaluation.knn_search_exhaustive(x, xq, 1)
out = [("faiss", ref.sa_decode(ref.sa_encode(x)))]
for A, B in [(32, 1), (16, 4)]:
    idx.encode_candidates, idx.encode_beam = A, B
    t = time.time(); out.append((f"ours A{A} B{B}", idx.sa_decode(idx.sa_encode(x)))); print("enc", time.time() - t, flush=True)
for name, r in out:
    _, I = evaluation.knn_search_exhaustive(r, xq, 10)
    print(name, evaluation.mse(x, r), evaluation.recall_at(I, gt, (1, 10)), flush=True)
