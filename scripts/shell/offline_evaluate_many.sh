#!/bin/bash
# Evaluate many offline-RL runs on this machine and write one table; arguments go to
# offline_rl.evaluate_many.
#
#   scripts/shell/offline_evaluate_many.sh runs/offline_rl/*/Craftax-Classic-Symbolic-v1/* --episodes 64 \
#       --out runs/offline_table
#
# The cluster version (a Slurm array, one share of the runs per task) is scripts/sbatch/offline_evaluate_many.sbatch.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
craftax_setup
craftax_run "$PYTHON" -m offline_rl.evaluate_many "$@"
