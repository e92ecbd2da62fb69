B="--dataset /tmp/wp.npz --epoch-size 100000 --train-candidates 32 --encode-candidates 16 --encode-beam 4 --mem-budget-gib 8 --quiet --time-budget-s 400 --threads 2"
for n in 8 16; do
 date -u
 for m in rqmoe qinco rq-sgd; do python3 -m faiss_rqmoe.bench codec $B --bytes $n --methods $m --out /tmp/s5/learned_${n}B_$m.json > /tmp/s5/learned_${n}B_$m.log 2>&1 & done; wait
done
date -u; echo DONE
