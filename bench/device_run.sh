#!/usr/bin/env bash
# The checks that need a device machine (nvidia-h200: one GPU, 16 cores, no database server, no network), in one
# run of under 9 minutes:
#
# 1. bench/gpu_check.py (issue 16): a GPU pool's children's GPU memory in status and metrics, and
#    max_gpu_memory_mb's recycle, on a real GPU (about 30 s);
# 2. bench/fleet_scale.py --embedded --part scaling (issue 15): jobs/s of 1, 4, 8, 16 and 32 workers on 50 ms
#    jobs against the ideal and against as many plain populate loops, with the cores for it (this project's
#    own machines have 2: a job costs ~5.5 ms of CPU, so 32 workers at ~580 jobs/s need 3-4 cores).
#
# Prepare on the development machine with bench/device_wheels.sh (fills .whl/), then with the device tool:
#   run(command="bash bench/device_run.sh", carry=[".whl"], timeout_s=560)
# The results come back as $OUT/gpu_check.txt and $OUT/fleet_scale.md. DEVICE_WORKERS and DEVICE_WINDOW change
# the scaling part's worker counts (1,4,8,16,32) and window (8 s).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
python=${PYTHON:-python3}
site=$(mktemp -d /tmp/djs-site.XXXXXX)
"$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
  || { echo "device_run: installing .whl/ failed (run bench/device_wheels.sh first)" >&2; exit 2; }
export PYTHONPATH=$site PATH=$site/bin:$PATH PYTHONUNBUFFERED=1
echo "device_run: $(nproc) CPUs, $("$python" --version), results in $OUT"

timeout 200 "$python" bench/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt"
gpu=${PIPESTATUS[0]}
timeout 330 "$python" bench/fleet_scale.py --embedded --part scaling --workers "${DEVICE_WORKERS:-1,4,8,16,32}" \
  --window "${DEVICE_WINDOW:-8}" 2>&1 | tee "$OUT/fleet_scale.md"
scale=${PIPESTATUS[0]}
echo "device_run: gpu_check exited $gpu (0 passed, 1 failed, 3 no GPU), fleet_scale exited $scale"
((scale == 0 && (gpu == 0 || gpu == 3))) || exit 1
