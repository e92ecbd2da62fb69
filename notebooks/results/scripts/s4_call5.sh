# Session 4, call 5: the index of call 4 (bundle carried as .data/bundle_qinco_b1024_s4: index.rqmoe, faiss IVF-RQ,
# bundle.json) searched with all 10 000 queries, against faiss IVF-RQ at nprobe 8..128 on the same machine.
source .scratch/setup.sh
date -u; nvidia-smi --query-gpu=name --format=csv,noheader
build_default
timeout 500 python3 notebooks/results/scripts/s4_grid.py .data/bundle_qinco_b1024_s4 $OUT/s4_grid_qinco_b1024_10k.json --queries 10000 \
  --nprobe 8 16 32 64 --nshort 20 50 100 200 400 2>&1 | grep -v -i warn | tee $OUT/s4_grid_qinco_b1024_10k.log
date -u
