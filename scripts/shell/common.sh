# shellcheck shell=bash
# Sourced by every script in scripts/ (the sbatch ones and the local ones): finds the checkout, its
# Python and the site setup, turns a Slurm array index into a seed, and runs commands, or prints
# them in a dry run. Nothing about a particular cluster lives here or anywhere in scripts/.
#
# Environment (all optional):
#   CRAFTAX_ROOT     the repository checkout; default: the checkout holding this file
#   CRAFTAX_PYTHON   the Python to run; default: $CRAFTAX_ROOT/.venv/bin/python if present, else python3
#   CRAFTAX_SETUP    a shell file sourced before anything runs: module loads, conda activate,
#                    cache or proxy variables of your site
#   CRAFTAX_SEED     seed of array task 0; array task i trains seed CRAFTAX_SEED + i (default 0)
#   CRAFTAX_DRY_RUN  if non-empty: print each command (a line starting with "+ ") instead of running it

CRAFTAX_ROOT="${CRAFTAX_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
export CRAFTAX_ROOT

craftax_die() {
    echo "error: $*" >&2
    exit 2
}

# cd to the checkout, source the site setup, and set PYTHON.
craftax_setup() {
    cd "$CRAFTAX_ROOT" || craftax_die "CRAFTAX_ROOT=$CRAFTAX_ROOT is not a folder"
    if [[ -n "${CRAFTAX_SETUP:-}" ]]; then
        [[ -f "$CRAFTAX_SETUP" ]] || craftax_die "CRAFTAX_SETUP=$CRAFTAX_SETUP does not exist"
        # shellcheck disable=SC1090
        source "$CRAFTAX_SETUP"
    fi
    if [[ -n "${CRAFTAX_PYTHON:-}" ]]; then
        PYTHON="$CRAFTAX_PYTHON"
    elif [[ -x "$CRAFTAX_ROOT/.venv/bin/python" ]]; then
        PYTHON="$CRAFTAX_ROOT/.venv/bin/python"
    else
        PYTHON="$(command -v python3 || true)"
        [[ -n "$PYTHON" ]] || craftax_die "no Python found: set CRAFTAX_PYTHON to the interpreter of your environment"
    fi
    export PYTHON
}

# The seed of this array task (CRAFTAX_SEED + SLURM_ARRAY_TASK_ID; outside an array, CRAFTAX_SEED).
craftax_seed() {
    echo $(( ${CRAFTAX_SEED:-0} + ${SLURM_ARRAY_TASK_ID:-0} ))
}

# Run the script's final command in place of the shell, so Slurm's signals reach it directly.
craftax_run() {
    if [[ -n "${CRAFTAX_DRY_RUN:-}" ]]; then
        echo "+ $(printf '%q ' "$@")"
        exit 0
    fi
    exec "$@"
}

# Run a command and come back (a step of a longer script).
craftax_call() {
    if [[ -n "${CRAFTAX_DRY_RUN:-}" ]]; then
        echo "+ $(printf '%q ' "$@")"
        return 0
    fi
    "$@"
}

# Start a command in the background; its process id is in $! afterwards.
craftax_spawn() {
    if [[ -n "${CRAFTAX_DRY_RUN:-}" ]]; then
        echo "+ $(printf '%q ' "$@") &"
        return 0
    fi
    "$@" &
}
