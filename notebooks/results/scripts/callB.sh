# Issue 3 figures: IVF1024 RQ-MoE 8 bytes vs faiss IVF-PQ / IVF-RQ on the default SIFT set (500k database), GPU.
source .scratch/setup.sh
B=${B:-120}
python3 -c "
import hashlib, numpy as np
from faiss_rqmoe import datasets
x = np.asarray(datasets.default_descriptors(progress=False)); print('default set sha', hashlib.sha256(x.tobytes()).hexdigest()[:12])
datasets.load_default(progress=False)" 2>&1 | grep -v -i -E "warning|OPENCV"
timeout 480 python3 -m faiss_rqmoe.bench search --dataset default --bytes 8 --nlist 1024 --time-budget-s $B --epoch-size 100000 \
   --train-candidates 32 --encode-candidates 64 --mem-budget-gib 8 --threads 16 --quiet \
   --nprobe 1 2 4 8 16 32 64 --nshort 10 20 50 100 200 \
   --save-bundle /tmp/bundle --out $OUT/search_default_8B_gpu.json > $OUT/searchB.log 2>&1
echo "bench rc $?"; grep -v "bench {" $OUT/searchB.log | grep -v -i warn | tail -50
ls -la /tmp/bundle
split -b 15000000 -d /tmp/bundle/index.rqmoe $OUT/index.rqmoe.part
cp /tmp/bundle/*.faissindex /tmp/bundle/bundle.json $OUT/
