#!/usr/bin/env bash
# The GPU benchmark on a host without a registry (see bench/README.md, "GPU").
# Earlier calls copied the wheel parts to /root/x; this installs and measures, one call.
set -euo pipefail
REPO=$(pwd)
OUT=${OUT:-/tmp/out}
cd /root/x
cat vllm.part.* > vllm-0.25.0-cp38-abi3-manylinux_2_28_x86_64.whl
sha256sum -c vllm.sha256
rm vllm.part.*
python3 -m pip install --quiet --no-index --no-deps --target /tmp/site /root/x/*.whl
export PYTHONPATH=/tmp/site:$REPO
cd "$REPO"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import vllm, torch, aiohttp, pyhpke, gmpy2; print('vllm', vllm.__version__, 'torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
python3 bench/gpu/make_llama3_dummy.py /tmp/l3
export OPENPCC_BENCH_VLLM_MODEL=/tmp/l3
export OPENPCC_BENCH_VLLM_ARGS='["--load-format", "dummy"]'
export OPENPCC_BENCH_DTYPE=bfloat16
export OPENPCC_BENCH_MAX_MODEL_LEN=4096
export OPENPCC_BENCH_LOADS=${OPENPCC_BENCH_LOADS:-1:16,16:64,64:256}
export OPENPCC_BENCH_PROMPT_WORDS=500
export OPENPCC_BENCH_MAX_TOKENS=128
export OPENPCC_BENCH_LABEL=h100
export OPENPCC_BENCH_CLIENT_PROCS=${OPENPCC_BENCH_CLIENT_PROCS:-4}
export OPENPCC_BENCH_STARTUP_TIMEOUT=420
export OPENPCC_BENCH_VLLM_LOG=$OUT/vllm.log
python3 -m bench bench_private_path 2>&1 | tail -40
cp bench/results/private_path_h100.json "$OUT/"
