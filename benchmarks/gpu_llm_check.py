"""Hidden-state throughput of the GPU engines on a Qwen3-4B-shaped model, and their agreement with transformers.

Two prompt groups, each ``--prompts`` different texts of about ``--tokens`` tokens built from canonical
observation texts (``utils.text_obs``): ``observations`` (texts joined, so every prompt starts with the
common header every Craftax observation text has, about 90 tokens) and ``shared_prefix`` (a block of
``--prefix-tokens`` tokens, the same in every prompt as a long system prompt would be, then
observations). An engine's prefix cache reuses the shared part, which is where SGLang's hidden states
went wrong (issue 30). Each group is timed after a warm-up call, so the measured calls are at least the
engine's second on those prefixes.

Agreement: ``--engine transformers --save-states FILE`` computes every group's and layer's states with
the transformers backend (the reference definition of a layer and a pooling, ``utils/llm``) and saves
them with their prompts; an engine run with ``--baseline FILE`` then reports, per group and layer,
the max-abs-diff and the row-wise cosine similarity of its states against those, and both backends'
states/s. A cosine under ``--min-cosine`` makes the exit status 1. Agreement needs the same weights in
both, so it needs a model folder with weights: ``--write-model DIR`` writes the Qwen3-4B shape with
random weights (seeded; on the GPU, seconds) and the test tokenizer, or ``--model`` takes a real
checkpoint (``python -m utils.llm.download Qwen/Qwen3-4B --to DIR``). Without ``--model`` the engines
load Qwen3-4B's config with random weights of their own (``load_format="dummy"``: no weights on disk,
throughput only). The compute per token is the real model's either way; random weights make the values
meaningless but still comparable between backends.

    python -m benchmarks.gpu_llm_check --write-model runs/qwen3-4b-random            # 8 GB, seeded
    python -m benchmarks.gpu_llm_check --engine transformers --model runs/qwen3-4b-random --save-states base.npz
    python -m benchmarks.gpu_llm_check --engine vllm --model runs/qwen3-4b-random --baseline base.npz
    python -m benchmarks.gpu_llm_check --engine sglang --dry-run     # CPU: everything but the engine

``--dry-run`` builds the model folder and the prompts, checks their lengths, checks a ``--baseline``
against them and prints the engine arguments that would be used, then stops before importing the
engine: benchmarks/gpu_check.sh runs it on a CPU machine to catch mistakes before spending GPU time.
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from utils.errors import UserError, exit_on_user_error
from utils.testing.tiny_llm import PRESETS

ENV = "Craftax-Classic-Symbolic-v1"
GROUPS = ("observations", "shared_prefix")
# Sanity floor, not a measured figure: bf16 kernels that compute the same function agree far closer
# than this (the gpu tests ask for 0.999 on a 4-layer model); a wrong layer, pooling, normalisation
# or a prefix-cache mix-up lands well below it.
MIN_COSINE = 0.99


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


def shared_prefix_prompts(tokenizer, count: int, tokens: int, prefix_tokens: int, seed: int = 1) -> list[str]:
    """``count`` texts of about ``tokens`` tokens that all start with the same ``prefix_tokens``
    tokens (one observation-text block) and differ after it."""
    if not 0 < prefix_tokens < tokens:
        raise UserError(f"--prefix-tokens {prefix_tokens} must be between 1 and --tokens {tokens} - 1")
    prefix = long_prompts(tokenizer, 1, prefix_tokens, seed=seed)[0]
    tails = long_prompts(tokenizer, count, tokens - prefix_tokens, seed=seed + 1)
    return [f"{prefix}\n\n{tail}" for tail in tails]


def prompt_groups(tokenizer, count: int, tokens: int, prefix_tokens: int) -> dict[str, list[str]]:
    """Both groups; refused when a group's prompts are not all different (too few tokens after the
    shared part: the measurement would time a cache hit, not a prompt)."""
    groups = {"observations": long_prompts(tokenizer, count, tokens),
              "shared_prefix": shared_prefix_prompts(tokenizer, count, tokens, prefix_tokens)}
    for name, texts in groups.items():
        if len(set(texts)) < len(texts):
            raise UserError(f"the {name} prompts are not all different: raise --tokens or lower --prefix-tokens "
                            "(every observation text starts with the same header of about 90 tokens)")
    return groups


def agreement(got: np.ndarray, expected: np.ndarray) -> dict:
    """How close an engine's states ``got`` are to the baseline's ``expected`` (both ``[N, D]``):
    the largest elementwise difference (absolute, and relative to the baseline's largest entry, since
    bf16 rounding scales with the values) and the row-wise cosine similarity (worst and mean; a zero
    row against a zero row counts as 1, against anything else as 0)."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    if got.shape != expected.shape or got.ndim != 2:
        raise ValueError(f"states of shape {got.shape} cannot be compared with the baseline's {expected.shape}")
    if not (np.isfinite(got).all() and np.isfinite(expected).all()):
        raise ValueError("non-finite hidden states cannot be compared")
    diff = np.abs(got - expected).max(initial=0.0)
    scale = np.abs(expected).max(initial=0.0)
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    both_zero = (np.linalg.norm(got, axis=1) == 0) & (np.linalg.norm(expected, axis=1) == 0)
    cosine = np.where(norms > 0, (got * expected).sum(1) / np.where(norms > 0, norms, 1.0), both_zero * 1.0)
    return {"rows": int(got.shape[0]), "max_abs_diff": float(diff), "max_abs_baseline": float(scale),
            "rel_max_abs_diff": float(diff / scale) if scale > 0 else float(diff > 0),
            "cosine_min": float(cosine.min(initial=1.0)), "cosine_mean": float(cosine.mean()) if len(cosine) else 1.0}


