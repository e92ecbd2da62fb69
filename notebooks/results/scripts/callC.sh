# Issue 4: wallpaper set (reduced split that fits the transfer), learned codecs at $BYTES bytes on the GPU.
source .scratch/setup.sh
B=${B:-100}; BYTES=${BYTES:-8}
timeout ${LIMIT:-540} python3 -m faiss_rqmoe.bench codec --dataset .data/wallpaper_gpu_split.npz --bytes $BYTES \
   --methods rqmoe qinco rq-sgd --time-budget-s $B --epoch-size 100000 --train-candidates 32 --encode-candidates 64 \
   --mem-budget-gib 8 --threads 8 --quiet --out $OUT/codec_wallpaper_${BYTES}B_learned.json > $OUT/codec_${BYTES}B.log 2>&1
echo "bench rc $?"; grep -v "bench {" $OUT/codec_${BYTES}B.log | grep -v -i warn | tail -30
