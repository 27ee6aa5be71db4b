#!/usr/bin/env bash
# The private-path benchmark (bench/bench_private_path.py) and the service scaling
# figures on the GPU host, which has no package registry. Same packing and steps as
# device_run_multiturn.sh (read its header): the site folder in four parts (.gpu/c1 ..
# .gpu/c4) plus a fifth folder (.gpu/c5) with what the packed site lacks for this
# release: the pycryptodome and uvloop wheels (cp312), and the redis-py wheel with
# redis-server and its libraries (redis-bin.tgz), for runs that need them.
#   stage DIR   copy one part folder to /root/x
#   launch      unpack, install c5, start vLLM detached (bench_multiturn serve-engine)
#   wait        until the engine answers /health (a fresh machine: ~3-4 min)
#   bench       bench_private_path against it; OPENPCC_BENCH_RUNS passes (default 1: a
#               call is limited to ~590 s, so the median of 3 for c=1 is three calls, or
#               OPENPCC_BENCH_RUNS=3 with OPENPCC_BENCH_LOADS=1:12 alone), cut at
#               OPENPCC_BENCH_TIMEOUT (540 s) so what was measured still comes back
#   scaling     bench_issuer (--workers 2 vs 1 with cores to spare)
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
export PYTHONUNBUFFERED=1
PORT=8011

unpack() {
    cd $X
    cat site.part.* > site.tar.xz
    sha256sum -c site.sha256
    rm site.part.*
    mkdir -p /tmp/site /tmp/redis
    xz -T0 -dc site.tar.xz | tar -x -C /tmp/site
    python3 -m pip install --quiet --no-index --no-deps --target /tmp/site $X/*.whl
    tar -xzf $X/redis-bin.tgz -C /tmp/redis
    cd "$REPO"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $X/gpu.txt
    python3 -c "import vllm, torch, aiohttp, pyhpke, gmpy2, Crypto, uvloop; print('vllm', vllm.__version__, 'torch', torch.__version__, 'aiohttp', aiohttp.__version__)" | tee -a $X/gpu.txt
    python3 bench/gpu/make_llama3_dummy.py /tmp/l3
}

case "${1:-}" in
stage)
    mkdir -p $X
    cp "$2"/* $X/
    ls -la $X
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
wait)
    for _ in $(seq 1 110); do
        curl -sf http://127.0.0.1:$PORT/health > /dev/null && { echo engine ready; exit 0; }
        sleep 5
    done
    tail -20 $X/vllm.log; exit 1
    ;;
bench)
    cp $X/gpu.txt "$OUT/" || true
    export OPENPCC_BENCH_ENGINE_URL=http://127.0.0.1:$PORT
    export OPENPCC_BENCH_LOADS=${OPENPCC_BENCH_LOADS:-1:12,64:192}
    export OPENPCC_BENCH_RUNS=${OPENPCC_BENCH_RUNS:-1}
    export OPENPCC_BENCH_PROMPT_WORDS=500
    export OPENPCC_BENCH_MAX_TOKENS=128
    card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9]00' || echo gpu)
    export OPENPCC_BENCH_LABEL=${OPENPCC_BENCH_LABEL:-$(echo "$card" | tr 'A-Z' 'a-z')}
    export OPENPCC_BENCH_CLIENT_PROCS=${OPENPCC_BENCH_CLIENT_PROCS:-4}
    export OPENPCC_BENCH_PARTIAL=$OUT/private_path_partial.json
    timeout "${OPENPCC_BENCH_TIMEOUT:-540}" python3 -m bench bench_private_path > "$OUT/bench.log" 2>&1 || true
    tail -60 "$OUT/bench.log"
    cp bench/results/private_path_*.json "$OUT/" || true
    tail -c 100000 $X/vllm.log > "$OUT/vllm.log" || true
    ;;
scaling)
    # The issuer's --workers figure (16 cores: spare cores for the load generator). The
    # gateway's needs nginx as its node, which this host lacks: measured on the VM.
    python3 -m bench bench_issuer 2>&1 | tail -30 | tee "$OUT/issuer.log" || true
    cp bench/results/issuer.json "$OUT/" || true
    ;;
*)
    echo "usage: $0 stage DIR | launch | wait | bench | scaling" >&2
    exit 2
    ;;
esac