# ----------------------------------------------------------------------------------------------
# Baseline file: the transformers backend's states with the prompts they came from
# ----------------------------------------------------------------------------------------------


def _key(group: str, layer: int) -> str:
    return f"states__{group}__layer{layer}"


def save_baseline(path: str | Path, meta: dict, prompts: dict[str, list[str]],
                  states: dict[tuple[str, int], np.ndarray]) -> None:
    arrays = {f"prompts__{group}": np.array(texts) for group, texts in prompts.items()}
    arrays.update({_key(group, layer): value for (group, layer), value in states.items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)


def load_baseline(path: str | Path, prompts: dict[str, list[str]], model_revision: str | None) -> dict:
    """The saved meta and ``{(group, layer): states}``; refused (one line) when it was made from other
    prompts or other weights, since then no difference would mean anything."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"baseline {path} does not exist; make it first with --engine transformers "
                        f"--save-states {path}")
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        for group, texts in prompts.items():
            saved = data.get(f"prompts__{group}")
            if saved is None or saved.tolist() != list(texts):
                raise UserError(f"baseline {path} was computed on other {group} prompts; give the same --prompts, "
                                "--tokens and --prefix-tokens as its --engine transformers run")
        states = {(group, int(key.rsplit("__layer", 1)[1])): data[key]
                  for key in data.files if key.startswith("states__")
                  for group in [key.split("__")[1]]}
    if model_revision and meta.get("model_revision") and meta["model_revision"] != model_revision:
        raise UserError(f"baseline {path} was computed with other weights ({meta['model_revision']}, here "
                        f"{model_revision}); give the same --model")
    return {"meta": meta, "states": states}


# ----------------------------------------------------------------------------------------------
# The engines
# ----------------------------------------------------------------------------------------------


def engine_plan(engine: str, spec, num_layers: int) -> dict:
    """The arguments the engine would get (its installed API is not consulted in a dry run)."""
    from utils.llm import model_config, resolve_layer, truncation_overrides
    from utils.llm.sglang_engine import sglang_engine_options
    from utils.llm.vllm_engine import vllm_engine_options

    if engine == "transformers":
        return {"device": spec.device, "dtype": spec.dtype, "batch_size": spec.batch_size}
    if engine == "sglang":
        return sglang_engine_options(spec, ["enable_return_hidden_states"])
    index = resolve_layer(spec.layer, num_layers, spec.model)
    truncation = truncation_overrides(model_config(spec.model), max(index, 1))
    return vllm_engine_options(spec, index, num_layers, pooler_params=["pooling_type", "use_activation"],
                               extract_dir="<tmp under /dev/shm>", truncation=truncation)


def has_weights(model: str) -> bool:
    """Whether ``model`` comes with weights: a folder holding weight files, or a hub id (from the hub's
    cache). A folder with a config only is what the engines fill with random weights (dummy)."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return True
    return any(p.suffix in (".safetensors", ".bin") for p in folder.iterdir())


def measure(backend, prompts: list[str], repeats: int) -> tuple[dict, np.ndarray]:
    """Best time over ``repeats`` calls after a warm-up on the first prompts (graphs, compilation,
    and for the shared-prefix group a prefix already cached), and the last call's states."""
    backend.hidden_states(prompts[: min(8, len(prompts))])
    times, states = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        states = backend.hidden_states(prompts)
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"seconds": best, "states_per_s": len(prompts) / best, "dim": int(states.shape[1])}, states


