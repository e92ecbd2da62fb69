# Session 4, call 3: longer shortlists and a wider database beam for the index of call 2 (its bundle, carried as
# .data/bundle_qinco_centroid_s4_carry: index.rqmoe, the faiss IVF-RQ index and bundle.json).
source .scratch/setup.sh
date -u; nvidia-smi --query-gpu=name --format=csv,noheader
build_default
timeout 540 python3 notebooks/results/scripts/s4_grid.py .data/bundle_qinco_centroid_s4_carry $OUT/s4_grid_qinco_centroid.json 32 32 2>&1 \
  | grep -v -i warn | tee $OUT/s4_grid_qinco_centroid.log
date -u
