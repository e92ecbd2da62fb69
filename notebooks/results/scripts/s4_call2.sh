# Session 4, call 2: the QINCo-style codec with the centroid, trained at batch 4096 / lr 2e-3 (3x the samples/s of
# batch 1024 in s4_train_speed), through `bench search`, with the threaded LUT stage; bundle kept for the 2-core run.
source .scratch/setup.sh
date -u; nvidia-smi --query-gpu=name --format=csv,noheader
build_default
B=${B:-345}
timeout ${LIMIT:-575} python3 -m faiss_rqmoe.bench search --dataset default --bytes 8 --nlist 1024 --time-budget-s $B --epoch-size 100000 \
   --batch-size 4096 --lr 2e-3 --train-candidates 32 --encode-candidates 16 --encode-beam 8 --mem-budget-gib 8 --threads 16 --quiet \
   --search-queries 2000 --nprobe 8 16 32 64 --nshort 20 50 --codec qinco --centroid --lr-patience 5 --stop-patience 12 \
   --save-bundle /tmp/bundle --out $OUT/search_default_8B_gpu_qinco_centroid.json > $OUT/search_qinco_centroid.log 2>&1
echo "bench rc $?"; grep -v "bench {" $OUT/search_qinco_centroid.log | grep -v -i warn | tail -30
python3 -c "
import json, os; r = json.load(open(os.environ['OUT'] + '/search_default_8B_gpu_qinco_centroid.json')); h = r['train_history']
print('val mse init', round(h['init_val_mse']), 'best', round(h['best_val_mse']), 'epochs', len(h['epoch']), 'stop', h['stop_reason'], 'db mse', round(r['mse']), 'add s', round(r['add_s']))
print('val curve', [round(v) for v in h['val_mse']][::3], [round(t) for t in h['time_s']][::3])
for name, m in r['methods'].items():
    for g in m['grid']: print(name, g)
"
ls -la /tmp/bundle && mkdir -p $OUT/bundle && split -b 15000000 -d /tmp/bundle/index.rqmoe $OUT/bundle/index.rqmoe.part
cp /tmp/bundle/*.faissindex /tmp/bundle/bundle.json $OUT/bundle/ ; date -u
