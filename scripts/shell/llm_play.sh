#!/bin/bash
# Let an LLM play the game directly on this machine; arguments go to online_rl_llm.llm_play.
#
#   scripts/shell/llm_play.sh --model runs/tiny_llm --preset debug
#
# The cluster version is scripts/sbatch/llm_play.sbatch (one seed per array task).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
craftax_setup
craftax_run "$PYTHON" -m online_rl_llm.llm_play "$@"
