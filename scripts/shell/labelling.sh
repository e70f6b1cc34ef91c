#!/bin/bash
# Label a trajectory dataset on this machine: queue its shards, run workers until the queue is
# empty, then show the queue. Arguments go to labelling.enqueue (dataset, output, model, ...).
#
#   scripts/shell/labelling.sh --dataset data/ppo_classic --out data/ppo_classic-qwen \
#       --model Qwen/Qwen2.5-0.5B-Instruct
#   LABELLING_WORKERS=2 LABELLING_ARGS="--threads 1" scripts/shell/labelling.sh --dataset ... --model ...
#
# Environment:
#   LABELLING_WORKERS    workers to start (default 1; each loads the model once)
#   LABELLING_ARGS       extra worker flags, e.g. "--threads 1 --device cuda:1"
#   LABELLING_REDIS_URL  a Redis server (default: the embedded one, runs/labelling/redis.rdb)
#   LABELLING_QUEUE      queue name (default labelling)
# The cluster version is scripts/sbatch/labelling_coordinator.sbatch (+ labelling_worker.sbatch).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
craftax_setup
QUEUE_FLAGS=(--queue "${LABELLING_QUEUE:-labelling}")
if [[ -n "${LABELLING_REDIS_URL:-}" ]]; then
    QUEUE_FLAGS+=(--redis-url "$LABELLING_REDIS_URL")
fi
read -r -a WORKER_FLAGS <<< "${LABELLING_ARGS:-}"

craftax_call "$PYTHON" -m labelling.enqueue "${QUEUE_FLAGS[@]}" "$@"
WORKERS="${LABELLING_WORKERS:-1}"
PIDS=()
for ((i = 0; i < WORKERS; i++)); do
    craftax_spawn "$PYTHON" -m labelling.worker "${QUEUE_FLAGS[@]}" --name "$(hostname)-$i" "${WORKER_FLAGS[@]}"
    PIDS+=("${!:-}")
done
STATUS=0
for pid in "${PIDS[@]}"; do
    if [[ -n "$pid" ]]; then
        wait "$pid" || STATUS=$?
    fi
done
craftax_call "$PYTHON" -m labelling.status "${QUEUE_FLAGS[@]}"
exit "$STATUS"
