# Issue 2 (second session): CUDA tests, then RQ-MoE on the default set with a longer budget and beam encoding.
source .scratch/setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
build_default
timeout 150 python3 -m pytest -q -p no:cacheprovider -k "gpu or cuda" tests/test_model.py tests/test_train.py tests/test_torch_io.py > $OUT/pytest_gpu.log 2>&1
echo "pytest rc $?"; tail -4 $OUT/pytest_gpu.log
B=${B:-270}
timeout ${LIMIT:-470} python3 -m faiss_rqmoe.bench codec --dataset default --bytes 8 --methods rq1 rqmoe --time-budget-s $B \
   --epoch-size 100000 --train-candidates 32 --encode-candidates 16 --encode-beam 4 --mem-budget-gib 8 --threads 8 --quiet \
   --out $OUT/codec_default_8B_beam.json > $OUT/codec_beam.log 2>&1
echo "bench rc $?"; grep -v "bench {" $OUT/codec_beam.log | grep -v -i warn | tail -12; date -u