def check_args(args: argparse.Namespace) -> None:
    """What argparse cannot say on its own, as one line each."""
    if args.write_model:
        return
    if args.engine is None:
        raise UserError("give --engine vllm|sglang|transformers (or --write-model DIR, or --summarize OUT_DIR)")
    for name in ("prompts", "tokens", "repeats", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.save_states and args.engine != "transformers":
        raise UserError("--save-states is for --engine transformers (the baseline the engines are compared with)")
    if not args.dry_run and (args.baseline or args.save_states) and not (args.model and has_weights(args.model)):
        raise UserError("agreement needs the same weights in both backends: give --model a folder with weights "
                        "(--write-model DIR writes one; or a real checkpoint)")
    if args.engine == "transformers" and not args.dry_run and not args.model:
        raise UserError("--engine transformers needs --model with weights (--write-model DIR writes one)")
    if not 0 <= args.min_cosine <= 1:
        raise UserError("--min-cosine must be between 0 and 1")


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_llm_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["vllm", "sglang", "transformers"], default=None)
    parser.add_argument("--prompts", type=int, default=512, help="prompts per group")
    parser.add_argument("--tokens", type=int, default=500, help="approximate tokens per prompt")
    parser.add_argument("--prefix-tokens", type=int, default=300,
                        help="tokens every prompt of the shared_prefix group starts with")
    parser.add_argument("--layers", type=int, nargs="+", default=[-1, 18],
                        help="layers to time (vLLM, transformers: an intermediate one too; SGLang: last only)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default=None,
                        help="model folder (with weights: real loading and agreement possible; default: "
                             "Qwen3-4B's config in a temp folder, engines draw random weights)")
    parser.add_argument("--model-dir", default=None,
                        help="where to write the weightless config (default: a temp folder)")
    parser.add_argument("--write-model", default=None, metavar="DIR",
                        help="write a --shape model with seeded random weights into DIR and exit")
    parser.add_argument("--shape", default="qwen3-4b", choices=list(PRESETS),
                        help="utils/testing/tiny_llm.py preset for --write-model")
    parser.add_argument("--save-states", default=None, metavar="FILE", help="transformers: save the baseline here")
    parser.add_argument("--baseline", default=None, metavar="FILE", help="compare with this transformers baseline")
    parser.add_argument("--min-cosine", type=float, default=MIN_COSINE,
                        help="exit 1 when any row's cosine with the baseline is below this")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (float32 for the CPU check)")
    parser.add_argument("--device", default="auto", help="transformers backend's device")
    parser.add_argument("--batch-size", type=int, default=16, help="transformers backend's prompts per pass")
    parser.add_argument("--dry-run", action="store_true", help="stop before starting the engine")
    parser.add_argument("--summarize", default=None, metavar="OUT_DIR",
                        help="print the agreement table of a gpu_check.sh output folder and exit")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    check_args(args)

    from utils.testing.tiny_llm import build_tiny_llm

    if args.write_model:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        start = time.perf_counter()
        path = build_tiny_llm(args.write_model, args.shape, weights=True, device=device)
        print(json.dumps({"wrote_model": path, "shape": args.shape, "device": device,
                          "seconds": time.perf_counter() - start}), flush=True)
        return 0
    if args.model:
        return run(args, args.model)
    with tempfile.TemporaryDirectory(prefix="qwen3-4b-shaped-") as scratch:
        model = build_tiny_llm(args.model_dir or scratch, "qwen3-4b", weights=False)
        return run(args, model)


