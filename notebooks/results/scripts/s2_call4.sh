# CUDA tests on the GPU, then RQ-MoE at 16 bytes on the wallpaper split with beam encoding.
source .scratch/setup.sh
date -u
timeout 120 python3 -m pytest -q -p no:cacheprovider -k "gpu or cuda" tests/test_model.py tests/test_train.py > $OUT/pytest_gpu.log 2>&1
echo "pytest rc $?"; tail -4 $OUT/pytest_gpu.log
timeout ${LIMIT:-420} python3 -m faiss_rqmoe.bench codec --dataset .data/wallpaper_gpu_split.npz --bytes 16 \
   --methods rqmoe --time-budget-s ${B:-200} --epoch-size 100000 --train-candidates 32 --encode-candidates 16 --encode-beam 4 \
   --mem-budget-gib 8 --threads 8 --quiet --out $OUT/codec_wallpaper_16B_beam.json > $OUT/codec_wp16.log 2>&1
echo "bench rc $?"; grep -v "bench {" $OUT/codec_wp16.log | grep -v -i warn | tail -12; date -u
