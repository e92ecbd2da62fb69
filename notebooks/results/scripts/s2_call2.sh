# Issue 3 (second session): IVF1024 RQ-MoE 8x8 with beam encoding vs faiss IVF-PQ / IVF-RQ, GPU grid + bundle for the CPU grid.
source .scratch/setup.sh
date -u; build_default
B=${B:-180}
timeout ${LIMIT:-450} python3 -m faiss_rqmoe.bench search --dataset default --bytes 8 --nlist 1024 --time-budget-s $B --epoch-size 100000 \
   --train-candidates 32 --encode-candidates 16 --encode-beam 8 --mem-budget-gib 8 --threads 16 --quiet --search-queries 2000 \
   --nprobe 1 2 4 8 16 32 64 --nshort 10 20 50 100 \
   --save-bundle /tmp/bundle --out $OUT/search_default_8B_gpu_beam.json > $OUT/search_beam.log 2>&1
echo "bench rc $?"; grep -v "bench {" $OUT/search_beam.log | grep -v -i warn | tail -45
ls -la /tmp/bundle && mkdir -p $OUT/bundle && split -b 15000000 -d /tmp/bundle/index.rqmoe $OUT/bundle/index.rqmoe.part
cp /tmp/bundle/*.faissindex /tmp/bundle/bundle.json $OUT/bundle/ ; date -u
