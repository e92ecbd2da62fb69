# Fifth session, second GPU machine (H100): two RQ-MoE variants, then RQ-MoE and QINCo-style with 600 s.
# The split went over in four calls as in s5_hold1.sh. Code: commit 7527e38 (which had --instr-init;
# removed again in the next commit because it did not win).
cat .data/wp1/part1 .data/wp2/part2 .data/wp3/part3 .data/wp4/part4 > /tmp/wp.npz && sha256sum /tmp/wp.npz
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE; mkdir -p /tmp/s5; cp -r $PWD /tmp/s5/repo; cd /tmp/s5/repo
export PYTHONPATH=/tmp/site:/tmp/s5/repo
B="--dataset /tmp/wp.npz --epoch-size 100000 --train-candidates 32 --encode-candidates 16 --encode-beam 4 --mem-budget-gib 8 --quiet --time-budget-s 400 --threads 2 --methods rqmoe"
# three at a time on the GPU
setsid nohup python3 -m faiss_rqmoe.bench codec $B --bytes 8 --instr-init codebooks --out /tmp/s5/learned_8B_rqmoe_ec.json > /tmp/s5/learned_8B_rqmoe_ec.log 2>&1 < /dev/null &
setsid nohup python3 -m faiss_rqmoe.bench codec $B --bytes 16 --instr-init codebooks --out /tmp/s5/learned_16B_rqmoe_ec.json > /tmp/s5/learned_16B_rqmoe_ec.log 2>&1 < /dev/null &
setsid nohup python3 -m faiss_rqmoe.bench codec $B --bytes 8 --lr-patience 6 --stop-patience 16 --out /tmp/s5/learned_8B_rqmoe_patience.json > /tmp/s5/learned_8B_rqmoe_patience.log 2>&1 < /dev/null &
# once those were done, on the same machine: 600 s each, two at a time
mkdir -p /tmp/s6
B="--dataset /tmp/wp.npz --epoch-size 100000 --train-candidates 32 --encode-candidates 16 --encode-beam 4 --mem-budget-gib 8 --quiet --time-budget-s 600 --threads 2 --bytes 8 --lr-patience 6 --stop-patience 16"
for m in rqmoe qinco; do setsid nohup python3 -m faiss_rqmoe.bench codec $B --methods $m --out /tmp/s6/learned_8B_${m}_600s.json > /tmp/s6/learned_8B_${m}_600s.log 2>&1 < /dev/null & done
