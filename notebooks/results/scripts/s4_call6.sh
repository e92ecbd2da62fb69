# Session 4, call 6: a decoder half as costly (hidden 128 instead of 256: half the expert FLOPs), so that the 2-core
# re-rank can afford longer shortlists. Same recipe as call 4 (batch 1024, lr 1e-3, database beam 32 x 32); faiss's
# IVF-RQ from the bundle of call 2 (carried as .data/faiss_ivfrq_s4). The first try (350 s, a 10 000-query grid) ran
# past the 10-minute cap and returned nothing (grep held its output back); this one trains 300 s, writes the index
# before searching and runs a small 2 000-query grid: the 2-core figures come from the bundle.
source .scratch/setup.sh
date -u; nvidia-smi --query-gpu=name --format=csv,noheader
build_default
timeout 580 python3 notebooks/results/scripts/s4_grid.py .data/faiss_ivfrq_s4 $OUT/s4_qinco_centroid_h128.json \
  --train IVF1024,RQMoE8x8_N4L2H128_qinco_centroid ${B:-350} --beam 32 32 --queries 2000 --nprobe 8 16 --nshort 20 50 \
  2>&1 | grep --line-buffered -v -i warn | tee $OUT/s4_qinco_centroid_h128.log
ls -la $OUT/bundle; split -b 15000000 -d $OUT/bundle/index.rqmoe $OUT/bundle/index.rqmoe.part && rm $OUT/bundle/index.rqmoe
date -u
