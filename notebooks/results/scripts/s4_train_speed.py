"""Session 4, issue 3: what sets the training speed of the IVF codec on the GPU, and does a larger batch
learn faster per second? Trains the centroid-conditioned RQ-MoE and QINCo-style codecs on the residuals of
the default set's IVF1024 split (as index.train does), each variant for the same wall time from the same RQ
start, and prints samples/s, the validation curve and a torch profile of a few steps.
Run on the GPU machine after `source .scratch/setup.sh`: python3 notebooks/results/scripts/s4_train_speed.py 75
"""
import copy
import json
import os
import sys
import time

import faiss
import numpy as np
import torch

from faiss_rqmoe import datasets
from faiss_rqmoe.model import RQMoE, RQMoEConfig
from faiss_rqmoe.train import init_from_data, train_rqmoe

torch.set_num_threads(16)
faiss.omp_set_num_threads(16)
torch.backends.cuda.matmul.allow_tf32 = True
budget = float(sys.argv[1])
device = torch.device(os.environ.get("DEVICE", "cuda"))
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
ds = datasets.load_default(progress=False)
kmeans = faiss.Kmeans(ds.d, 1024, niter=20, seed=1234, max_points_per_centroid=256)
kmeans.train(ds.xt)
centroids = kmeans.centroids
lists = kmeans.index.search(ds.xt, 1)[1][:, 0]
val_lists = kmeans.index.search(ds.xval, 1)[1][:, 0]
xt, ctx = ds.xt - centroids[lists], centroids[lists]
xval, ctx_val = ds.xval - centroids[val_lists], centroids[val_lists]
n_val = int(os.environ.get("N_VAL", len(xval)))  # a smaller validation set for a CPU dry run
xval, ctx_val = xval[:n_val], ctx_val[:n_val]

starts = {}
for condition in ("instruction", "reconstruction"):
    model = RQMoE(RQMoEConfig(d=128, M=8, condition=condition, ctx_dim=128), mem_budget_bytes=8 << 30)
    init_from_data(model, xt)
    starts[condition] = model.state_dict()

results = []
variants = [("instruction", 1024, 1e-3, 32), ("instruction", 4096, 2e-3, 32), ("instruction", 1024, 1e-3, 8),
            ("reconstruction", 1024, 1e-3, 32), ("reconstruction", 4096, 2e-3, 32)]
for condition, batch, lr, candidates in variants:
    model = RQMoE(RQMoEConfig(d=128, M=8, condition=condition, ctx_dim=128), mem_budget_bytes=8 << 30)
    model.load_state_dict(copy.deepcopy(starts[condition]))
    history = train_rqmoe(model, xt, xval, ctx=ctx, ctx_val=ctx_val, time_budget_s=budget, max_epochs=1000,
                          batch_size=batch, lr=lr, device=device, epoch_size=100_000, encode_candidates=candidates,
                          lr_patience=5, stop_patience=12, progress=False)
    h = history.to_dict()
    row = {"condition": condition, "batch": batch, "lr": lr, "train_candidates": candidates,
           "epochs": len(h["epoch"]), "samples_per_s": len(h["epoch"]) * 100_000 / h["time_s"][-1],
           "best_val_mse": h["best_val_mse"], "val_mse": h["val_mse"], "time_s": h["time_s"]}
    results.append(row)
    print({k: (round(v) if isinstance(v, float) and v > 1 else v) for k, v in row.items() if k not in ("val_mse", "time_s")},
          [round(v) for v in h["val_mse"][::5]], flush=True)

# where a training step spends its time (RQ-MoE, batch 1024, 32 candidates)
model = RQMoE(RQMoEConfig(d=128, M=8, condition="instruction", ctx_dim=128), mem_budget_bytes=8 << 30).to(device)
model.load_state_dict(starts["instruction"])
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
xs = torch.from_numpy(xt[:1024]).to(device) / model.scale
cs = model.normalize_ctx(torch.from_numpy(ctx[:1024]).to(device))


def step():
    with torch.no_grad():
        codes = model.encode_scaled(xs, 32, ctx=cs)
    loss = ((xs - model(codes, cs)) ** 2).sum(1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


for _ in range(5):
    step()
sync()
start = time.perf_counter()
for _ in range(20):
    step()
sync()
print("step ms", (time.perf_counter() - start) / 20 * 1e3)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
    for _ in range(5):
        step()
    sync()
print(prof.key_averages().table(sort_by="cuda_time_total" if device.type == "cuda" else "self_cpu_time_total", row_limit=15))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))
json.dump(results, open(os.path.join(os.environ["OUT"], "s4_train_speed.json"), "w"), indent=1)
