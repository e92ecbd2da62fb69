# Issue 3 on the GPU machine: search the bundle built in the earlier run (our index + faiss IVF baselines).
source .scratch/setup.sh
python3 - <<'PY' 2>&1 | grep -v -i -E "warning|OPENCV"
import hashlib, numpy as np
from faiss_rqmoe import datasets
x = np.asarray(datasets.default_descriptors(progress=False)); sha = hashlib.sha256(x.tobytes()).hexdigest()
print("default set sha", sha[:12]); assert sha.startswith("53e62d1ee375"), "not the data set the bundle was built on"
ds = datasets.load_default(progress=False)
np.save(".data/bundle_default8/xq.npy", ds.xq); np.save(".data/bundle_default8/gt.npy", ds.gt)
PY
timeout ${LIMIT:-330} python3 -m faiss_rqmoe.bench search --bundle .data/bundle_default8 --search-queries 2000 \
   --nprobe 1 2 4 8 16 32 64 --nshort 10 20 50 100 200 --threads 16 --out $OUT/search_default_8B_gpu.json > $OUT/searchE.log 2>&1
echo "bench rc $?"; grep -v "bench {" $OUT/searchE.log | grep -v -i warn | tail -60
