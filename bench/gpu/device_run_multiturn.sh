#!/usr/bin/env bash
# The multi-turn benchmark (bench/bench_multiturn.py) on the GPU host, which has no
# package registry (bench/README.md, "GPU", has the packing recipe: here the site folder
# is packed with `xz -T0 -3` and split into 53 MiB parts, .gpu/c1 ... .gpu/c4, so that
# each part plus the working tree stays under the 64 MiB a call may carry). One device
# call per step, back to back while the machine stays warm (30 s):
#   stage DIR   copy one part (a git-ignored folder named in carry) to /root/x
#   unpack      join the parts, check the sha256, unpack into /tmp/site, make the
#               Llama-3-8B-shaped dummy model in /tmp/l3
#   run         the bench, starting vLLM itself (~220 s on a fresh machine), results
#               and the log in $OUT (this is what measured results/multiturn_h100.json)
#   launch      unpack, then start vLLM detached (setsid) so its start-up overlaps
#               the calls; `bench` then measures against it. The detached engine runs
#               from a copy of the tree in /root/proj: every call replaces the carried
#               tree, and a process whose working directory was replaced dies at its
#               next import (transformers resolves Path("src") at import: seen on the
#               H100, 2026-12-06)
#   bench       wait for the detached vLLM, then measure against it
# The last part's call can end with `unpack` or `launch` (`stage DIR && ... launch`).
# Set OPENPCC_COMMIT in the command: git on the device may see another repository.
set -euo pipefail
REPO=$(pwd)
OUT=${OUT:-/tmp/out}
X=/root/x
export PYTHONPATH=/tmp/site:$REPO
export OPENPCC_BENCH_VLLM_MODEL=/tmp/l3
export OPENPCC_BENCH_VLLM_ARGS='["--load-format", "dummy"]'
export OPENPCC_BENCH_DTYPE=bfloat16
export OPENPCC_BENCH_MAX_MODEL_LEN=4096
export OPENPCC_BENCH_STARTUP_TIMEOUT=480
export OPENPCC_BENCH_MT_LOADS=${OPENPCC_BENCH_MT_LOADS:-16:32,64:128}
export OPENPCC_BENCH_MT_SYSTEM_WORDS=1000
export OPENPCC_BENCH_MT_USER_WORDS=150
export OPENPCC_BENCH_MAX_TOKENS=128
export OPENPCC_BENCH_CLIENT_PROCS=${OPENPCC_BENCH_CLIENT_PROCS:-4}
export OPENPCC_BENCH_MT_PARTIAL=$OUT/multiturn_partial.json
export PYTHONUNBUFFERED=1
PORT=8011

unpack() {
    cd $X
    cat site.part.* > site.tar.xz
    sha256sum -c site.sha256
    rm site.part.*
    mkdir -p /tmp/site
    xz -T0 -dc site.tar.xz | tar -x -C /tmp/site
    cd "$REPO"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $X/gpu.txt
    python3 -c "import vllm, torch, aiohttp, pyhpke, gmpy2; print('vllm', vllm.__version__, 'torch', torch.__version__)" | tee -a $X/gpu.txt
    python3 bench/gpu/make_llama3_dummy.py /tmp/l3
}

measure() {
    cp $X/gpu.txt "$OUT/" || true
    python3 -m bench bench_multiturn 2>&1 | tee "$OUT/bench.log" || true
    cp "$(ls -t bench/results/multiturn_*.json | head -1)" "$OUT/" || true
}

case "${1:-}" in
stage)
    mkdir -p $X
    cp "$2"/* $X/
    ls -la $X
    ;;
unpack)
    unpack
    ;;
run)
    export OPENPCC_BENCH_VLLM_LOG=$OUT/vllm.log
    measure
    ;;
launch)
    unpack
    rm -rf /root/proj
    cp -r "$REPO" /root/proj
    cd /root/proj
    export PYTHONPATH=/tmp/site:/root/proj
    export OPENPCC_BENCH_VLLM_LOG=$X/vllm.log
    setsid nohup python3 -m bench.bench_multiturn serve-engine $PORT > $X/engine.out 2>&1 < /dev/null &
    sleep 5
    cat $X/engine.out
    ;;
bench)
    export OPENPCC_BENCH_MT_ENGINE_URL=http://127.0.0.1:$PORT
    measure
    tail -c 200000 $X/vllm.log > "$OUT/vllm.log" || true
    ;;
*)
    echo "usage: $0 stage DIR | unpack | run | launch | bench" >&2
    exit 2
    ;;
esac
