# Issue 4: wallpaper split, 8 bytes, the three learned codecs with a longer plateau patience (6 / 16 validations).
source .scratch/setup.sh
date -u
timeout 540 python3 -m faiss_rqmoe.bench codec --dataset .data/wallpaper_gpu_split.npz --bytes 8 \
   --methods rqmoe qinco rq-sgd --time-budget-s 140 --epoch-size 100000 --train-candidates 32 --encode-candidates 16 --encode-beam 4 \
   --lr-patience 6 --stop-patience 16 --mem-budget-gib 8 --threads 8 --quiet --out $OUT/codec_wallpaper_8B_beam_patience.json > $OUT/codec_wp8p.log 2>&1
echo "bench rc $?"; grep -v "bench {" $OUT/codec_wp8p.log | grep -v -i warn | tail -20; date -u
