#!/usr/bin/env bash
# Emu3 SFT with Ulysses sequence parallelism + ZeRO-3: one train.sft process per device via msrun.
# Called by t2i_sft_seq_parallel.sh / vqa_sft_seq_parallel.sh as: sft_seq_parallel.sh TASK [options]
#
# Environment (defaults in brackets):
#   NPROC        processes = devices [8 on Ascend (emu3.backend.device_target()), else 2]
#   CONFIG       training config [configs/TASK_sft_8npu.yaml with NPUs, else configs/TASK_sft_tiny_cpu.yaml]
#   MODEL_PATH   Emu3 checkpoint to fine-tune, e.g. Emu3-Stage1 [CPU: the tiny random demo model]
#   DATA_PATH    data prepared by train/prepare_{vision,vqa}_data.py [CPU: a synthetic demo set]
#   OUTPUT_DIR   log.jsonl + checkpoints/ [outputs/TASK_sft]
#   MASTER_PORT  [8118]     LOG_DIR  per-rank logs [OUTPUT_DIR/msrun_logs]
#   HCCL_CONNECT_TIMEOUT, HCCL_EXEC_TIMEOUT  Ascend collective time-outs in s [1800, 3600]: ranks finish
#                loading the 17 GB checkpoint minutes apart and wait for each other at a barrier
# Further options go to train.sft and override the config: --max_steps 10, --resume true,
# --mode graph, --dtype fp16, --sp_size 4 ... (python -m train.sft --help lists them all).
set -euo pipefail
TASK=$1; shift
source "$(dirname "$0")/env.sh"
# msrun starts each worker as `python`: make that the same interpreter.
export PATH="$(dirname "$PY"):$PATH"

if [ "$("$PY" -c 'from emu3 import backend; print(backend.device_target())')" = Ascend ]; then
  NPROC=${NPROC:-8}; CONFIG=${CONFIG:-$ROOT/configs/${TASK}_sft_8npu.yaml}
  # HCCL's defaults (120 s to connect) abort while the last rank is still reading the checkpoint.
  export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1800} HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-3600}
else
  NPROC=${NPROC:-2}; CONFIG=${CONFIG:-$ROOT/configs/${TASK}_sft_tiny_cpu.yaml}
  if [ -z "${MODEL_PATH:-}" ] && [ -z "${DATA_PATH:-}" ]; then
    echo "No NPU and no MODEL_PATH/DATA_PATH: fine-tuning the tiny RANDOM demo model on synthetic demo data." >&2
    DATA_PATH="$ROOT/outputs/demo_sft_data/$TASK"
    MODEL_PATH=$("$PY" -m train.demo_data --task "$TASK" --output "$DATA_PATH" | tail -n 1)
  fi
fi
OUTPUT_DIR=${OUTPUT_DIR:-outputs/${TASK}_sft}
LOG_DIR=${LOG_DIR:-$OUTPUT_DIR/msrun_logs}
ARGS=(--config "$CONFIG" --output_dir "$OUTPUT_DIR")
[ -n "${MODEL_PATH:-}" ] && ARGS+=(--model_path "$MODEL_PATH")
[ -n "${DATA_PATH:-}" ] && ARGS+=(--data_path "$DATA_PATH")

# Ctrl-C, kill (SIGTERM) and a closed terminal end the whole job with a non-zero status. msrun
# alone does not: it exits 0 on SIGINT, and on SIGTERM it dies while its workers (each in its own
# session) train on. So msrun runs in the background and a trap stops it and every worker.
alive() { local state; state=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${state:0:1}" != Z ]; }
stop() {
  trap '' INT TERM HUP
  echo "launcher: $1, stopping msrun and its workers" >&2
  local job=${MSRUN:-${!:-}} children pid  # $!: a signal between `msrun &` and MSRUN=$!
  [ -n "$job" ] || exit "$2"
  kill -STOP "$job" 2>/dev/null || true  # it starts no further worker meanwhile
  children=$(pgrep -P "$job" || true)
  kill -KILL "$job" 2>/dev/null || true
  # A worker leads its own process group: signal the group, so whatever it started ends too.
  for pid in $children; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do  # up to 10 s to exit; a worker stuck in a collective gets SIGKILL after that
    local left=""
    for pid in $children; do alive "$pid" && left=1; done
    [ -z "$left" ] && break
    sleep 0.2
  done
  for pid in $children; do kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; done
  wait "$job" 2>/dev/null || true
  exit "$2"
}

MSRUN=""
trap 'stop interrupted 130' INT
trap 'stop terminated 143' TERM
trap 'stop "hung up" 129' HUP
echo "msrun: $NPROC processes, config $CONFIG, logs in $LOG_DIR" >&2
msrun --worker_num="$NPROC" --local_worker_num="$NPROC" --master_addr=127.0.0.1 \
  --master_port="${MASTER_PORT:-8118}" --join=True --log_dir="$LOG_DIR" \
  "$ROOT/train/sft.py" "${ARGS[@]}" "$@" &
MSRUN=$!
status=0
wait "$MSRUN" || status=$?
if [ "$status" -ne 0 ]; then
  # the workers' one-line errors (rank logs also hold msrun's own noise)
  grep -h "^error: " "$LOG_DIR"/worker_*.log 2>/dev/null | sort -u >&2 || true
  echo "training failed (msrun exit status $status); per-rank logs: $LOG_DIR" >&2
fi
exit "$status"
