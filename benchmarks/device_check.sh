#!/usr/bin/env bash
# Every GPU test and benchmark of the project in one call on a lent GPU (device tool), or on
# any CUDA node; about 7-8 minutes on one H200 (the budgets below add up to 8.5):
#   bash benchmarks/device_check.sh
#   SWEEP=1 bash benchmarks/device_check.sh      # + the kernel variant sweep (about 4 minutes)
#   PHASES="tests policy" bash benchmarks/device_check.sh  # + the policy head (budget 3.5 min)
#   PHASES="tests train" bash benchmarks/device_check.sh   # a subset of the phases
#   PHASES="align" bash benchmarks/device_check.sh         # the alignment loop in bf16 (~2 min)
# Phases, each with its own timeout and log under $OUT, the rows so far copied to
# $OUT/results.jsonl after each one (a call cut off at the device tool's limit keeps what it
# measured):
#   tests    the kernel tests compiled on CUDA and tests/gpu, one fixed Triton config
#            (POLICYLONG_TRITON_AUTOTUNE=0: with the autotuner every test shape compiles
#            every config); the policy head's tests are left to its phase
#   policy   (not in the default list, which fills the device tool's 10 minutes) the policy
#            head's Triton kernels compiled: its unit tests on CUDA, the tests/gpu policy
#            tests (Qwen2.5 vocabulary, bf16 and float32), then bench_policy's materialised /
#            chunked / triton forward + backward at n = 8K, d = 2048, v = 151,936, bf16
#   sweep    (SWEEP=1) every variant of bench_kernels' LINEAR_VARIANTS / LOGITS_VARIANTS
#   grid     the autotuned launches of both kernels over n = 2K/8K/32K, d = 2048/3584/4096,
#            v = 151,936/128,256 against cuBLAS / a device copy (benchmarks/KERNELS.md)
#   chunked  the chunked PyTorch path at the headline shape, for the speed-up
#   train    bench_train at the Qwen2.5-0.5B shape, 32K tokens, bf16, ending with a save
#   align    (not in the default list) `policylong align` on CUDA in bf16 (Float16Module,
#            the Triton policy head, KV-cached sampling): grpo, then dgrpo with the exact
#            teacher KL, 3 steps each on the embedded model, then a rerun that must resume
# The image there has torch and triton but not megatron-core: its wheel travels in .whl/
# (python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1). The package goes on
# PYTHONPATH (the repository root holds it); pytest runs from outside the repository.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_DEVICE_MAX_CONNECTIONS=1
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/out}
PHASES=${PHASES:-tests grid chunked train}
[ "${SWEEP:-0}" = 1 ] && PHASES="$PHASES sweep"
mkdir -p "$OUT"
if [ -d "$REPO/.whl" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$REPO"/.whl/*.whl || echo "megatron-core wheel: install failed"
fi
export PYTHONPATH="$REPO":/tmp/site
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used,memory.total --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
save() { cp "$REPO/benchmarks/results.jsonl" "$OUT/results.jsonl"; }
want() { case " $PHASES " in *" $1 "*) return 0;; esac; return 1; }
B="python3 $REPO/benchmarks/bench_kernels.py --device cuda --dtype bfloat16"
if want tests; then
    echo "== tests (compiled Triton on CUDA, fixed config)"
    (cd /tmp && POLICYLONG_TRITON_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q \
        -p no:cacheprovider -rfEs "$REPO/tests/unit/test_entropy.py" "$REPO/tests/gpu" \
        -k "not policy_triton" 2>&1 | tee "$OUT/pytest.log" | tail -15)
fi
if want policy; then
    echo "== policy head (compiled Triton on CUDA): tests, then forward + backward timings"
    (cd /tmp && timeout "${POLICY_TEST_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider \
        -rfEs "$REPO/tests/unit/test_linear_policy_triton.py" "$REPO/tests/gpu" -k policy_triton 2>&1 \
        | tee "$OUT/pytest_policy.log" | tail -15)
    timeout "${POLICY_BENCH_TIMEOUT:-90}" python3 "$REPO/benchmarks/bench_policy.py" \
        --device cuda --dtype bfloat16 --n 8192 --d 2048 --vocab 151936 \
        --methods materialised chunked triton 2>&1 | tee "$OUT/bench_policy.log"
    save
fi
if want sweep; then
    echo "== variant sweep"
    timeout "${SWEEP_TIMEOUT:-240}" $B --sweep --kernels linear logits --n 32768 8192 \
        --d 4096 --vocab 151936 2>&1 | tee "$OUT/sweep.log"
    save
fi
if want grid; then
    echo "== autotuned launches, the whole grid"
    timeout "${GRID_TIMEOUT:-140}" $B --kernels linear logits --methods triton matmul copy \
        --n 2048 8192 32768 --d 2048 3584 4096 --vocab 151936 128256 2>&1 \
        | tee "$OUT/bench_grid.log"
    save
fi
if want chunked; then
    echo "== chunked PyTorch path at the headline shape"
    timeout "${CHUNKED_TIMEOUT:-40}" $B --kernels linear --methods chunked triton matmul \
        --n 32768 --d 4096 --vocab 151936 2>&1 | tee "$OUT/bench_chunked.log"
    save
fi
if want train; then
    echo "== training stage (megatron-core), bf16 save at the end"
    python3 -c "import megatron.core as mc; print('megatron-core', mc.__version__)"
    python3 -c "import transformer_engine" 2>/dev/null && echo "transformer_engine: yes" \
        || echo "transformer_engine: no (sdpa spec)"
    (cd /tmp && timeout "${TRAIN_TIMEOUT:-180}" python3 "$REPO/benchmarks/bench_train.py" \
        --shape qwen2.5-0.5b --seq "${SEQ:-32768}" --steps "${STEPS:-3}" --gbs "${GBS:-2}" \
        --workdir /tmp/bench_train 2>&1 | grep -v "it/s\]\|step/s\]" \
        | tee "$OUT/bench_train.log" | tail -30)
    tail -c 4000 /tmp/bench_train/ckpt/metrics.jsonl > "$OUT/metrics.jsonl" 2>/dev/null
    save
fi
if want align; then
    echo "== alignment loop on CUDA, bf16 (never run on a GPU before)"
    A=(--workdir /tmp/align --from embedded --steps 3 --set align.prompts_per_step=4
       --set align.group_size=4 --set align.task_length=256 --set align.max_new_tokens=4
       --set align.save_interval=1)
    T=$(python3 -c "from policylong.paths import embedded_model_dir as e; print(e())")
    (cd /tmp && timeout "${ALIGN_TIMEOUT:-150}" bash -c "
        python3 -m policylong.cli align --config grpo ${A[*]} &&
        python3 -m policylong.cli align --config dgrpo --teacher $T \
            --set align.teacher_form=full ${A[*]} &&
        python3 -m policylong.cli align --config dgrpo --teacher $T \
            --set align.teacher_form=full ${A[*]}" 2>&1 | grep -v "step/s\]" \
        | tee "$OUT/align.log" | tail -20)
    cat /tmp/align/align/*/metrics.jsonl > "$OUT/align_metrics.jsonl" 2>/dev/null
fi
exit 0
