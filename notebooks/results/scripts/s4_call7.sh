# Session 4, call 7: the 2-core index of call 6 (half-cost decoder; bundle carried as .data/bundle_qinco_h128_s4:
# index.rqmoe, faiss IVF-RQ, bundle.json) searched on the GPU machine with all 10 000 queries.
source .scratch/setup.sh
date -u; nvidia-smi --query-gpu=name --format=csv,noheader
build_default
timeout 400 python3 notebooks/results/scripts/s4_grid.py .data/bundle_qinco_h128_s4 $OUT/s4_grid_qinco_h128_10k.json --queries 10000 \
  --nprobe 8 16 32 --nshort 20 50 200 2>&1 | grep --line-buffered -v -i warn | tee $OUT/s4_grid_qinco_h128_10k.log
date -u
