# sourced at the start of every device command
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 FAISS_RQMOE_CACHE=/tmp/rqmoe_cache
mkdir -p $FAISS_RQMOE_CACHE
# OpenCV's SIFT output depends on its SIMD dispatch; pin it below AVX-512 so every device build is the same
export OPENCV_CPU_DISABLE="AVX512F,AVX512-COMMON,AVX512-SKX,AVX512-KNL,AVX512-KNM,AVX512-CNL,AVX512-CLX,AVX512-ICL,AVX512BW,AVX512CD,AVX512DQ,AVX512VL"
# torch and faiss each bring an OpenMP runtime; busy-waiting threads of one starve the other
export OMP_WAIT_POLICY=PASSIVE
build_default() {  # the pinned default set, its split and ground truth; checks it is the recorded build
python3 - <<'PY' 2>&1 | grep -v -i -E "warning|OPENCV"
import hashlib, time, numpy as np
from faiss_rqmoe import datasets
t = time.time(); x = np.asarray(datasets.default_descriptors(progress=False))
sha = hashlib.sha256(x.tobytes()).hexdigest()
print("default set", x.shape, sha[:12], "(recorded build)" if sha.startswith("53e62d1ee375") else "NOT THE RECORDED BUILD", f"{time.time()-t:.0f}s")
t = time.time(); datasets.load_default(progress=False); print("split + ground truth", f"{time.time()-t:.0f}s")
PY
}
