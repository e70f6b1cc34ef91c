"""Hidden-state throughput of the GPU engines on a Qwen3-4B-shaped model, with no download.

The model folder holds Qwen3-4B's config and the tiny test tokenizer (``utils/testing/tiny_llm.py``,
preset ``qwen3-4b``, no weights); the engine fills the weights with random values
(``load_format="dummy"``). The compute per token is that of the real model, so the throughput is
the real model's; the values are meaningless. Prompts are canonical observation texts
(``utils.text_obs``), joined until each is about ``--tokens`` tokens long.

    python -m benchmarks.gpu_llm_check --engine vllm --prompts 512 --tokens 500
    python -m benchmarks.gpu_llm_check --engine sglang --dry-run     # CPU: everything but the engine

``--dry-run`` builds the model folder and the prompts, checks their lengths and prints the engine
arguments that would be used, then stops before importing the engine: benchmarks/gpu_check.sh
runs it on a CPU machine to catch mistakes before spending GPU time. Prints one JSON line per
measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

ENV = "Craftax-Classic-Symbolic-v1"


def long_prompts(tokenizer, count: int, tokens: int, seed: int = 0) -> list[str]:
    """``count`` different texts of about ``tokens`` tokens: observation texts joined by blank
    lines, cut at ``tokens`` tokens (re-encoding the cut text may move a token or two)."""
    from benchmarks.text_obs_speed import synthetic_observations
    from utils.text_obs import render_texts

    pool = render_texts(synthetic_observations(ENV, max(count, 8) * 4, seed), ENV)
    lengths = [len(tokenizer(t)["input_ids"]) for t in pool]
    prompts, cursor = [], 0
    for _ in range(count):
        parts, total = [], 0
        while total < tokens:
            parts.append(pool[cursor % len(pool)])
            total += lengths[cursor % len(pool)] + 1
            cursor += 1
        ids = tokenizer("\n\n".join(parts))["input_ids"][:tokens]
        prompts.append(tokenizer.decode(ids))
    return prompts


def engine_plan(engine: str, spec, num_layers: int) -> dict:
    """The arguments the engine would get (its installed API is not consulted in a dry run)."""
    from utils.llm import model_config, resolve_layer, truncation_overrides
    from utils.llm.sglang_engine import sglang_engine_options
    from utils.llm.vllm_engine import vllm_engine_options

    if engine == "sglang":
        return sglang_engine_options(spec, ["enable_return_hidden_states"])
    index = resolve_layer(spec.layer, num_layers, spec.model)
    truncation = truncation_overrides(model_config(spec.model), max(index, 1))
    return vllm_engine_options(spec, index, num_layers, pooler_params=["pooling_type", "use_activation"],
                               extract_dir="<tmp under /dev/shm>", truncation=truncation)


def measure(backend, prompts: list[str], repeats: int) -> dict:
    backend.hidden_states(prompts[: min(8, len(prompts))])  # warm-up (graphs, compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        states = backend.hidden_states(prompts)
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"seconds": best, "prompts_per_s": len(prompts) / best, "dim": int(states.shape[1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["vllm", "sglang"], required=True)
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=500, help="approximate tokens per prompt")
    parser.add_argument("--layers", type=int, nargs="+", default=[-1, 18],
                        help="layers to time (vLLM: an intermediate one too; SGLang: last only)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model-dir", default=None, help="where to write the config (default: a temp folder)")
    parser.add_argument("--dry-run", action="store_true", help="stop before starting the engine")
    args = parser.parse_args(argv)

    from utils.testing.tiny_llm import build_tiny_llm

    with tempfile.TemporaryDirectory(prefix="qwen3-4b-shaped-") as scratch:
        model = build_tiny_llm(args.model_dir or scratch, "qwen3-4b", weights=False)
        return run(args, model)


def run(args, model: str) -> int:
    from utils.llm import LLMSpec, PromptBuilder, load_tokenizer, model_dims


    num_layers, hidden = model_dims(model)
    tokenizer = load_tokenizer(model)
    prompts = long_prompts(tokenizer, args.prompts, args.tokens)
    layers = [layer for layer in args.layers if args.engine == "vllm" or layer == -1]
    base = LLMSpec(model=model, backend=args.engine, pooling="last", max_length=2 * args.tokens + 256,
                   dtype="bfloat16")
    ids = PromptBuilder(base, tokenizer).encode(prompts)
    summary = {"engine": args.engine, "model": "Qwen3-4B-shaped (random weights)", "layers_total": num_layers,
               "hidden_size": hidden, "prompts": len(prompts),
               "mean_prompt_tokens": sum(map(len, ids)) / len(ids)}
    if args.dry_run:
        for layer in layers:
            plan = engine_plan(args.engine, base.replace(layer=layer), num_layers)
            print(json.dumps({**summary, "layer": layer, "dry_run": True, "engine_options": plan},
                             default=str), flush=True)
        return 0

    from utils.llm import make_backend

    for layer in layers:
        spec = base.replace(layer=layer)
        start = time.perf_counter()
        backend = make_backend(spec, engine_options={"load_format": "dummy"})
        startup = time.perf_counter() - start
        row = {**summary, "layer": layer, "startup_s": startup, **measure(backend, prompts, args.repeats)}
        row["tokens_per_s"] = row["prompts_per_s"] * summary["mean_prompt_tokens"]
        print(json.dumps(row), flush=True)
        if hasattr(backend, "close"):
            backend.close()
        del backend
    return 0


if __name__ == "__main__":
    sys.exit(main())
