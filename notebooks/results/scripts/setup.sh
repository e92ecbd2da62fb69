# sourced at the start of every device command
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 FAISS_RQMOE_CACHE=/tmp/rqmoe_cache
mkdir -p $FAISS_RQMOE_CACHE
# OpenCV's SIFT output depends on its SIMD dispatch; pin it below AVX-512 so every device build is the same
export OPENCV_CPU_DISABLE="AVX512F,AVX512-COMMON,AVX512-SKX,AVX512-KNL,AVX512-KNM,AVX512-CNL,AVX512-CLX,AVX512-ICL,AVX512BW,AVX512CD,AVX512DQ,AVX512VL"
# torch and faiss each bring an OpenMP runtime; busy-waiting threads of one starve the other
export OMP_WAIT_POLICY=PASSIVE
