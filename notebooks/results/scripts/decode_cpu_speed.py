"""Decode speed of the search bundle's codec (N4L2H256, 8 steps) on the 2-core machine, as quoted in the
main README. Run from the repository root: OMP_WAIT_POLICY=PASSIVE python notebooks/results/scripts/decode_cpu_speed.py
"""
import time

import torch

from faiss_rqmoe import io

torch.set_num_threads(2)
model = io.read_index(".data/bundle_default8_beam/index.rqmoe", device="cpu").model
codes = torch.randint(0, model.config.K, (10_000, model.config.M), generator=torch.Generator().manual_seed(0))
model.decode(codes[:100])  # warm-up
for _ in range(3):
    start = time.perf_counter()
    model.decode(codes)
    print(f"decode: {len(codes) / (time.perf_counter() - start):.0f} vectors/s on 2 threads", flush=True)
