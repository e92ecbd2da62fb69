# Session 3: the GPU grid of the bundle s3_call1.sh built (its own grid ran out of time), on the same warm machine.
source .scratch/setup.sh; ls /tmp/bundle || exit 3; timeout 560 python3 -m faiss_rqmoe.bench search --bundle /tmp/bundle --threads 16 --quiet --search-queries 2000 --nprobe 4 8 16 32 64 --nshort 10 20 50 --out $OUT/search_default_8B_gpu_centroid.json > $OUT/grid.log 2>&1
