#!/usr/bin/env bash
# GPU check, with no network, on one CUDA GPU:
#   1. a Qwen3-4B-shaped model with seeded random weights written to $OUT_DIR/model (the test tokenizer;
#      or LLM_MODEL=DIR, a real checkpoint from `python -m utils.llm.download Qwen/Qwen3-4B --to DIR`);
#   2. its hidden states with the transformers backend (the baseline, saved with their prompts);
#   3. vLLM and SGLang on the same model and prompts, ~500 tokens each, in two groups (observation texts,
#      which share their ~90-token header, and the same with a 300-token block before them, as a system
#      prompt would be): states/s, and max-abs-diff and cosine against the baseline
#      (benchmarks/gpu_llm_check.py; a cosine under 0.99 fails the step);
#   4. the gpu-marked tests (engines against transformers on a small bf16 model, head_dim 64), and the
#      vision-language step: vLLM's multimodal pooling against transformers on the tiny VLM's gpu shape
#      (tests/test_vlm.py, frames of Craftax-Classic-Pixels);
#   5. PPO and Dreamer throughput on the GPU (benchmarks/ppo_sps.py, benchmarks/dreamer_sps.py).
# Every step has its own time limit; a failing or missing step is recorded and the next one runs.
# Results: $OUT_DIR/summary.md (an agreement table, then every measurement) and one log per step.
#
#   bash benchmarks/gpu_check.sh             # GPU machine: pip install -e ".[cuda,llm,vllm]" (or sglang, README)
#   bash benchmarks/gpu_check.sh --dry-run   # on a CPU: everything up to the engine calls, and the list of steps
#
# Environment: PYTHON (default: python), OUT_DIR (default: runs/gpu_check/<time>), LLM_MODEL (see 1.).
set -uo pipefail

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "error: unknown argument $arg (use --dry-run or nothing)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT_DIR=${OUT_DIR:-runs/gpu_check/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.md"
# No network: everything is local (config, tokenizer, random weights); fail instead of downloading.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export PYTHONUNBUFFERED=1

has() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)$([ $DRY_RUN = 1 ] && echo ' (dry run)')"
  echo
  echo "| step | status | seconds | log |"
  echo "|---|---|---|---|"
} > "$SUMMARY"
FAILED=0

# step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT_DIR/NAME.log, add a summary row.
step() {
  local name=$1 limit=$2; shift 2
  local log="$OUT_DIR/$name.log" start end rc status
  echo "== $name (limit ${limit}s): $*"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  end=$(date +%s)
  case $rc in
    0) status=ok ;;
    124|137) status="timed out"; FAILED=1 ;;
    *) status="failed (exit $rc)"; FAILED=1 ;;
  esac
  echo "   $status in $((end - start)) s; log: $log"
  echo "| $name | $status | $((end - start)) | $log |" >> "$SUMMARY"
}

skip() {
  echo "== $1: skipped ($2)"
  echo "| $1 | skipped: $2 | 0 | |" >> "$SUMMARY"
}

# Time limits: NOT yet measured on this project's GPU (none has run this script). They are cold-start
# guesses with a wide margin: a fresh vLLM or SGLang engine typically takes 60-120 s to start (weights,
# torch.compile, CUDA graphs), the first PPO/Dreamer program 160 s to compile (measured on this project's
# CPU, docs/results.md "First run"). After a first real run, set each to about twice its measured time
# here, and put the measured times in docs/results.md ("GPU check"). Worst case, all limits together:
# about 60 minutes; a run where every step works takes far less.
LIMIT_MODEL=300         # write 4B random weights (8 GB) from the GPU
LIMIT_BASELINE=420      # transformers, 2 layers x 2 groups x 512 prompts, 2 model loads
LIMIT_ENGINE=420        # one engine start (2 x 120 s) + 2 groups x 3 calls
LIMIT_ENGINE_TWICE=600  # vLLM's intermediate layer: a truncated start that may fail, then the full model
LIMIT_VLLM_TESTS=720    # four fresh vLLM engines (4 x 120 s) + transformers, with 1.5x margin
LIMIT_SGLANG_TESTS=420  # two fresh SGLang engines (2 x 120 s) + transformers, with 1.5x margin
LIMIT_VLM_TESTS=420     # two fresh vLLM multimodal engines (2 x 120 s) + transformers, with 1.5x margin
LIMIT_PPO=300           # one compile (160 s on a CPU) + 2 x 2 updates
LIMIT_DREAMER=420       # Dreamer V3 size s: compile + 2 x 5 updates

