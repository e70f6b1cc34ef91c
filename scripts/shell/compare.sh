#!/bin/bash
# Run a method-comparison suite on this machine (one method after another), then write its table
# and plot into docs/results.md; arguments go to benchmarks.compare.
#
#   scripts/shell/compare.sh classic_debug --results-md /tmp/results.md
#   scripts/shell/compare.sh classic_2m
#
# On a cluster: python -m benchmarks.compare SUITE --slurm (an array job plus a collect job), or
# scripts/sbatch/compare.sbatch to run a whole suite inside one job.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
craftax_setup
[[ $# -gt 0 ]] || craftax_die "usage: $(basename "$0") SUITE [benchmarks.compare flags]; suites are in benchmarks/suites/"
craftax_run "$PYTHON" -m benchmarks.compare "$@"
