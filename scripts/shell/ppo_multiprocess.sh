#!/bin/bash
# One PPO run as several processes on this machine, joined by jax.distributed (utils/distributed.py):
# what scripts/sbatch/ppo_multinode.sbatch does across nodes. Arguments go to online_rl.ppo.
#
#   XLA_FLAGS=--xla_force_host_platform_device_count=2 scripts/shell/ppo_multiprocess.sh --preset debug
#
# CRAFTAX_PROCESSES: how many processes (default 2); CRAFTAX_COORDINATOR_PORT: process 0's port
# (default 61234). On a CPU each process has one device unless XLA_FLAGS forces more, as above.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
craftax_setup
PROCESSES="${CRAFTAX_PROCESSES:-2}"
[[ "$PROCESSES" =~ ^[1-9][0-9]*$ ]] || craftax_die "CRAFTAX_PROCESSES must be a positive integer (got '$PROCESSES')"
PORT="${CRAFTAX_COORDINATOR_PORT:-61234}"
pids=()
for ((i = 0; i < PROCESSES; i++)); do
    craftax_spawn env CRAFTAX_COORDINATOR="127.0.0.1:$PORT" CRAFTAX_NUM_PROCESSES="$PROCESSES" CRAFTAX_PROCESS_ID="$i" \
        "$PYTHON" -m online_rl.ppo --no-progress "$@"
    [[ -n "${CRAFTAX_DRY_RUN:-}" ]] || pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
done
exit "$status"
