#!/usr/bin/env bash
# GPU checks of the entropy kernels in one call on a lent GPU (device tool), or on any CUDA node:
#   bash examples/device_check_kernels.sh          # headline shapes; logs + results under $OUT
#   FULL=1 bash examples/device_check_kernels.sh   # the whole grid of the issue (~4 min on H200)
# The image there has torch and triton but not this package's other requirements, so the
# package is put on PYTHONPATH as an installed tree (policylong/, kernels/ -> policylong.kernels)
# instead of pip-installing it; pytest runs from outside the repo so ./policylong does not
# shadow that tree. Tests use one fixed Triton config (POLICYLONG_TRITON_AUTOTUNE=0): with the
# autotuner every test shape compiles all configs (17 tests took 120 s on an H200).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/shim
rm -rf /tmp/shim/policylong
cp -r "$REPO/policylong" /tmp/shim/policylong
cp -r "$REPO/kernels" /tmp/shim/policylong/kernels
cp -r "$REPO/megatron_ext" /tmp/shim/policylong/megatron_ext
export PYTHONPATH=/tmp/shim
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used,memory.total --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if [ "${TESTS:-1}" = 1 ]; then
echo "== tests (compiled Triton on CUDA, fixed config)"
(cd /tmp && POLICYLONG_TRITON_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-110}" python3 -m pytest -q \
    -p no:cacheprovider -rfEs "$REPO/tests/unit/test_entropy.py" "$REPO/tests/gpu" 2>&1 \
    | tee "$OUT/pytest.log" | tail -25)
fi
B="python3 $REPO/examples/bench_kernels.py --device cuda --dtype bfloat16"
if [ "${FULL:-0}" = 1 ]; then
    timeout "${FULL_TIMEOUT:-300}" $B --n 2048 8192 32768 --d 2048 3584 4096 --vocab 151936 128256 2>&1 \
        | tee "$OUT/bench_full.log"
else
    echo "== benchmark: headline shapes (autotuned)"
    timeout "${BENCH1_TIMEOUT:-130}" $B --n 8192 32768 --d 4096 --vocab 151936 \
        --kernels linear 2>&1 | tee "$OUT/bench_linear.log"
    timeout "${BENCH2_TIMEOUT:-80}" $B --n 8192 32768 --vocab 151936 --kernels logits 2>&1 \
        | tee "$OUT/bench_logits.log"
fi
cp "$REPO/benchmarks/results.jsonl" "$OUT/results.jsonl"
