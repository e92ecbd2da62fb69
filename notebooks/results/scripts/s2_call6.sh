source .scratch/setup.sh
date -u
timeout 500 python3 -m faiss_rqmoe.bench codec --dataset .data/wallpaper_gpu_split.npz --bytes 16 \
   --methods qinco rq-sgd --time-budget-s 200 --epoch-size 100000 --train-candidates 32 --encode-candidates 16 --encode-beam 4 \
   --mem-budget-gib 8 --threads 8 --quiet --out $OUT/codec_wallpaper_16B_beam_others.json > $OUT/codec_wp16o.log 2>&1
echo "bench rc $?"; grep -v "bench {" $OUT/codec_wp16o.log | grep -v -i warn | tail -8; date -u
