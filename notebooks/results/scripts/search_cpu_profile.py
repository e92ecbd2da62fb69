"""Where a 2-core search of the centroid-conditioned index spends its time: the faiss lookup-table stage
(shortlist with codes) vs the neural decode of the shortlist, 1 000 queries.
Run from the repository root on the 2-core machine, with the third session's bundle in
.data/bundle_default8_centroid_long: OMP_WAIT_POLICY=PASSIVE python notebooks/results/scripts/search_cpu_profile.py
"""
import time

import faiss
import numpy as np
import torch

from faiss_rqmoe import io, lut

torch.set_num_threads(2)
faiss.omp_set_num_threads(2)
index = io.read_index(".data/bundle_default8_centroid_long/index.rqmoe", device="cpu")
xq = np.load(".data/bundle_default8_centroid_long/xq.npy")[:1000]
for nprobe, nshort in [(8, 50), (16, 20), (16, 10)]:
    start = time.perf_counter()
    ids, list_nos, raw = lut.search_shortlist(index.ivf, xq, nshort, nprobe)
    lut_s = time.perf_counter() - start
    codes = lut.unpack_bits(raw, index.config.M, index.config.nbits)
    start = time.perf_counter()
    index._decode_on_device(codes, list_nos)
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    index.search(xq, 10, params={"nprobe": nprobe, "nshort": nshort})
    total_s = time.perf_counter() - start
    print(f"nprobe {nprobe} nshort {nshort}: LUT stage {lut_s:.2f} s, decode {decode_s:.2f} s "
          f"({len(codes) / decode_s:.0f} vectors/s), whole search {total_s:.2f} s", flush=True)
