"""Evaluate an offline-RL checkpoint (AWR, BC or IQL) in the game: PyTorch policy, batched JAX env.

Every trained seed plays ``--episodes`` episodes, all in one batch of envs (one env per episode,
each counted at its first ``done``). Observations go from the JAX env to the PyTorch policy and
actions back once per step. A policy trained with LLM features (``--features hidden_state``, or
``image_hidden_state`` on a pixel dataset labelled by a vision-language model) gets them live
through the project's LLM backend: ``utils.llm.observation_features`` for text features (the
canonical text renderer, the labels' model, layer, pooling and prompt), ``utils.llm.frame_features``
for image features (the frames as uint8, the env family's prompt, the labels' VLM, layer and
pooling); rounded to the labels' storage dtype and z-normalised inside the network with the
training-set statistics from the checkpoint, so it sees exactly what labelling would have stored
for the same observation.

    python -m offline_rl.evaluate --run-dir runs/offline_rl/bc/Craftax-Classic-Symbolic-v1/default-s0
    python -m offline_rl.evaluate --run-dir RUN --dataset DATA --gif runs/bc.gif   # + data policy's return
    python -m offline_rl.evaluate --run-dir RUN --server-url http://127.0.0.1:8000   # LLM features from a server
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offline_rl.checkpoint import find_checkpoint, load_checkpoint, policies_from_checkpoint
from offline_rl.data import LABEL_FIELDS
from offline_rl.networks import resolve_device
from utils.errors import UserError, exit_on_user_error
from utils.evaluation import FirstEpisodes, eval_metrics
from utils.io import atomic_write_json, check_output_path
from utils.media import first_env_renderer, write_gif

AREA, NAME = "offline_rl", "evaluate"


@dataclasses.dataclass
class EvalConfig:
    """Evaluate an offline-RL policy in the JAX env; writes eval.json (and optionally a GIF)."""

    run_dir: str | None = None
    """Run folder to evaluate (its newest checkpoint); eval.json is written there."""
    checkpoint: str | None = None
    """A checkpoint file (step_*.pt) to evaluate instead of --run-dir's newest."""
    preset: tuple[str, ...] = ()
    """Presets from configs/offline_rl/evaluate.yaml, applied left to right before other flags."""
    dataset: str | None = None
    """Optional dataset the policy learned from: also report its policy's return and our fraction of it."""
    features: str | None = None
    """Safety check: must equal the checkpoint's features (none or hidden_state) when given."""
    seed: int = 0
    """Seed of the env resets and of action sampling."""
    episodes: int = 32
    """Episodes per trained seed, played together as one batch of envs."""
    max_steps: int = 10_000
    """Stop after this many env steps even if some episodes are still running (they are not counted)."""
    greedy: bool = False
    """Take the most likely action instead of sampling from the policy."""
    gif: str | None = None
    """Write a GIF of the first env's first episode here (Craftax envs)."""
    out: str | None = None
    """Where to write eval.json; default the run folder of the checkpoint."""
    llm_model: str | None = None
    """Load the LLM from this folder/hub id instead of the one named in the checkpoint's labels."""
    llm_batch_size: int = 64
    """Observations per LLM forward pass when computing live features."""
    server_url: str | None = None
    """Take live LLM features from this hidden-state server (python -m servers.hidden_state_server) instead
    of loading the model here; its model, layer, pooling, prompt, backend and dtype must match the labels'."""
    device: str = "auto"
    """Torch device of the policy (and the LLM): auto, cpu, cuda or cuda:N."""
    reset_ratio: int = 16
    """Optimistic resets of the env batch (see utils.envs); finished envs are not counted again."""
    progress: bool = True
    """Show a progress bar over env steps."""


# ----------------------------------------------------------------------------------------------
# Features and frames
# ----------------------------------------------------------------------------------------------


