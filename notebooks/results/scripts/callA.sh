# Issue 2 figures: default SIFT set, 8 bytes, static baselines (CPU) in parallel with the learned codecs (GPU).
source .scratch/setup.sh
B=${B:-120}; DS=${DS:-default}; EXTRA=${EXTRA:-}
AVX512="AVX512F,AVX512-COMMON,AVX512-SKX,AVX512-KNL,AVX512-KNM,AVX512-CNL,AVX512-CLX,AVX512-ICL,AVX512BW,AVX512CD,AVX512DQ,AVX512VL"
OPENCV_CPU_DISABLE=$AVX512 python3 - <<'PY' 2>&1 | grep -v -i warning
import hashlib, numpy as np, time
from faiss_rqmoe import datasets
t = time.time(); x = np.asarray(datasets.default_descriptors(progress=False))
sha = hashlib.sha256(x.tobytes()).hexdigest()
print("default set", x.shape, sha, "SAME AS LOCAL" if sha.startswith("43db432a65d5") else "DIFFERS FROM LOCAL", f"{time.time()-t:.0f}s")
t = time.time(); ds = datasets.load_default(progress=False); print("split+gt", f"{time.time()-t:.0f}s")
np.save("/tmp/xq.npy", ds.xq); np.save("/tmp/gt.npy", ds.gt)
PY
cp /tmp/xq.npy /tmp/gt.npy $OUT/ 2>/dev/null
python3 -m faiss_rqmoe.bench codec --dataset default --bytes 8 --methods pq opq rq1 rq32 --threads 10 --quiet \
   --out $OUT/codec_default_8B_static.json > $OUT/static.log 2>&1 &
STATIC=$!
python3 -m faiss_rqmoe.bench codec --dataset default --bytes 8 --methods rqmoe qinco rq-sgd --time-budget-s $B \
   --epoch-size 100000 --train-candidates 32 --encode-candidates 32 --mem-budget-gib 8 --threads 4 --quiet $EXTRA \
   --out $OUT/codec_default_8B_learned.json 2>&1 | grep -v -E "^\s*$" | tail -30
wait $STATIC; tail -12 $OUT/static.log
python3 -m faiss_rqmoe.bench report $OUT/codec_default_8B_static.json $OUT/codec_default_8B_learned.json --md $OUT/codec_default_8B.md
