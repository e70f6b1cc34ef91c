#!/bin/bash
# Train PPO with live LLM hidden-state features on this machine; arguments go to online_rl_llm.ppo_llm.
#
#   scripts/shell/ppo_llm.sh --preset debug --llm-model runs/tiny_llm
#
# The cluster version is scripts/sbatch/ppo_llm.sbatch (one seed per array task).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
craftax_setup
craftax_run "$PYTHON" -m online_rl_llm.ppo_llm "$@"
