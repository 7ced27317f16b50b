#!/usr/bin/env bash
# GPU checks of the entropy kernels in one call on a lent GPU (device tool), or on any CUDA node:
#   bash examples/device_check_kernels.sh          # tests, variant sweep, autotuned grid
#   SWEEP=0 bash examples/device_check_kernels.sh  # tests + the autotuned grid of the issue
#   SWEEP_KERNELS=logits GRID_KERNELS=logits CHUNKED=0 bash examples/device_check_kernels.sh
#       # the logits kernel only: its 44 variants at n = 2K/8K/32K × v = 151,936/128,256
#       # (about 2.5 minutes on an H200 by the compile and bench times of 2026-11-27), then the
#       # autotuned grid with the timed configs and with the candidates too (3b)
# Phases (each with its own timeout, logs under $OUT): (1) the kernel tests compiled on CUDA
# with one fixed config; (2) --sweep: every variant of both kernels launched explicitly at the
# headline shapes, against cuBLAS / a device copy; (3) the autotuned launches over the whole
# grid of the issue (Triton and the roofline only; the compiles are cached from (2)); (3b,
# GRID_ALL=1) the logits grid again with POLICYLONG_LOGITS_CONFIGS=all; (4) the
# chunked PyTorch path at the headline shape for the speed-up.
# The image there has torch and triton but not this package's other requirements, so the
# package is put on PYTHONPATH as an installed tree (policylong/, kernels/ -> policylong.kernels)
# instead of pip-installing it; pytest runs from outside the repo so ./policylong does not
# shadow that tree. Tests use one fixed Triton config (POLICYLONG_TRITON_AUTOTUNE=0): with the
# autotuner every test shape compiles all configs (17 tests took 120 s on an H200).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH="$REPO"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used,memory.total --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if [ "${TESTS:-1}" = 1 ]; then
echo "== (1) tests (compiled Triton on CUDA, fixed config)"
(cd /tmp && POLICYLONG_TRITON_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-180}" python3 -m pytest -q \
    -p no:cacheprovider -rfEs -x "$REPO/tests/unit/test_entropy.py" "$REPO/tests/gpu" 2>&1 \
    | tee "$OUT/pytest.log" | tail -15)
fi
B="python3 $REPO/examples/bench_kernels.py --device cuda --dtype bfloat16"
# the rows so far go to $OUT after every phase: a call cut off by the device tool's limit
# (600 s) still brings back what it measured
save() { cp "$REPO/benchmarks/results.jsonl" "$OUT/results.jsonl"; }
if [ "${SWEEP:-1}" = 1 ]; then
    echo "== (2) variant sweep"
    case "${SWEEP_KERNELS:-linear logits}" in *linear*)
    timeout "${SWEEP1_TIMEOUT:-170}" $B --sweep --kernels linear --n 32768 8192 --d 4096 \
        --vocab 151936 2>&1 | tee "$OUT/sweep_linear.log";; esac
    case "${SWEEP_KERNELS:-linear logits}" in *logits*)
    timeout "${SWEEP2_TIMEOUT:-240}" $B --sweep --kernels logits \
        --n ${SWEEP_LOGITS_N:-2048 8192 32768} --vocab ${SWEEP_LOGITS_V:-151936 128256} 2>&1 \
        | tee "$OUT/sweep_logits.log";; esac
    save
fi
echo "== (3) autotuned launches, the issue's grid"
timeout "${GRID_TIMEOUT:-150}" $B --kernels ${GRID_KERNELS:-linear logits} \
    --methods triton matmul copy --n 2048 8192 32768 \
    --d 2048 3584 4096 --vocab 151936 128256 2>&1 | tee "$OUT/bench_grid.log"
save
if [ "${GRID_ALL:-1}" = 1 ]; then
echo "== (3b) the logits grid again, the autotuner also trying the untimed candidate configs"
POLICYLONG_LOGITS_CONFIGS=all timeout "${GRID_TIMEOUT:-150}" $B --kernels logits \
    --methods triton copy --n 2048 8192 32768 --vocab 151936 128256 2>&1 \
    | tee "$OUT/bench_grid_all.log"
save
fi
if [ "${CHUNKED:-1}" = 1 ]; then
echo "== (4) chunked PyTorch path at the headline shape"
timeout "${CHUNKED_TIMEOUT:-40}" $B --kernels linear --methods chunked triton matmul \
    --n 32768 --d 4096 --vocab 151936 2>&1 | tee "$OUT/bench_chunked.log"
fi
save