def make_feature_fn(payload: dict[str, Any], llm_model: str | None = None, batch_size: int = 64,
                    device: str = "auto", server_url: str | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """Observations -> the LLM features the policy was trained on, computed live (in this process,
    or by the hidden-state server at ``server_url``, which renders, prompts and pools the same way):
    text features of the rendered observation, or image features of the frame when the labels say
    ``modality: image``.

    The live features' identity (``LABEL_FIELDS``: model, layer, pooling, prompt, hidden size,
    backend, resolved compute dtype, model revision, modality and image processor) must equal the
    labels' (``utils.llm.check_identity``: fields an older labels block does not record get a
    note). ``llm_model`` loads the model from another place, so model and revision are then not
    compared (a note names a revision that differs); backend and dtype still are."""
    from utils import llm

    labels = payload.get("labels") or {}
    if server_url and llm_model:
        raise UserError("pass either --llm-model (load the LLM here) or --server-url (ask a server), not both")
    if server_url:
        from utils.hidden_state_client import HiddenStateClient

        backend = HiddenStateClient(server_url)
        backend.info()  # fail now, with the server's one-line reason, if it is not there
        spec = backend.spec
    else:
        runtime = {"batch_size": batch_size, "device": device}
        spec = llm.LLMSpec.from_manifest(labels, **runtime)
        if llm_model:
            spec = spec.replace(model=llm_model)
        backend = llm.make_backend(spec)
    expected = int(payload["network"]["feature_dim"])
    if backend.hidden_size != expected:
        source = f"the server at {server_url}" if server_url else spec.model
        raise UserError(f"{source} gives hidden states of size {backend.hidden_size}, but the policy "
                        f"was trained on size {expected} (labels model {labels.get('model')}); "
                        "use the labelling model (--llm-model, or a server that loaded it)")
    check_live_features(labels, spec, backend, llm_model=llm_model)
    storage = np.dtype(labels.get("dtype", "float32"))
    env_name = payload["env_name"]
    compute = llm.frame_features if labels.get("modality") == "image" else llm.observation_features

    def features(obs: np.ndarray) -> np.ndarray:
        states = compute(backend, obs, env_name)
        return states.astype(storage).astype(np.float32)  # what the labelled dataset stores

    return features


def live_identity(spec, backend) -> dict[str, Any]:
    """The ``LABEL_FIELDS`` of features computed by ``backend`` (loaded from ``spec``)."""
    from utils.llm import identity

    return {**spec.to_manifest(), "hidden_size": int(backend.hidden_size),
            **(getattr(backend, "identity", None) or identity(spec))}


def check_live_features(labels: dict[str, Any], spec, backend, llm_model: str | None = None) -> None:
    """Refuse live features that differ from the labelled ones the policy was trained on."""
    from utils.llm import check_identity

    fields = [k for k in LABEL_FIELDS if not (llm_model and k in ("model", "model_revision"))]
    current = live_identity(spec, backend)
    check_identity(labels, current, fields, subject="the policy's labelled dataset",
                   fix="evaluate with the labels' backend and compute dtype (the same kind of "
                       "device), and the same model weights, or relabel the dataset and retrain")
    if llm_model and labels.get("model_revision") not in (None, current.get("model_revision")):
        print(f"note: --llm-model {llm_model} has revision {current.get('model_revision')}, the labels "
              f"{labels.get('model_revision')}; evaluating anyway (you said they are the same model)",
              file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# The evaluation loop
# ----------------------------------------------------------------------------------------------


def evaluate_payload(payload: dict[str, Any], *, episodes: int, max_steps: int, seed: int,
                     greedy: bool = False, gif: str | None = None, device: str = "auto",
                     llm_model: str | None = None, llm_batch_size: int = 64, reset_ratio: int = 16,
                     progress: bool = True, server_url: str | None = None) -> dict[str, Any]:
    """Play ``episodes`` episodes per trained seed; returns ``metrics`` (eval/... per seed) and
    ``summary`` (means over seeds, achievements, settings)."""
    import jax

    from utils import envs

    if episodes < 1:
        raise UserError(f"--episodes must be at least 1, got {episodes}")
    torch_device = resolve_device(device)
    policies = policies_from_checkpoint(payload, torch_device)
    seeds, total = len(policies), len(policies) * episodes
    env = envs.make(payload["env_name"], total, reset_ratio=reset_ratio)
    spec = policies[0].spec
    if tuple(env.obs_shape) != tuple(spec.obs_shape) or env.num_actions != spec.num_actions:
        raise UserError(f"{payload['env_name']} gives observations {env.obs_shape} and {env.num_actions} "
                        f"actions, the policy expects {spec.obs_shape} and {spec.num_actions}")
    features = (make_feature_fn(payload, llm_model, llm_batch_size, device, server_url=server_url)
                if spec.feature_dim else None)
    frame = first_env_renderer(env) if gif else None

    key = jax.random.PRNGKey(seed)
    key, reset_key = jax.random.split(key)
    obs, state = jax.jit(env.reset)(reset_key)
    step_env = jax.jit(env.step)
    generator = torch.Generator().manual_seed(seed)
    episodes_seen = FirstEpisodes.start(total, len(env.achievement_names), env.episode_metric_names)
    finished = np.zeros(total, dtype=bool)
    frames: list[np.ndarray] = []
    bar = _progress_bar(progress, max_steps)
    steps = 0
    while steps < max_steps and not finished.all():
        obs_np = np.array(obs)  # a writable copy: torch refuses to wrap read-only arrays
        if frame is not None and not finished[0]:
            frames.append(frame(state))
        feats = None
        if features is not None:  # only for unfinished envs: LLM forward passes are the cost here
            feats = np.zeros((total, spec.feature_dim), dtype=np.float32)
            active = np.flatnonzero(~finished)
            feats[active] = features(obs_np[active])
        actions = _act(policies, obs_np, feats, episodes, greedy, generator, torch_device)
        key, step_key = jax.random.split(key)
        obs, state, _, done, info = step_env(step_key, state, jax.numpy.asarray(actions))
        episodes_seen = episodes_seen.record(done, info)
        finished = np.asarray(episodes_seen.finished)
        steps += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(finished=f"{finished.mean():.0%}", refresh=False)
    if bar is not None:
        bar.close()
    if gif:
        write_gif(gif, frames)
    per_seed = jax.tree.map(lambda x: np.asarray(x).reshape((seeds, episodes) + x.shape[1:]),
                            episodes_seen.result())
    result = _results(payload, env.achievement_names, per_seed)
    result["summary"].update({"episodes_per_seed": episodes, "max_steps": max_steps, "steps_run": steps,
                              "greedy": greedy, "seed": seed, "gif": str(gif) if gif else None})
    return result


def _act(policies, obs: np.ndarray, feats: np.ndarray | None, per_seed: int, greedy: bool,
         generator: torch.Generator, device: torch.device) -> np.ndarray:
    """Each seed's policy acts for its own slice of the env batch."""
    obs_t = torch.from_numpy(obs).to(device)
    feats_t = torch.from_numpy(feats).to(device) if feats is not None else None
    actions = []
    with torch.no_grad():
        for i, policy in enumerate(policies):
            rows = slice(i * per_seed, (i + 1) * per_seed)
            logits, _ = policy(obs_t[rows], feats_t[rows] if feats_t is not None else None)
            if greedy:
                actions.append(logits.argmax(-1).cpu())
            else:
                probs = torch.softmax(logits.float(), -1).cpu()
                actions.append(torch.multinomial(probs, 1, generator=generator)[:, 0])
    return torch.cat(actions).numpy().astype(np.int32)


def _results(payload, achievement_names, result: dict) -> dict[str, Any]:
    """Per-seed means over the finished episodes (NaN for a seed with none), named as docs/design.md says."""
    metrics = eval_metrics(result, achievement_names)
    finished, returns = result["finished"], result["return"]
    count = finished.sum(1)
    finished_returns = returns[finished]
    summary = {
        "checkpoint": payload.get("path"), "algo": payload.get("algo"), "env": payload["env_name"],
        "features": payload.get("features"), "updates": payload["position"]["step"],
        "episodes_finished": int(finished.sum()),
        "return": _nan_none(np.nanmean(metrics["eval/return"]) if count.any() else np.nan),
        "return_per_seed": [_nan_none(v) for v in metrics["eval/return"]],
        "return_std": _nan_none(finished_returns.std() if finished_returns.size else np.nan),
        "length": _nan_none(np.nanmean(metrics["eval/length"]) if count.any() else np.nan),
        "achievements": {name: _nan_none(np.nanmean(metrics[f"eval/achievements/{name}"]))
                         if count.any() else None for name in achievement_names},
    }
    return {"metrics": {k: np.asarray(v).tolist() for k, v in metrics.items()}, "summary": summary}


def _nan_none(value) -> float | None:
    value = float(value)
    return None if not np.isfinite(value) else value


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", dynamic_ncols=True, desc="evaluate")


def data_policy_return(directory: str) -> dict[str, Any]:
    """Mean undiscounted return of the dataset's complete episodes: the data-collecting policy's level."""
    from offline_rl.data import episode_table, open_dataset

    dataset, _ = open_dataset(directory)
    table = episode_table(dataset)
    complete = table.returns[table.complete]
    return {"dataset": str(dataset.directory), "episodes": int(complete.size),
            "return": _nan_none(complete.mean() if complete.size else np.nan),
            "return_std": _nan_none(complete.std() if complete.size else np.nan),
            "length": _nan_none(table.lengths[table.complete].mean() if complete.size else np.nan)}


def add_dataset_scores(result: dict[str, Any], directory: str) -> None:
    """Score the evaluated return against the dataset it was trained on (``utils.tiers.scores``): the
    fraction of the data policy's return and, for a tier dataset, the normalised score (0 = random,
    100 = expert). Per seed as well, so tables can give intervals over seeds."""
    from utils.tiers import scores, tier_of
    from utils.trajectories import read_manifest

    summary = result["summary"]
    data = data_policy_return(directory)
    tier = tier_of(read_manifest(directory))
    summary["data_policy"] = data
    summary["tier"] = tier
    overall = scores(summary["return"], tier, data["return"])
    per_seed = [scores(r, tier, data["return"]) for r in summary["return_per_seed"]]
    summary["return_fraction_of_data"] = overall["fraction_of_data"]
    summary["normalized_score"] = overall["normalized_score"]
    summary["fraction_of_data_per_seed"] = [s["fraction_of_data"] for s in per_seed]
    summary["normalized_score_per_seed"] = [s["normalized_score"] for s in per_seed]


def write_eval(path: str | Path, result: dict[str, Any]) -> None:
    atomic_write_json(path, result)


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate what ``cfg`` names and write eval.json; returns the result."""
    if not cfg.checkpoint and not cfg.run_dir:
        raise UserError("nothing to evaluate: pass --run-dir RUN (its newest checkpoint) or --checkpoint FILE")
    path = find_checkpoint(cfg.checkpoint or cfg.run_dir)
    payload = load_checkpoint(path, resolve_device(cfg.device))
    if cfg.features is not None and cfg.features != payload.get("features"):
        raise UserError(f"--features {cfg.features} does not match the checkpoint, which was trained "
                        f"with --features {payload.get('features')}")
    result = evaluate_payload(payload, episodes=cfg.episodes, max_steps=cfg.max_steps, seed=cfg.seed,
                              greedy=cfg.greedy, gif=cfg.gif, device=cfg.device, llm_model=cfg.llm_model,
                              llm_batch_size=cfg.llm_batch_size, reset_ratio=cfg.reset_ratio,
                              progress=cfg.progress, server_url=cfg.server_url)
    if cfg.dataset:
        add_dataset_scores(result, cfg.dataset)
    if cfg.out:
        out = Path(cfg.out)
    elif cfg.run_dir:
        out = Path(cfg.run_dir) / "eval.json"
    else:
        out = path.with_suffix(".eval.json")
    write_eval(out, result)
    result["path"] = str(out)
    return result


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    from utils.config import parse_config
    from utils.jax_setup import enable_compilation_cache

    enable_compilation_cache()
    cfg = parse_config(EvalConfig, AREA, NAME, argv)
    if cfg.run_dir and not Path(cfg.run_dir).is_dir():
        raise UserError(f"--run-dir: {cfg.run_dir} is not a folder; pass a run folder of offline_rl.awr, "
                        "offline_rl.bc or offline_rl.iql")
    check_output_path(cfg.out, "--out", "file")
    result = run(cfg)
    summary = result["summary"]
    line = f"return {summary['return']} over {summary['episodes_finished']} finished episodes"
    if "return_fraction_of_data" in summary:
        line += (f"; data policy {summary['data_policy']['return']} -> fraction "
                 f"{summary['return_fraction_of_data']}")
    if summary.get("normalized_score") is not None:
        line += f"; normalised score {summary['normalized_score']:.1f} ({summary['tier']['name']} tier)"
    print(f"{line}\neval.json: {result['path']}")
    return result


if __name__ == "__main__":
    main()
