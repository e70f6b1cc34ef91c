#!/bin/bash
# Evaluate an offline-RL run in the game on this machine; arguments go to offline_rl.evaluate.
#
#   scripts/shell/offline_evaluate.sh --run-dir runs/offline_rl/awr/Craftax-Classic-Symbolic-v1/default-s0 \
#       --dataset data/ppo_classic --episodes 64 --gif runs/awr.gif
#
# The cluster version is scripts/sbatch/offline_evaluate.sbatch.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
craftax_setup
craftax_run "$PYTHON" -m offline_rl.evaluate "$@"
