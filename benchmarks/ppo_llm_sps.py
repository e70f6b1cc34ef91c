"""Training throughput of PPO with live LLM features at several skip_n, against plain PPO, in one run.

Every method trains on the same env with the same num_envs, rollout length and network width: plain
PPO (``online_rl.ppo``, one compiled chunk) and PPO-LLM (``online_rl_llm.ppo_llm``: compiled
segments, with features refreshed every skip_n steps and at episode starts). After warm-up calls
that compile each of them, the timed calls go round robin (PPO, skip 1, skip 25, ..., PPO, ...) so
background load on a shared machine hits every method alike. Each PPO-LLM variant keeps its own
text cache, warm from the earlier calls. Reported per method: steps/s over all timed calls together,
that figure as a fraction of PPO's, the share of the wall time spent in the LLM and in all feature
work (rendering, cache, LLM), the cache hit rate and the texts sent to the LLM per 1,000 env steps.
Choose ``num_steps * updates`` as a multiple of the largest skip_n, so that every timed call holds
the same number of refreshes.

On a pixel env (``--env Craftax-Classic-Pixels-v1``) both sides are pixel PPO (the CNN) and the
features are of frames through a vision-language model (``benchmarks.ppo_vlm_sps`` runs that with
its defaults). ``--table PATH`` also writes the result as a measured table (``benchmarks.records``,
every timed call kept) for ``benchmarks.report``.

    python -m benchmarks.ppo_llm_sps                      # tiny random model (utils/testing/tiny_llm.py), CPU
    python -m benchmarks.ppo_llm_sps --model Qwen/Qwen2.5-0.5B-Instruct --num-envs 1024 --num-steps 50 --updates 2
    python -m benchmarks.ppo_llm_sps --server-url http://127.0.0.1:8000   # features from a server
    python -m benchmarks.ppo_llm_sps --env Craftax-Classic-Pixels-v1 --skip-n 25   # tiny random VLM, frames
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import jax

from benchmarks import records
from benchmarks.common import machine_description
from online_rl import ppo
from online_rl_llm import ppo_llm
from online_rl_llm.features import LiveFeatures, encoder_identity, feature_modality, open_encoder
from utils import envs
from utils.jax_setup import enable_compilation_cache
from utils.llm import LLMSpec


def shared_fields(args) -> dict:
    return dict(env=args.env, num_envs=args.num_envs, num_steps=args.num_steps, layer_width=args.layer_width,
                num_minibatches=args.num_minibatches, update_epochs=args.update_epochs, reset_ratio=args.reset_ratio,
                progress=False)


def plain_ppo(args):
    """``run() -> info`` advancing one seed of plain PPO by ``args.updates`` updates."""
    cfg = ppo.PPOConfig(**shared_fields(args))
    env = envs.make(cfg.env, cfg.num_envs, reset_ratio=cfg.reset_ratio)
    algorithm = ppo.make_train(cfg, env, total_updates=10_000, save_rollout=False)
    step = jax.jit(lambda c: algorithm.train_chunk(c, args.updates))
    state = {"carry": jax.jit(algorithm.init)(jax.random.PRNGKey(0))}

    def run():
        state["carry"], logs, _ = step(state["carry"])
        jax.block_until_ready(logs)
        return {}

    return run


def ppo_with_features(args, skip_n: int, encoder):
    """``run() -> info`` advancing one seed of PPO-LLM; ``info`` holds the call's feature counters."""
    cfg = ppo_llm.PPOLLMConfig(**shared_fields(args), skip_n=skip_n, feature_width=args.feature_width)
    env = envs.make(cfg.env, cfg.num_envs, reset_ratio=cfg.reset_ratio)
    live = LiveFeatures(cfg.env, encoder, cfg.feature_cache_size)
    algorithm = ppo_llm.make_train(cfg, env, total_updates=10_000, dim=live.dim)
    runner = ppo_llm.Runner(cfg, algorithm, live)
    carry = jax.tree.map(lambda x: x[None], jax.jit(algorithm.init)(jax.random.PRNGKey(0)))
    state = {"carry": carry}

    def run():
        before, start = live.counters(), time.perf_counter()
        state["carry"], logs = runner.train_chunk(state["carry"], args.updates)
        jax.block_until_ready(state["carry"].params)
        return {"window": live.counters().since(before), "seconds": time.perf_counter() - start}

    return run