MODEL_DIR=${LLM_MODEL:-$OUT_DIR/model}
BASELINE="$OUT_DIR/transformers_states.npz"
LLM_CHECK=("$PY" -m benchmarks.gpu_llm_check --prompts 512 --tokens 500 --prefix-tokens 300)
WRITE_MODEL=("$PY" -m benchmarks.gpu_llm_check --write-model "$MODEL_DIR" --shape qwen3-4b)
TRANSFORMERS=("${LLM_CHECK[@]}" --engine transformers --device cuda --model "$MODEL_DIR" --save-states "$BASELINE")
VLLM_TESTS=("$PY" -m pytest -q -m gpu -k vllm tests/test_llm_backends.py)
SGLANG_TESTS=("$PY" -m pytest -q -m gpu -k sglang tests/test_llm_backends.py)
VLM_TESTS=("$PY" -m pytest -q -m gpu -k vllm tests/test_vlm.py)
PPO=("$PY" -m benchmarks.ppo_sps --updates 2 --repeats 2 --env Craftax-Classic-Symbolic-v1 --num-envs 1024)
DREAMER=("$PY" -m benchmarks.dreamer_sps --versions 3 --sizes s --updates 5 --repeats 2)

# engine_cmd ENGINE LAYER: sets CMD to one engine step's command: on the model and against the baseline.
# If the model's step failed, the engine draws random weights itself (throughput only); if the baseline's
# did, the engine is timed without the agreement. A dry run lists the full command.
engine_cmd() {
  CMD=("${LLM_CHECK[@]}" --engine "$1" --layers "$2")
  if [ $DRY_RUN = 1 ] || [ -f "$MODEL_DIR/config.json" ]; then CMD+=(--model "$MODEL_DIR"); fi
  if [ $DRY_RUN = 1 ] || [ -f "$BASELINE" ]; then CMD+=(--baseline "$BASELINE"); fi
}

# would NAME LIMIT_S COMMAND...: a dry run's line for a GPU step (listed and in the summary, not run).
would() {
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): would run on the GPU: $*"
  echo "| $name | would run (limit ${limit} s): \`$*\` | 0 | |" >> "$SUMMARY"
}

if [ $DRY_RUN = 1 ]; then
  # Everything the GPU run needs except the GPU: model folder, prompts, engine arguments, the agreement
  # maths end to end (the transformers backend on the tiny model, compared with its own saved states),
  # test collection and the benchmark scripts' imports; then the GPU steps, listed.
  TINY="$OUT_DIR/tiny_llm"
  TINY_CHECK=("$PY" -m benchmarks.gpu_llm_check --engine transformers --device cpu --dtype float32
              --model "$TINY" --prompts 8 --tokens 240 --prefix-tokens 100 --layers -1 1)
  step llm_vllm_plan 300 "${LLM_CHECK[@]}" --engine vllm --prompts 16 --dry-run
  step llm_sglang_plan 300 "${LLM_CHECK[@]}" --engine sglang --prompts 16 --dry-run
  step agreement_model_cpu 300 "$PY" -m benchmarks.gpu_llm_check --write-model "$TINY" --shape tiny
  step agreement_baseline_cpu 300 "${TINY_CHECK[@]}" --save-states "$OUT_DIR/tiny_states.npz"
  step llm_agreement_cpu 300 "${TINY_CHECK[@]}" --baseline "$OUT_DIR/tiny_states.npz"
  step gpu_tests_collect 300 "$PY" -m pytest --collect-only -q -m gpu tests/test_llm_backends.py tests/test_vlm.py
  step benchmark_imports 300 "$PY" -c "import benchmarks.ppo_sps, benchmarks.dreamer_sps, benchmarks.gpu_llm_check"
  [ -n "${LLM_MODEL:-}" ] || would llm_model $LIMIT_MODEL "${WRITE_MODEL[@]}"
  would llm_transformers $LIMIT_BASELINE "${TRANSFORMERS[@]}"
  engine_cmd vllm -1; would llm_vllm_last $LIMIT_ENGINE "${CMD[@]}"
  engine_cmd vllm 18; would llm_vllm_layer18 $LIMIT_ENGINE_TWICE "${CMD[@]}"
  would gpu_tests_vllm $LIMIT_VLLM_TESTS "${VLLM_TESTS[@]}"
  would gpu_tests_vlm $LIMIT_VLM_TESTS "${VLM_TESTS[@]}"
  engine_cmd sglang -1; would llm_sglang_last $LIMIT_ENGINE "${CMD[@]}"
  would gpu_tests_sglang $LIMIT_SGLANG_TESTS "${SGLANG_TESTS[@]}"
  would ppo_gpu $LIMIT_PPO "${PPO[@]}"
  would dreamer_gpu $LIMIT_DREAMER "${DREAMER[@]}"
