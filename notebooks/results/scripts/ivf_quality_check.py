"""Why does the IVF RQ-MoE index lose to faiss IVF-RQ? Both codecs of the GPU-built bundle on 10 000
vectors of the 2-core machine's own default set (statistically the same data): MSE and recall@1/10 of
exhaustive search over their reconstructions (2 000 queries, ground truth among those 10 000).
Run from the repository root: OMP_WAIT_POLICY=PASSIVE python notebooks/results/scripts/ivf_quality_check.py
"""
import numpy as np, faiss, time
from faiss_rqmoe import datasets, evaluation, io
ref = faiss.read_index(".data/bundle_default8/IVF-RQ8x8_Nqint8.faissindex")
idx = io.read_index(".data/bundle_default8/index.rqmoe", device="cpu")
idx.encode_candidates = 64
ds = datasets.load_default(progress=False)
x = ds.xb[:10000]; xq = ds.xq[:2000]
_, gt = evaluation.knn_search_exhaustive(x, xq, 1)
r_faiss = ref.sa_decode(ref.sa_encode(x))
t=time.time(); r_ours = idx.sa_decode(idx.sa_encode(x)); print("enc", time.time()-t)
for name, r in (("faiss", r_faiss), ("ours", r_ours)):
    _, I = evaluation.knn_search_exhaustive(r, xq, 10)
    print(name, evaluation.mse(x, r), evaluation.recall_at(I, gt, (1, 10)))
