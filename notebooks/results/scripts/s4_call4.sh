# Session 4, call 4: the QINCo-style codec with the centroid trained with s3_qinco_centroid.py's recipe (batch 1024,
# lr 1e-3), its database encoded with a beam of 32 x 32, searched at shortlists up to 400; faiss's IVF-RQ from the
# bundle of call 2 (carried as .data/faiss_ivfrq_s4).
source .scratch/setup.sh
date -u; nvidia-smi --query-gpu=name --format=csv,noheader
build_default
timeout 580 python3 notebooks/results/scripts/s4_grid.py .data/faiss_ivfrq_s4 $OUT/s4_qinco_centroid_b1024.json \
  --train IVF1024,RQMoE8x8_N4L2H256_qinco_centroid ${B:-340} --beam 32 32 2>&1 | grep -v -i warn | tee $OUT/s4_qinco_centroid_b1024.log
ls -la $OUT/bundle; split -b 15000000 -d $OUT/bundle/index.rqmoe $OUT/bundle/index.rqmoe.part && rm $OUT/bundle/index.rqmoe
date -u
