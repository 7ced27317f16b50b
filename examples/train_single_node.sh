#!/usr/bin/env bash
# One PolicyLong training stage on one node, under torchrun.
#
#   CPU (a world of 2 gloo ranks, the tiny config):
#     NPROC=2 STAGE=demo_workdir/runs/policylong/stage_0 TO=/tmp/ckpt_1 bash examples/train_single_node.sh
#   One 8-GPU node (the paper's setting):
#     NPROC=8 CONFIG=qwen2.5-3b-128k FROM=/models/Qwen2.5-3B \
#       STAGE=runs/policylong/stage_0 TO=runs/policylong/ckpt_1 bash examples/train_single_node.sh
#   Print the command and the planned layout without running anything:
#     DRY_RUN=1 NPROC=8 CONFIG=... STAGE=... TO=... bash examples/train_single_node.sh
#
# Extra arguments go to `policylong train` (e.g. --set train.train_steps=100).
set -euo pipefail
if [ -z "${NPROC:-}" ]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [ "${NPROC:-0}" -ge 1 ] || NPROC=1
fi
CONFIG=${CONFIG:-tiny-cpu}
FROM=${FROM:-embedded}
STAGE=${STAGE:?set STAGE to a stage dataset folder}
TO=${TO:?set TO to the checkpoint folder to write}
PORT=${MASTER_PORT:-29500}

CMD=(torchrun --standalone --nproc-per-node "$NPROC" --master-port "$PORT"
     -m policylong.cli train --config "$CONFIG" --stage-dir "$STAGE" --from "$FROM" --to "$TO" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "${CMD[*]}"
    exec "${PYTHON:-python}" -m policylong.cli train --config "$CONFIG" --stage-dir "$STAGE" --from "$FROM" \
        --to "$TO" --dry-run --world-size "$NPROC" "$@"
fi
exec "${CMD[@]}"
