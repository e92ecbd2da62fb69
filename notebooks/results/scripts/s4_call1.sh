# Session 4, call 1: training speed of the IVF codec (s4_train_speed.py) and the threaded LUT stage's speed.
source .scratch/setup.sh
date -u; nvidia-smi --query-gpu=name --format=csv,noheader
build_default
timeout 480 python3 notebooks/results/scripts/s4_train_speed.py ${B:-60} 2>&1 | grep -v -i warn | tee $OUT/s4_train_speed.log | tail -80
date -u
