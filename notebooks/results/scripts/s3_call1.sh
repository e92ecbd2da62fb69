# Session 3, issue 3: IVF1024 RQ-MoE 8x8 conditioned on the IVF centroid (DESIGN §3) vs faiss IVF-PQ / IVF-RQ.
# Same settings as s2_call2.sh (plain codec, 180 s) except --centroid, the budget and a smaller grid.
source .scratch/setup.sh
date -u; nvidia-smi --query-gpu=name --format=csv,noheader
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_context.py tests/test_model.py -k "gpu" 2>&1 | tail -3
build_default
B=${B:-210}
timeout ${LIMIT:-480} python3 -m faiss_rqmoe.bench search --dataset default --bytes 8 --nlist 1024 --time-budget-s $B --epoch-size 100000 \
   --train-candidates 32 --encode-candidates 16 --encode-beam 8 --mem-budget-gib 8 --threads 16 --quiet --search-queries 2000 \
   --nprobe 4 8 16 32 64 --nshort 10 20 50 --centroid \
   --save-bundle /tmp/bundle --out $OUT/search_default_8B_gpu_centroid.json > $OUT/search_centroid.log 2>&1
echo "bench rc $?"; grep -v "bench {" $OUT/search_centroid.log | grep -v -i warn | tail -30
python3 -c "
import json, os; r = json.load(open(os.environ['OUT'] + '/search_default_8B_gpu_centroid.json')); h = r['train_history']
print('val mse init', round(h['init_val_mse']), 'best', round(h['best_val_mse']), 'epochs', len(h['epoch']), 'stop', h['stop_reason'], 'db mse', round(r['mse']))
print('val curve', [round(v) for v in h['val_mse']], [round(t) for t in h['time_s']])
for name, m in r['methods'].items(): print(name, max((g['R@1'], g) for g in m['grid'])[1])
"
ls -la /tmp/bundle && mkdir -p $OUT/bundle && split -b 15000000 -d /tmp/bundle/index.rqmoe $OUT/bundle/index.rqmoe.part
cp /tmp/bundle/*.faissindex /tmp/bundle/bundle.json $OUT/bundle/ ; date -u
