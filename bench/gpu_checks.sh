#!/usr/bin/env bash
# The CUDA checks and benches in one run on a GPU host: what a GPU lease is spent on.
#
#   bash bench/gpu_checks.sh smoke   # every CUDA path once, small (a few minutes)
#   bash bench/gpu_checks.sh full    # the exactness tests and every GPU bench at full size
#
# Each step has its own time limit and log; a failing step does not stop the others. Logs go to
# $LOGS (default bench/results/gpu-logs); the benches save to bench/results/ as usual; with
# PACK=file.tgz, the logs and everything the benches wrote are packed there after every step.
set -u
phase=${1:-smoke}
LOGS=${LOGS:-bench/results/gpu-logs}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
stamp=$(mktemp); touch "$stamp"

pack() {  # everything the benches wrote so far, and the logs, into $PACK (when set): a cut-off run keeps what it had
    [ -n "${PACK:-}" ] || return 0
    find bench/results "$LOGS" -newer "$stamp" -type f ! -name '*.tgz' -print0 | tar czf "$PACK" --null -T -
}

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOGS/$name.log"
    echo "=== $name rc=$rc in $((SECONDS - start))s"
    pack
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$LOGS/env.log"

if [ "$phase" = smoke ]; then
    step kernels-xl 90 python3 bench/kernel_invariance.py --repeats 5
    step exactness 240 python3 -m pytest -q -x -p no:cacheprovider tests/server/test_exactness.py -k cuda
    step engine-step-b2 90 python3 bench/engine_step.py --preset B/2 --rows 64 --repeats 5 --no-compile
    step moe-layer 120 python3 bench/moe_layer.py --device cuda --compile --repeats 10
else  # most wanted first (what the last lease left unmeasured leads): a lease can end before the last step
    step exactness 100 python3 -m pytest -q -p no:cacheprovider tests/server/test_exactness.py -k cuda
    step engine-step-b2 120 python3 bench/engine_step.py --preset B/2 --rows 64 256
    step serve-xl2 150 python3 bench/serve_load.py --preset XL/2 --moe 4in32 --device cuda --concurrency 16 64 \
        --requests 48 --time-limit 10
    step engine-step-xl2 120 python3 bench/engine_step.py --preset XL/2 --moe 4in32 --rows 64 256
    step serve-b2 120 python3 bench/serve_load.py --preset B/2 --device cuda --concurrency 1 16 64 \
        --requests 48 --time-limit 8
    step moe-layer 60 python3 bench/moe_layer.py --device cuda --compile --spec 4in32 --dim 1152 --tokens 16384
    step invariance-b2 90 python3 bench/batch_invariance.py --preset B/2 --device cuda --dtypes bfloat16 \
        --requests 64 --steps 10
    step kernels-xl 30 python3 bench/kernel_invariance.py
fi
pack
