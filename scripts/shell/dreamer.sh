#!/bin/bash
# Train a Dreamer world-model agent on this machine; arguments go to world_models.dreamer.
#
#   scripts/shell/dreamer.sh --version 3 --preset debug
#   scripts/shell/dreamer.sh --version 2 --env Craftax-Classic-Symbolic-v1 --total-steps 200000
#
# The cluster version is scripts/sbatch/dreamer.sbatch (one seed per array task).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
craftax_setup
craftax_run "$PYTHON" -m world_models.dreamer "$@"
