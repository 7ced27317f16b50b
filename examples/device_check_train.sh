#!/usr/bin/env bash
# GPU check of the Megatron-Core training stage in one call on a lent GPU (device tool), or on a
# CUDA node without this package installed:
#   bash examples/device_check_train.sh     # bench_train at the Qwen2.5-0.5B shape, 32K tokens
# The lent machine's image has torch/transformers but not megatron-core: its wheel travels in
# .whl/ (python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1). The package goes on
# PYTHONPATH (the repository root holds the policylong package).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_DEVICE_MAX_CONNECTIONS=1
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d "$REPO/.whl" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$REPO"/.whl/*.whl || exit 1
fi
export PYTHONPATH="$REPO":/tmp/site
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 -c "import torch, megatron.core as mc; print('torch', torch.__version__, 'megatron-core', mc.__version__)"
python3 -c "import transformer_engine" 2>/dev/null && echo "transformer_engine: yes" || echo "transformer_engine: no (sdpa spec)"
cd /tmp
timeout "${BENCH_TIMEOUT:-240}" python3 "$REPO/examples/bench_train.py" --shape qwen2.5-0.5b \
    --seq "${SEQ:-32768}" --steps "${STEPS:-4}" --gbs "${GBS:-4}" --workdir /tmp/bench_train \
    2>&1 | grep -v "it/s\]\|step/s\]" | tee "$OUT/bench_train.log" | tail -30
cp "$REPO/benchmarks/results.jsonl" "$OUT/results.jsonl" 2>/dev/null
tail -c 4000 /tmp/bench_train/ckpt/metrics.jsonl > "$OUT/metrics.jsonl" 2>/dev/null
exit 0
