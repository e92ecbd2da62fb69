"""Decode speed of the fourth session's two IVF codecs (QINCo-style with the centroid, hidden 256 and 128) on the
2-core machine, as quoted in the main README: N random codes in random lists (N = the first argument, default
10 000; a 2-core search at nprobe 16 / nshort 20 decodes ~130 000 a batch), decoded with their centroids.
Run from the repository root: OMP_WAIT_POLICY=PASSIVE python notebooks/results/scripts/s4_decode_cpu_speed.py [N]
"""
import sys
import time

import numpy as np
import torch

from faiss_rqmoe import io

torch.set_num_threads(2)
rng = np.random.default_rng(0)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
for bundle in (".data/bundle_qinco_b1024_s4", ".data/bundle_qinco_h128_s4"):
    index = io.read_index(f"{bundle}/index.rqmoe", device="cpu")
    codes = rng.integers(0, index.config.K, (n, index.config.M))
    lists = rng.integers(0, index.nlist, n)
    index._decode(codes[:100], lists[:100])  # warm-up
    for _ in range(3 if n <= 10_000 else 1):
        start = time.perf_counter()
        index._decode(codes, lists)
        print(f"{index.config.hidden=}: {len(codes) / (time.perf_counter() - start):.0f} vectors/s on 2 threads",
              flush=True)