def run(args, model: str) -> int:
    from utils.llm import LLMSpec, PromptBuilder, load_tokenizer, model_dims, model_revision

    num_layers, hidden = model_dims(model)
    tokenizer = load_tokenizer(model)
    groups = prompt_groups(tokenizer, args.prompts, args.tokens, args.prefix_tokens)
    layers = [layer for layer in args.layers if args.engine != "sglang" or layer == -1]
    base = LLMSpec(model=model, backend=args.engine, pooling="last", max_length=2 * args.tokens + 256,
                   dtype=args.dtype, device=args.device if args.engine == "transformers" else "auto",
                   batch_size=args.batch_size)
    weights = has_weights(model)
    revision = model_revision(model) if weights else None
    # A dry run plans the steps before the baseline exists: it checks one only if it is already there.
    check_baseline = args.baseline and (not args.dry_run or Path(args.baseline).is_file())
    baseline = load_baseline(args.baseline, groups, revision) if check_baseline else None
    builder = PromptBuilder(base, tokenizer)
    summary = {"engine": args.engine, "model": model if args.model else "Qwen3-4B-shaped (random weights)",
               "weights": "loaded" if weights else "dummy", "layers_total": num_layers, "hidden_size": hidden,
               "prompts": args.prompts, "dtype": args.dtype}
    tokens = {group: [len(ids) for ids in builder.encode(texts)] for group, texts in groups.items()}
    engine_options = None if weights or args.engine == "transformers" else {"load_format": "dummy"}
    if args.dry_run:
        for layer in layers:
            plan = engine_plan(args.engine, base.replace(layer=layer), num_layers)
            for group in GROUPS:
                print(json.dumps({**summary, "layer": layer, "group": group, "dry_run": True,
                                  "mean_prompt_tokens": float(np.mean(tokens[group])),
                                  "shared_prefix_tokens": shared_prefix_length(builder, groups[group]),
                                  "agreement": {"baseline": args.baseline, "min_cosine": args.min_cosine,
                                                "checked_against_prompts": baseline is not None},
                                  "save_states": args.save_states,
                                  "engine_options": {**plan, **(engine_options or {})}}, default=str), flush=True)
        return 0

    from utils.llm import make_backend

    saved: dict[tuple[str, int], np.ndarray] = {}
    rates: dict[str, float] = {}  # states/s per group/layer, saved with a baseline to show beside each engine's
    worst = 1.0
    for layer in layers:
        spec = base.replace(layer=layer)
        start = time.perf_counter()
        backend = make_backend(spec, engine_options=engine_options)
        startup = time.perf_counter() - start
        for group in GROUPS:
            timing, states = measure(backend, groups[group], args.repeats)
            row = {**summary, "layer": layer, "group": group, "startup_s": startup, **timing,
                   "mean_prompt_tokens": float(np.mean(tokens[group])),
                   # vLLM runs a truncated model only where its weights allow it (vllm_truncation_plan):
                   # truncated and full-model throughput are different figures, so each row says which.
                   "truncated": getattr(backend, "truncated", None),
                   "loaded_layers": getattr(backend, "loaded_layers", None)}
            row["tokens_per_s"] = row["states_per_s"] * row["mean_prompt_tokens"]
            if args.save_states:
                saved[(group, layer)] = states
                rates[f"{group}/{layer}"] = row["states_per_s"]
            if baseline is not None:
                row.update(compare_row(baseline, group, layer, states))
                worst = min(worst, row["agreement"]["cosine_min"] if row["agreement"] else 1.0)
            print(json.dumps(row), flush=True)
        if hasattr(backend, "close"):
            backend.close()
        del backend
        _free_gpu_memory()
    if args.save_states:
        save_baseline(args.save_states, {"model": model, "model_revision": revision, "dtype": args.dtype,
                                         "engine": args.engine, "states_per_s": rates}, groups, saved)
        print(json.dumps({"saved_states": args.save_states, "keys": sorted(f"{g}/{k}" for g, k in saved)}))
    if worst < args.min_cosine:
        print(f"error: {args.engine} disagrees with the baseline: cosine {worst:.6f} < --min-cosine "
              f"{args.min_cosine}", file=sys.stderr)
        return 1
    return 0


def compare_row(baseline: dict, group: str, layer: int, states: np.ndarray) -> dict:
    """The agreement fields of one measurement row (None where the baseline lacks the layer)."""
    expected = baseline["states"].get((group, layer))
    meta = baseline["meta"]
    rates = meta.get("states_per_s", {})
    return {"agreement": None if expected is None else agreement(states, expected),
            "baseline_engine": meta.get("engine"), "baseline_dtype": meta.get("dtype"),
            "baseline_states_per_s": rates.get(f"{group}/{layer}")}


def shared_prefix_length(builder, prompts: list[str]) -> int:
    """Tokens that every prompt's ids start with (what a prefix cache can reuse)."""
    ids = builder.encode(prompts)
    length = min(map(len, ids))
    for i in range(length):
        if any(row[i] != ids[0][i] for row in ids[1:]):
            return i
    return length


def summarize(out_dir: str | Path) -> str:
    """The agreement table of a gpu_check.sh run: every measured row with a baseline, from the
    JSON lines of ``OUT_DIR/llm_*.log`` (dry-run plans are left out)."""
    rows = []
    for log in sorted(Path(out_dir).glob("llm_*.log")):
        for line in log.read_text().splitlines():
            if line.startswith("{"):
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if "agreement" in row and not row.get("dry_run"):
                    rows.append(row)
    lines = ["", "Agreement with the transformers backend (same weights, prompts and dtype; cosine per row):", ""]
    if not rows:
        return "\n".join(lines + ["no agreement measured (a baseline or engine step failed: see its log)", ""])
    lines += ["| engine | layer | group | states/s | transformers states/s | max abs diff | rel. to max | "
              "cosine min | cosine mean |", "|---|---|---|---|---|---|---|---|---|"]

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for row in rows:
        agree = row["agreement"] or {}
        lines.append(f"| {row['engine']} | {row['layer']} | {row['group']} | {fmt(row.get('states_per_s'), '.1f')} "
                     f"| {fmt(row.get('baseline_states_per_s'), '.1f')} | {fmt(agree.get('max_abs_diff'), '.3g')} "
                     f"| {fmt(agree.get('rel_max_abs_diff'), '.3g')} | {fmt(agree.get('cosine_min'), '.6f')} "
                     f"| {fmt(agree.get('cosine_mean'), '.6f')} |")
    return "\n".join(lines + [""])


def _free_gpu_memory() -> None:
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
