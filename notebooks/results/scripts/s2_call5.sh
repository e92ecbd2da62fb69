# Same budget and beam-4 encoding for the other learned codecs: default set 8 bytes, then wallpaper 16 bytes.
source .scratch/setup.sh
date -u; build_default
timeout 500 python3 -m faiss_rqmoe.bench codec --dataset default --bytes 8 --methods qinco rq-sgd --time-budget-s 270 \
   --epoch-size 100000 --train-candidates 32 --encode-candidates 16 --encode-beam 4 --mem-budget-gib 8 --threads 8 --quiet \
   --out $OUT/codec_default_8B_beam_others.json > $OUT/codec_beam_others.log 2>&1
echo "bench rc $?"; grep -v "bench {" $OUT/codec_beam_others.log | grep -v -i warn | tail -8; date -u
