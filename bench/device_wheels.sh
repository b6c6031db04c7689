#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what bench/device_run.sh installs on a device machine: djsupervisor's own wheel
# and every dependency of djsupervisor[embedded,gpu] for that machine's Python, less the packages its image
# already has (they would only count against the 64 MiB a device call may carry).
#
#   bench/device_wheels.sh [PYTHON_VERSION]   # default 3.12, the nvidia-h200 image's python3
#   DEVICE_WHEELS_ALL=1 bench/device_wheels.sh 3.11   # everything, for a rehearsal on this machine
#
# Then, with the device tool: run(command="bash bench/device_run.sh", carry=[".whl"], timeout_s=560).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
# In the nvidia-h200 image (/work/.library/device/KINDS.md, "Python packages already there"), read 2026-11-17
preinstalled="numpy pandas networkx packaging pyparsing tqdm fsspec psutil nvidia-ml-py python-dateutil six
  typing-extensions pyyaml pytz tzdata annotated-types"
python=${PYTHON:-python3}
rm -rf .whl && mkdir .whl
"$python" -m pip wheel --quiet --no-deps --wheel-dir .whl .
"$python" -m pip download --quiet --only-binary=:all: --python-version "$version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
  --platform manylinux_2_35_x86_64 --platform any --dest .whl \
  "$(ls .whl/djsupervisor-*.whl)[embedded,gpu]"
if [[ -z ${DEVICE_WHEELS_ALL:-} ]]; then
  for name in $preinstalled; do
    pattern=$(echo "$name" | tr '-' '_')
    rm -f .whl/"$pattern"-[0-9]*.whl .whl/"$name"-[0-9]*.whl
  done
fi
du -sh .whl
ls .whl