else
  if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "error: no CUDA GPU visible to torch; run with --dry-run on a CPU machine" >&2
    exit 2
  fi
  nvidia-smi -L >> "$SUMMARY" 2>/dev/null || true
  # One engine per process: each claims its GPU memory share until the process exits.
  export VLLM_GPU_MEMORY_UTILIZATION=0.5 SGLANG_MEM_FRACTION_STATIC=0.5
  if [ -n "${LLM_MODEL:-}" ]; then
    skip llm_model "LLM_MODEL=$LLM_MODEL given"
  else
    step llm_model $LIMIT_MODEL "${WRITE_MODEL[@]}"
  fi
  step llm_transformers $LIMIT_BASELINE "${TRANSFORMERS[@]}"
  if has vllm; then
    engine_cmd vllm -1; step llm_vllm_last $LIMIT_ENGINE "${CMD[@]}"
    engine_cmd vllm 18; step llm_vllm_layer18 $LIMIT_ENGINE_TWICE "${CMD[@]}"
    step gpu_tests_vllm $LIMIT_VLLM_TESTS "${VLLM_TESTS[@]}"
    step gpu_tests_vlm $LIMIT_VLM_TESTS "${VLM_TESTS[@]}"
  else
    skip vllm "vllm not installed (pip install -e '.[cuda,llm,vllm]')"
  fi
  if has sglang; then
    engine_cmd sglang -1; step llm_sglang_last $LIMIT_ENGINE "${CMD[@]}"
    step gpu_tests_sglang $LIMIT_SGLANG_TESTS "${SGLANG_TESTS[@]}"
  else
    skip sglang "sglang not installed (pip install -e '.[cuda,llm,sglang]' --extra-index-url https://pypi.nvidia.com)"
  fi
  step ppo_gpu $LIMIT_PPO "${PPO[@]}"
  step dreamer_gpu $LIMIT_DREAMER "${DREAMER[@]}"
  # The random model is 8 GB of nothing worth keeping; a given LLM_MODEL is the user's.
  [ -n "${LLM_MODEL:-}" ] || rm -rf "$MODEL_DIR"
fi

"$PY" -m benchmarks.gpu_llm_check --summarize "$OUT_DIR" >> "$SUMMARY" 2>&1 || true

{
  echo
  echo "Measurements (one JSON object per line, from the logs):"
  echo
  echo '```'
  grep -h '^{' "$OUT_DIR"/llm_*.log 2>/dev/null | grep -v '"dry_run": true' || true
  "$PY" - "$OUT_DIR" <<'EOF' || true
import json, pathlib, sys
for name in ("ppo_gpu", "dreamer_gpu"):
    log = pathlib.Path(sys.argv[1]) / f"{name}.log"
    if log.is_file():
        text = log.read_text()
        start = text.find("{")
        if start >= 0:
            try:
                print(name, json.dumps(json.loads(text[start:text.rfind("}") + 1])))
            except ValueError:
                print(name, text[start:].splitlines()[0])
EOF
  echo '```'
} >> "$SUMMARY"
echo "summary: $SUMMARY"
cat "$SUMMARY"
exit $FAILED
