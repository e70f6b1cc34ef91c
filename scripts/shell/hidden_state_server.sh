#!/bin/bash
# Serve LLM hidden states over HTTP on this machine; arguments go to servers.hidden_state_server.
#
#   scripts/shell/hidden_state_server.sh --model runs/tiny_llm
#   HIDDEN_STATE_PORT=9000 scripts/shell/hidden_state_server.sh --model Qwen/Qwen2.5-0.5B-Instruct
#
# Environment: HIDDEN_STATE_HOST (default 127.0.0.1: this machine only), HIDDEN_STATE_PORT (8000).
# The cluster version is scripts/sbatch/hidden_state_server.sbatch.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
craftax_setup
craftax_run "$PYTHON" -m servers.hidden_state_server \
    --host "${HIDDEN_STATE_HOST:-127.0.0.1}" --port "${HIDDEN_STATE_PORT:-8000}" "$@"
