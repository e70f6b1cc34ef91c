#!/bin/bash
# Train one PPO-family method on this machine. METHOD: ppo, ppo_rnn, ppo_rnd, ppo_icm or ppo_e3b
# (ppo_rnd, ppo_icm, ppo_e3b are online_rl.ppo with --bonus rnd / icm / e3b). Other arguments go to the trainer.
#
#   scripts/shell/ppo_family.sh ppo --preset cpu --num-seeds 2
#   scripts/shell/ppo_family.sh ppo_rnd --env Craftax-Symbolic-v1 --total-steps 1000000
#
# The cluster version is scripts/sbatch/ppo_family.sbatch (one seed per array task).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
craftax_setup
METHOD="${1:-}"
[[ $# -gt 0 ]] && shift
case "$METHOD" in
    ppo) craftax_run "$PYTHON" -m online_rl.ppo "$@" ;;
    ppo_rnd | ppo_icm | ppo_e3b) craftax_run "$PYTHON" -m online_rl.ppo --bonus "${METHOD#ppo_}" "$@" ;;
    ppo_rnn) craftax_run "$PYTHON" -m online_rl.ppo_rnn "$@" ;;
    *) craftax_die "usage: $(basename "$0") METHOD [trainer flags]; METHOD is ppo, ppo_rnn, ppo_rnd, ppo_icm or ppo_e3b (got '$METHOD')" ;;
esac
