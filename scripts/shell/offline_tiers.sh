#!/bin/bash
# Datasets of graded quality from one PPO run on this machine; arguments go to benchmarks.offline_tiers.
#
#   scripts/shell/offline_tiers.sh --preset debug --out data/tiers_debug
#   scripts/shell/offline_tiers.sh --preset cpu --out data/tiers/classic
#
# The cluster version is scripts/sbatch/offline_tiers.sbatch.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
craftax_setup
craftax_run "$PYTHON" -m benchmarks.offline_tiers "$@"
