#!/usr/bin/env bash
# GPU check: in under 10 minutes, with no network, on one CUDA GPU:
#   1. vLLM and SGLang hidden-state throughput on a Qwen3-4B-shaped model with random weights
#      (load_format="dummy", the test tokenizer), ~500-token prompts (benchmarks/gpu_llm_check.py);
#   2. the gpu-marked tests (engines against transformers on a small bf16 model, head_dim 64);
#   3. PPO and Dreamer throughput on the GPU (benchmarks/ppo_sps.py, benchmarks/dreamer_sps.py).
# Every step has its own time limit (their sum is under 10 minutes); a failing or missing step is
# recorded and the next one runs. Results: $OUT_DIR/summary.md and one log per step.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine (pip install -e ".[cuda,llm,vllm]")
#   bash benchmarks/gpu_check.sh --dry-run   # on a CPU: everything up to the engine calls
#
# Environment: PYTHON (default: python), OUT_DIR (default: runs/gpu_check/<time>).
set -uo pipefail

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
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

LLM_CHECK=("$PY" -m benchmarks.gpu_llm_check --prompts 512 --tokens 500)
PPO=("$PY" -m benchmarks.ppo_sps --updates 2 --repeats 2 --env Craftax-Classic-Symbolic-v1 --num-envs 1024)
DREAMER=("$PY" -m benchmarks.dreamer_sps --versions 3 --sizes s --updates 5 --repeats 2)

if [ $DRY_RUN = 1 ]; then
  # Everything the GPU run needs except the GPU: model folder, prompts, engine arguments, test
  # collection and the benchmark scripts' imports.
  step llm_vllm_plan 300 "${LLM_CHECK[@]}" --engine vllm --prompts 16 --dry-run
  step llm_sglang_plan 300 "${LLM_CHECK[@]}" --engine sglang --prompts 16 --dry-run
  step gpu_tests_collect 300 "$PY" -m pytest --collect-only -q -m gpu tests/test_llm_backends.py
  step benchmark_imports 300 "$PY" -c "import benchmarks.ppo_sps, benchmarks.dreamer_sps, benchmarks.gpu_llm_check"
  for cmd in "${PPO[*]}" "${DREAMER[*]}"; do echo "   would run: $cmd"; done
else
  if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "error: no CUDA GPU visible to torch; run with --dry-run on a CPU machine" >&2
    exit 2
  fi
  nvidia-smi -L >> "$SUMMARY" 2>/dev/null || true
  # One engine per process: each claims its GPU memory share until the process exits.
  export VLLM_GPU_MEMORY_UTILIZATION=0.5 SGLANG_MEM_FRACTION_STATIC=0.5
  if has vllm; then
    step llm_vllm_last 120 "${LLM_CHECK[@]}" --engine vllm --layers -1
    step llm_vllm_layer18 90 "${LLM_CHECK[@]}" --engine vllm --layers 18
    step gpu_tests_vllm 90 "$PY" -m pytest -q -m gpu -k vllm tests/test_llm_backends.py
  else
    skip vllm "vllm not installed (pip install -e '.[llm,vllm]')"
  fi
  if has sglang; then
    step llm_sglang_last 100 "${LLM_CHECK[@]}" --engine sglang --layers -1
    step gpu_tests_sglang 60 "$PY" -m pytest -q -m gpu -k sglang tests/test_llm_backends.py
  else
    skip sglang "sglang not installed (pip install -e '.[llm,sglang]')"
  fi
  step ppo_gpu 45 "${PPO[@]}"
  step dreamer_gpu 60 "${DREAMER[@]}"
fi

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