def summarise(name: str, seconds: list[float], infos: list[dict], steps: int, updates: int) -> dict:
    # All timed calls together, not the median call: with skip_n larger than a call's steps per env,
    # some calls hold a refresh of every env and others none.
    row = {"method": name, "steps_per_second": steps * len(seconds) / sum(seconds)}
    if infos and infos[0]:
        windows = [i["window"] for i in infos]
        wall = sum(i["seconds"] for i in infos)
        llm = sum(w.cache.encode_seconds for w in windows)
        lookups, hits = sum(w.cache.lookups for w in windows), sum(w.cache.hits for w in windows)
        row.update(
            llm_time_share=llm / wall,
            feature_time_share=sum(w.seconds for w in windows) / wall,
            cache_hit_rate=hits / lookups if lookups else None,
            llm_texts_per_1k_steps=1000 * sum(w.cache.encoded for w in windows) / (steps * len(windows)),
            refreshes_per_update=sum(w.calls for w in windows) / (len(windows) * updates),
        )
    return row


def markdown(rows: list[dict], ppo_sps: float | None) -> str:
    lines = ["| method | steps/s | vs PPO | LLM time | feature time | cache hits | LLM texts / 1k steps |",
             "|---|---|---|---|---|---|---|"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    for r in rows:
        rel = f"{r['steps_per_second'] / ppo_sps:.3f}" if ppo_sps else "-"
        texts = r.get("llm_texts_per_1k_steps")
        lines.append(f"| {r['method']} | {r['steps_per_second']:,.0f} | {rel} | {pct(r.get('llm_time_share'))} | "
                     f"{pct(r.get('feature_time_share'))} | {pct(r.get('cache_hit_rate'))} | "
                     f"{'-' if texts is None else f'{texts:.0f}'} |")
    return "\n".join(lines)


def build_tiny_model(env_name: str, folder: Path) -> str:
    """The tiny random model of the env's modality: a text model for symbolic envs, a VLM for pixel envs."""
    if feature_modality(env_name) == "image":
        from utils.testing.tiny_vlm import build_tiny_vlm

        return build_tiny_vlm(folder)
    from utils.testing.tiny_llm import build_tiny_llm

    return build_tiny_llm(folder)


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="Craftax-Classic-Symbolic-v1")
    parser.add_argument("--num-envs", type=int, default=32)
    parser.add_argument("--num-steps", type=int, default=25, help="rollout length per update")
    parser.add_argument("--num-minibatches", type=int, default=5)
    parser.add_argument("--update-epochs", type=int, default=4, help="passes over each rollout (both methods)")
    parser.add_argument("--layer-width", type=int, default=128)
    parser.add_argument("--feature-width", type=int, default=128)
    parser.add_argument("--reset-ratio", type=int, default=16)
    parser.add_argument("--skip-n", type=int, nargs="+", default=[1, 25, 100])
    parser.add_argument("--updates", type=int, default=4, help="updates per timed call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method (round robin)")
    parser.add_argument("--model", default=None,
                        help="model folder or hub id; default: a tiny random model (a VLM on pixel envs) built here")
    parser.add_argument("--server-url", default=None, help="take features from this hidden-state server instead")
    parser.add_argument("--llm-batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="LLM device: auto, cpu, cuda")
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    parser.add_argument("--table", default=None, help="also write a measured table (benchmarks.records) here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "benchmarks.ppo_llm_sps",
         typed: list[str] | None = None) -> dict:
    """Measure and print (and write with --out / --table); ``prog`` and ``typed`` (the flags as the user
    typed them, before a wrapper's defaults) make the command a table records."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog)
    command = " ".join(["python", "-m", prog, *map(shlex.quote, argv if typed is None else typed)])
    enable_compilation_cache()

    model = args.model
    with tempfile.TemporaryDirectory(prefix="tiny_model_") as scratch:  # the weights stay loaded after it goes
        if model is None and args.server_url is None:
            model = build_tiny_model(args.env, Path(scratch))
        spec = None if args.server_url else LLMSpec(model=model, batch_size=args.llm_batch_size, device=args.device)
        encoder = open_encoder(spec, args.server_url, args.env)

    runs = {"ppo": plain_ppo(args)}
    for skip_n in args.skip_n:
        runs[f"ppo_llm skip_n={skip_n}"] = ppo_with_features(args, skip_n, encoder)
    compile_seconds = {}
    for name, run in runs.items():
        start = time.perf_counter()
        # Plain PPO twice: its first call starts from a carry with a weakly typed leaf (Craftax's
        # reset), so its second call traces and compiles again (ppo_llm strips weak types at init).
        for _ in range(2 if name == "ppo" else 1):
            run()
        compile_seconds[name] = time.perf_counter() - start
        print(f"compiled and warmed up {name} in {compile_seconds[name]:.0f} s", flush=True)

    seconds = {name: [] for name in runs}
    infos = {name: [] for name in runs}
    steps_per_update = args.num_envs * args.num_steps
    for repeat in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            info = run()
            seconds[name].append(time.perf_counter() - start)
            if info:
                infos[name].append(info)
        print(f"round {repeat + 1}/{args.repeats} done", flush=True)

    steps = args.updates * steps_per_update
    rows = [summarise(name, seconds[name], infos[name], steps, args.updates) for name in runs]
    ppo_sps = rows[0]["steps_per_second"]
    result = {
        "env": args.env, "num_envs": args.num_envs, "num_steps": args.num_steps, "layer_width": args.layer_width,
        "update_epochs": args.update_epochs, "num_minibatches": args.num_minibatches,
        "updates_per_call": args.updates, "repeats": args.repeats,
        "llm": encoder_identity(encoder, args.server_url),
        "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "compile_and_warm_up_seconds": {k: round(v, 1) for k, v in compile_seconds.items()},
        "machine": machine_description(),
    }
    print(json.dumps(result, indent=2))
    print(markdown(rows, ppo_sps))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.table:
        path = write_table(args, rows, seconds, steps, command)
        print(f"wrote {path}; render it with python -m benchmarks.report")
    return result


def write_table(args: argparse.Namespace, rows: list[dict], seconds: dict[str, list[float]], steps: int,
                command: str) -> Path:
    """The measurement as a :data:`benchmarks.records.TABLE_SCHEMA` table: per method, the steps/s of
    every timed call and each as a fraction of the PPO call of the same round (the calls of a round
    ran back to back, so they shared the machine's load), plus the feature costs over all calls."""
    ppo_seconds = seconds["ppo"]
    image = feature_modality(args.env) == "image"
    model = "VLM" if image else "LLM"
    table_rows = []
    for row in rows:
        name = row["method"]
        table_rows.append({
            "method": name.replace("ppo_llm", f"ppo + {model} features"),
            "steps_per_second": [steps / s for s in seconds[name]],
            "relative": [p / s for p, s in zip(ppo_seconds, seconds[name])],
            "llm_time_share": row.get("llm_time_share"),
            "inputs_per_1k_steps": row.get("llm_texts_per_1k_steps"),
        })
    kind = "Pixel PPO with VLM features (frames)" if image else "PPO with LLM features (texts)"
    source = args.server_url or args.model or (f"the tiny random {model} (utils/testing/tiny_{model.lower()}.py, "
                                                f"--device {args.device})")
    return records.write_table(
        args.table, name=Path(args.table).stem, title=f"{kind} against plain PPO: env steps/s ({args.env})",
        command=command,
        description=(f"One process: plain PPO and PPO with features refreshed every skip_n steps and at episode "
                     f"starts, with the same {args.num_envs} envs, rollout length {args.num_steps}, width "
                     f"{args.layer_width}, {args.update_epochs} epoch(s) of {args.num_minibatches} minibatch(es) per "
                     f"update; {args.repeats} timed calls of {args.updates} update(s) each, round robin, "
                     f"after warm-up calls that compile. Features from {source}. Relative: each call against the "
                     "plain PPO call of the same round."),
        columns=[{"key": "method", "label": "method"},
                 {"key": "steps_per_second", "label": "env steps/s", "digits": 1},
                 {"key": "relative", "label": "relative to plain PPO", "digits": 2},
                 {"key": "llm_time_share", "label": f"share of time in the {model}", "digits": 3},
                 {"key": "inputs_per_1k_steps", "label": f"{'frames' if image else 'texts'} to the {model} "
                                                         "per 1k steps", "digits": 0}],
        rows=table_rows)


if __name__ == "__main__":
    main()
