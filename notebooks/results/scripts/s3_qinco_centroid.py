"""Session 3, issue 3: how far does the IVF codec go when the QINCo-style mode (conditioned on the partial
reconstruction) also sees the centroid? Same split and training settings as s3_call4.sh (330 s, plateau,
patience 5/12, 32 training candidates, database beam 8 x 16), built through index_factory, searched at three
operating points of s3_call4's grid with 2 000 queries. Run on the GPU machine after `source .scratch/setup.sh`:
python3 notebooks/results/scripts/s3_qinco_centroid.py 330
"""
import json
import os
import sys
import time

import faiss
import torch

from faiss_rqmoe import datasets, evaluation, index_factory

torch.set_num_threads(16)
faiss.omp_set_num_threads(16)
torch.backends.cuda.matmul.allow_tf32 = True  # as bench does on CUDA unless --no-tf32
ds = datasets.load_default(progress=False)
description = "IVF1024,RQMoE8x8_N4L2H256_qinco_centroid"
index = index_factory(ds.d, description, time_budget_s=float(sys.argv[1]), max_epochs=1000, batch_size=1024,
                      lr=1e-3, device="cuda", seed=0, epoch_size=100_000, encode_candidates=16, encode_beam=8,
                      lr_patience=5, stop_patience=12, progress=False)
index.train_options["encode_candidates"] = 32
index.model.mem_budget_bytes = 8 << 30
start = time.perf_counter()
index.train(ds.xt, ds.xval)
result = {"description": description, "train_s": time.perf_counter() - start,
          "train_history": index.train_history.to_dict()}
index.add(ds.xb)
result["mse"] = evaluation.mse(ds.xb, index.reconstruct_n(0, index.ntotal))
xq, gt = ds.xq[:2000], ds.gt[:2000]
result["grid"] = []
for nprobe, nshort in [(16, 20), (16, 50), (64, 50)]:
    params = {"nprobe": nprobe, "nshort": nshort}
    index.search(xq[:100], 10, params=params)  # warm-up
    start = time.perf_counter()
    I = index.search(xq, 10, params=params)[1]
    row = dict(params, **evaluation.recall_at(I, gt, ks=(1, 10)), qps=len(xq) / (time.perf_counter() - start))
    result["grid"].append(row)
    print(row, flush=True)
history = result["train_history"]
print("val mse", round(history["init_val_mse"]), "->", round(history["best_val_mse"]), history["stop_reason"],
      "db mse", round(result["mse"]), flush=True)
json.dump(result, open(os.path.join(os.environ["OUT"], "search_default_8B_gpu_qinco_centroid.json"), "w"), indent=1)
