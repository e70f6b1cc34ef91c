#!/bin/bash
# Offline RL on a saved dataset on this machine. ALGO: awr, bc or iql; other arguments go to the trainer.
#
#   scripts/shell/offline_train.sh awr --dataset data/ppo_classic --preset debug
#   scripts/shell/offline_train.sh bc --dataset data/ppo_classic-qwen --features hidden_state
#
# The cluster version is scripts/sbatch/offline_train.sbatch.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
craftax_setup
ALGO="${1:-}"
[[ $# -gt 0 ]] && shift
case "$ALGO" in
    awr) craftax_run "$PYTHON" -m offline_rl.awr "$@" ;;
    bc) craftax_run "$PYTHON" -m offline_rl.bc "$@" ;;
    iql) craftax_run "$PYTHON" -m offline_rl.iql "$@" ;;
    *) craftax_die "usage: $(basename "$0") awr|bc|iql --dataset DIR [trainer flags] (got '$ALGO')" ;;
esac
