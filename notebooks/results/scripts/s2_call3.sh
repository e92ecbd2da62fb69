# Issue 4 (second session): learned codecs on the wallpaper split at 8 bytes, longer budget, beam-4 encoding.
source .scratch/setup.sh
date -u
B=${B:-140}
timeout ${LIMIT:-520} python3 -m faiss_rqmoe.bench codec --dataset .data/wallpaper_gpu_split.npz --bytes 8 \
   --methods rqmoe qinco rq-sgd --time-budget-s $B --epoch-size 100000 --train-candidates 32 --encode-candidates 16 --encode-beam 4 \
   --mem-budget-gib 8 --threads 8 --quiet --out $OUT/codec_wallpaper_8B_beam.json > $OUT/codec_wp8.log 2>&1
echo "bench rc $?"; grep -v "bench {" $OUT/codec_wp8.log | grep -v -i warn | tail -30; date -u
