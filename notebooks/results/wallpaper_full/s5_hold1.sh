# Fifth session, first GPU machine (H100): the full wallpaper split, learned codecs at 8 and 16 bytes
# and the static codecs of the 8-byte table plus the cheap 16-byte ones, all in one 30-minute hold.
# Commit f19f747. The split (.data/wallpaper_full_split.npz, 195 000 021 bytes, sha256 168ba2ab97b6…,
# written by datasets.export_split(datasets.load_wallpaper(), ...)) went over in four calls of at most
# 64 MiB each (carry .data/wp1 .. .data/wp4: the file cut into parts of 42, 63, 63 and 27 MB); ignored
# paths already on a warm machine stay there between calls. The first call also carried .whl and
# .scratch/setup.sh; the third ran the CUDA tests (log: ../scripts/pytest_gpu_h100_s5.log; the first try
# stopped at collecting tests/test_notebooks.py, whose nbformat is not on that machine, so it is left out).
cat .data/wp1/part1 .data/wp2/part2 .data/wp3/part3 .data/wp4/part4 > /tmp/wp.npz && sha256sum /tmp/wp.npz
# the launch call: learned codecs three at a time on the GPU (/tmp/s5/drive.sh, written by the same call:
# its text is s5_drive.sh), static codecs on the CPU
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE; mkdir -p /tmp/s5; cp -r $PWD /tmp/s5/repo; cd /tmp/s5/repo
export PYTHONPATH=/tmp/site:/tmp/s5/repo
S="--dataset /tmp/wp.npz --static-train-max 100000 --device cpu --quiet"
setsid nohup bash /tmp/s5/drive.sh > /tmp/s5/drive.log 2>&1 < /dev/null &
setsid nohup python3 -m faiss_rqmoe.bench codec $S --bytes 8 --methods rq32 --threads 3 --out /tmp/s5/static_8B_rq32.json > /tmp/s5/static_8B_rq32.log 2>&1 < /dev/null &
setsid nohup python3 -m faiss_rqmoe.bench codec $S --bytes 8 --methods lsq --threads 3 --out /tmp/s5/static_8B_lsq.json > /tmp/s5/static_8B_lsq.log 2>&1 < /dev/null &
setsid nohup python3 -m faiss_rqmoe.bench codec $S --bytes 8 16 --methods pq opq rq1 rabitq turboquant --threads 3 --out /tmp/s5/static_cheap.json > /tmp/s5/static_cheap.log 2>&1 < /dev/null &
# later calls polled the logs (sleep; tail) and finally packed /tmp/s5/*.json *.log into $OUT
