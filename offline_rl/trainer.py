"""The host loop AWR and BC share: config fields, run folder, data, seeds, logging, checkpoints, resume.

An algorithm supplies its per-row training targets and one gradient update (see
:class:`OfflineAlgorithm`); everything else lives here once. Several seeds train in lockstep:
each update draws ``batch_size * num_seeds`` rows and gives every seed its own slice, so seeds
differ in initialisation and in the data they see, and ``metrics.jsonl`` gets one value per seed
as for every other entry point.

The ``step`` of a metrics row is the number of gradient updates (per seed) so far; offline RL
takes no env steps. ``perf/sps`` counts transitions trained on per second, over all seeds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from offline_rl.checkpoint import CheckpointDir, load_checkpoint
from offline_rl.data import BatchLoader, DataSpec, feature_stats, open_dataset
from offline_rl.networks import NetworkSpec, PolicyNetwork, build_network, resolve_device
from utils.config import RunConfig, to_dict
from utils.errors import UserError
from utils.io import atomic_write_json, read_jsonl
from utils.logger import MetricsLogger
from utils.plotting import plot_learning_curve
from utils.run_dir import open_run_dir, resolve_run_dir
from utils.trajectories import TrajectoryDataset

AREA = "offline_rl"


@dataclasses.dataclass
class OfflineConfig(RunConfig):
    """Fields shared by the offline-RL trainers (AWR, BC)."""

    env: str | None = None
    """Environment; default the dataset's. When given it must match the dataset (a safety check)."""
    dataset: str = ""
    """Dataset folder written by `python -m online_rl.ppo --save-trajectories DIR`, or a labelled copy."""
    features: Literal["none", "hidden_state"] = "none"
    """Extra policy input: none, or the labelled LLM hidden states (z-normalised with training-set stats)."""
    num_seeds: int = 1
    """Independent seeds trained in lockstep, each on its own slice of every batch."""
    total_steps: int = 20_000
    """Gradient updates per seed (offline RL takes no env steps)."""
    batch_size: int = 256
    """Transitions per gradient update and seed."""
    layer_width: int = 256
    """Units per hidden layer (MLP layers; the CNN's dense embedding for pixel observations)."""
    num_layers: int = 2
    """Hidden layers of the actor's (and critic's) MLP."""
    activation: str = "relu"
    """Hidden activation: relu or tanh."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm of the actor and of the critic separately (0: no clipping)."""
    num_workers: int = 1
    """Data-loader worker processes decoding shards (0: one background thread in this process)."""
    shards_in_memory: int = 4
    """Shards whose rows each loader worker shuffles together (memory: about this many decoded shards per worker)."""
    prefetch: int = 4
    """Batches each loader worker keeps ready."""
    log_every: int = 250
    """Write a metrics row every this many updates."""
    checkpoint_every: int = 2_000
    """Save a checkpoint every this many updates (and at the end)."""
    eval_episodes: int = 32
    """After training, evaluate each seed's policy for this many episodes in the env (0: skip)."""
    eval_max_steps: int = 10_000
    """Evaluation stops after this many env steps even if some episodes are still running."""
    device: str = "auto"
    """Torch device: auto (cuda if available), cpu, cuda or cuda:N."""
    torch_threads: int = 0
    """Torch's CPU threads (0: the cores the loader leaves, at least 1; oversubscribed cores make small ops many times slower)."""


class OfflineAlgorithm:
    """What an offline algorithm adds to the shared loop. Subclasses set ``name``/``critic`` and
    implement ``update``; the defaults train on every row with no extra targets."""

    name: str = ""
    critic: bool = False  # build a value head
    exact_resume: bool = True  # False when per-epoch targets depend on the weights (lambda-returns)

    def __init__(self, cfg: OfflineConfig):
        self.cfg = cfg

    def prepare(self, dataset: TrajectoryDataset, spec: DataSpec) -> dict[str, Any]:
        """Once per process, before training: compute fixed per-row targets; returns facts for summary.json."""
        return {}

    def epoch_rows(self, dataset: TrajectoryDataset, spec: DataSpec, models: list[PolicyNetwork]
                   ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Dataset-order arrays cut into the batches of the next epoch (a key ``name/<i>`` goes to
        seed i only, as ``name``), and a row mask (None: every row)."""
        return {}, None

    def make_optimizer(self, model: PolicyNetwork) -> torch.optim.Optimizer:
        raise NotImplementedError

    def update(self, model: PolicyNetwork, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise on one seed's batch and scalar metrics (``loss/...`` names)."""
        raise NotImplementedError


def policy_stats(logits: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Log-probabilities of the data's actions, and the policy's entropy and agreement with the data."""
    log_probs = torch.log_softmax(logits, dim=-1)
    log_prob = log_probs.gather(1, actions[:, None]).squeeze(1)
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
        accuracy = (logits.argmax(-1) == actions).float().mean()
    return log_prob, {"loss/entropy": entropy, "loss/accuracy": accuracy}


def _seed_slice(batch: dict[str, torch.Tensor], seed_index: int, size: int) -> dict[str, torch.Tensor]:
    rows = slice(seed_index * size, (seed_index + 1) * size)
    out = {}
    for key, value in batch.items():
        name, _, owner = key.partition("/")
        if owner and owner != str(seed_index):
            continue
        out[name if owner else key] = value[rows]
    return out


def _clip_per_group(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip each parameter group alone: a large critic gradient must not shrink the actor's step."""
    if max_norm > 0:
        for group in optimizer.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], max_norm)


class _Window:
    """Per-seed sums of metrics between two log rows, kept as tensors so that a GPU is not
    synchronised every update."""

    def __init__(self, seeds: int):
        self.seeds = seeds
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, list] = {}
        self.updates = 0
        self.wait = 0.0
        self.started = time.perf_counter()

    def add(self, seed_index: int, metrics: dict[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            sums = self.sums.setdefault(key, [0.0] * self.seeds)
            sums[seed_index] = sums[seed_index] + value.detach()

    def means(self) -> dict[str, np.ndarray]:
        return {k: np.array([float(v) for v in sums]) / max(1, self.updates) for k, sums in self.sums.items()}


def train(cfg: OfflineConfig, algorithm: OfflineAlgorithm, stop_after_updates: int | None = None) -> dict:
    """Train (or resume) the run ``cfg`` describes; ``stop_after_updates`` simulates a kill (tests)."""
    dataset, spec = open_dataset(cfg.dataset, cfg.features)
    if cfg.env is not None and cfg.env != spec.env_name:
        raise UserError(f"--env {cfg.env} does not match the dataset's env {spec.env_name}; "
                        "drop --env or pick the matching dataset")
    cfg = dataclasses.replace(cfg, env=spec.env_name)
    if cfg.num_seeds < 1 or cfg.total_steps < 1:
        raise UserError("--num-seeds and --total-steps must be at least 1")
    device = resolve_device(cfg.device)
    # The loader (workers, or one thread when num_workers is 0) keeps at least one core busy.
    torch.set_num_threads(cfg.torch_threads or max(1, (os.cpu_count() or 1) - max(1, cfg.num_workers)))
    run_dir = resolve_run_dir(cfg, AREA, algorithm.name)
    open_run_dir(cfg, run_dir)
    checkpoints = CheckpointDir(run_dir / "checkpoints")

    net_spec = NetworkSpec(obs_shape=spec.obs_shape, num_actions=spec.num_actions,
                           feature_dim=spec.feature_dim, width=cfg.layer_width, depth=cfg.num_layers,
                           activation=cfg.activation, critic=algorithm.critic)
    models = [build_network(net_spec, cfg.seed + i).to(device) for i in range(cfg.num_seeds)]
    optimizers = [algorithm.make_optimizer(m) for m in models]
    latest = checkpoints.latest()
    position = _restore(latest, models, optimizers, device) if latest else _initialise(cfg, dataset, spec, models)
    facts = algorithm.prepare(dataset, spec)

    def checkpoint_payload() -> dict[str, Any]:
        return {
            "algo": algorithm.name, "config": to_dict(cfg), "env_name": spec.env_name,
            "obs_encoding": spec.obs_encoding, "num_actions": spec.num_actions,
            "features": spec.features, "labels": spec.labels, "network": net_spec.to_dict(),
            "dataset": {"directory": spec.directory, "transitions": spec.num_transitions},
            "models": [m.state_dict() for m in models],
            "optimizers": [o.state_dict() for o in optimizers],
            "position": dict(position), "torch_rng": torch.get_rng_state(),
        }

    logger = MetricsLogger(run_dir, config=to_dict(cfg), resume_step=position["step"] if latest else None,
                           tensorboard=cfg.tensorboard, wandb_mode=cfg.wandb, wandb_project=cfg.wandb_project)
    loader = BatchLoader(spec, batch_size=cfg.batch_size * cfg.num_seeds, seed=cfg.seed,
                         num_workers=cfg.num_workers, shards_in_memory=cfg.shards_in_memory,
                         prefetch=cfg.prefetch, pin_memory=device.type == "cuda")
    progress = _progress(cfg, algorithm.name, position["step"])
    if latest is not None and position["step"] < cfg.total_steps:
        _say(progress, f"resuming {run_dir} from update {position['step']}"
             + ("" if algorithm.exact_resume else " (targets recomputed with the restored critic)"))

    def start_epoch(skip: int):
        arrays, mask = algorithm.epoch_rows(dataset, spec, models)
        rows = int(mask.sum()) if mask is not None else spec.num_transitions
        return loader.epoch(position["epoch"], arrays, mask, skip=skip), rows

    window = _Window(cfg.num_seeds)
    batches = None
    epoch_rows = spec.num_transitions
    try:
        while position["step"] < cfg.total_steps:
            if stop_after_updates is not None and position["step"] >= stop_after_updates:
                break
            if batches is None:
                batches, epoch_rows = start_epoch(position["batch_in_epoch"])
            waited = time.perf_counter()
            batch = next(batches, None)
            window.wait += time.perf_counter() - waited
            if batch is None:
                if position["batch_in_epoch"] == 0:
                    raise UserError(f"{spec.directory}: an epoch has {epoch_rows} usable rows, fewer than "
                                    f"--batch-size x --num-seeds = {cfg.batch_size * cfg.num_seeds}; "
                                    "lower the batch size or use more data")
                position["epoch"] += 1
                position["batch_in_epoch"] = 0
                batches = None
                continue
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            for i, (model, optimizer) in enumerate(zip(models, optimizers)):
                loss, metrics = algorithm.update(model, _seed_slice(batch, i, cfg.batch_size))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                _clip_per_group(optimizer, cfg.max_grad_norm)
                optimizer.step()
                window.add(i, metrics)
            window.updates += 1
            position["step"] += 1
            position["batch_in_epoch"] += 1
            step = position["step"]
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                _log_window(logger, progress, window, cfg, step, position, epoch_rows)
            if step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
                checkpoints.save(step, checkpoint_payload())
    finally:
        loader.close()
        if progress is not None:
            progress.close()
    complete = position["step"] >= cfg.total_steps  # else stopped as if killed: resumes from the last checkpoint

    evaluation = _final_evaluation(cfg, run_dir, checkpoints, logger, complete)
    logger.close()
    summary = _write_summary(cfg, algorithm.name, run_dir, spec, position, complete, facts, evaluation)
    return {"summary": summary, "run_dir": run_dir, "models": models}


def run_cli(config_cls: type, algorithm_cls: type, algo: str, argv: list[str] | None = None) -> dict:
    """What ``python -m offline_rl.<algo>`` does: parse presets and flags, train, name the run folder."""
    from utils.config import parse_config
    from utils.jax_setup import enable_compilation_cache

    enable_compilation_cache()  # the final evaluation runs the env in JAX
    cfg = parse_config(config_cls, AREA, algo, argv)
    result = train(cfg, algorithm_cls(cfg))
    print(f"run folder: {result['run_dir']}")
    return result


def _initialise(cfg: OfflineConfig, dataset: TrajectoryDataset, spec: DataSpec,
                models: list[PolicyNetwork]) -> dict[str, int]:
    """A fresh run: seed torch and put the training set's feature statistics into every network."""
    torch.manual_seed(cfg.seed)
    if spec.feature_dim:
        mean, std = feature_stats(dataset, spec.feature_dim)
        for model in models:
            model.feature_norm.set_stats(mean, std)
    return {"step": 0, "epoch": 0, "batch_in_epoch": 0}


def _restore(path: Path, models: list[PolicyNetwork], optimizers: list[torch.optim.Optimizer],
             device: torch.device) -> dict[str, int]:
    """Weights (with their normalisation buffers), optimisers and RNG from a checkpoint; its data position."""
    payload = load_checkpoint(path, device)
    if len(payload["models"]) != len(models):
        raise UserError(f"{path} holds {len(payload['models'])} seeds, the config asks for {len(models)}")
    for model, optimizer, m_state, o_state in zip(models, optimizers, payload["models"], payload["optimizers"]):
        model.load_state_dict(m_state)
        optimizer.load_state_dict(o_state)
    torch.set_rng_state(payload["torch_rng"])
    return dict(payload["position"])


def _progress(cfg: OfflineConfig, name: str, initial: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.total_steps, initial=initial, unit="update", dynamic_ncols=True,
                desc=f"{name} {cfg.env}")


def _say(progress, message: str) -> None:
    if progress is not None:
        progress.write(message)
    else:
        print(message)


def _log_window(logger: MetricsLogger, progress, window: _Window, cfg: OfflineConfig, step: int,
                position: dict[str, int], epoch_rows: int) -> None:
    seconds = time.perf_counter() - window.started
    metrics: dict[str, Any] = dict(window.means())
    metrics["perf/sps"] = window.updates * cfg.batch_size * cfg.num_seeds / max(seconds, 1e-9)
    metrics["perf/loader_wait_fraction"] = window.wait / max(seconds, 1e-9)
    metrics["perf/epoch"] = position["epoch"] + position["batch_in_epoch"] * cfg.batch_size * cfg.num_seeds / max(1, epoch_rows)
    row = logger.log(step, metrics)
    if progress is not None:
        progress.update(step - progress.n)
        actor = row.get("loss/actor")
        if isinstance(actor, list) and actor and actor[0] is not None:
            progress.set_postfix(actor=f"{float(np.mean(actor)):.3f}", sps=f"{metrics['perf/sps']:.0f}",
                                 refresh=False)
    window.reset()


def _final_evaluation(cfg: OfflineConfig, run_dir: Path, checkpoints: CheckpointDir,
                      logger: MetricsLogger, complete: bool) -> dict | None:
    """Evaluate the final policies once; a re-run of a finished run keeps the earlier result."""
    eval_path = run_dir / "eval.json"
    if not complete or cfg.eval_episodes <= 0:
        return None
    if eval_path.exists():
        return json.loads(eval_path.read_text())
    from offline_rl.evaluate import evaluate_payload, write_eval

    result = evaluate_payload(load_checkpoint(checkpoints.latest()), episodes=cfg.eval_episodes,
                              max_steps=cfg.eval_max_steps, seed=cfg.seed + 10_000,
                              progress=cfg.progress, device=cfg.device)
    write_eval(eval_path, result)
    logger.log(cfg.total_steps, result["metrics"])
    return result


def _tail_means(rows: list[dict], fraction: float = 0.1) -> dict[str, Any]:
    """Mean of each ``loss/`` and ``perf/`` metric over the last ``fraction`` of rows, per seed and overall."""
    rows = [r for r in rows if any(k.startswith("loss/") for k in r)]
    if not rows:
        return {}
    tail = rows[-max(1, int(len(rows) * fraction)):]
    result = {}
    for key in tail[-1]:
        if not key.startswith(("loss/", "perf/")):
            continue
        values = np.array([np.atleast_1d(np.asarray(r.get(key), dtype=np.float64)) for r in tail
                           if r.get(key) is not None], dtype=np.float64)
        if values.size:
            per_seed = np.nanmean(values, axis=0)
            result[key] = {"mean": float(np.nanmean(per_seed)), "per_seed": per_seed.tolist()}
    return result


def _write_summary(cfg: OfflineConfig, algo: str, run_dir: Path, spec: DataSpec, position: dict[str, int],
                   complete: bool, facts: dict[str, Any], evaluation: dict | None) -> dict:
    metrics_path = run_dir / "metrics.jsonl"
    rows = read_jsonl(metrics_path) if metrics_path.exists() else []
    summary = {
        "area": AREA, "algo": algo, "env": cfg.env, "dataset": spec.directory,
        "dataset_transitions": spec.num_transitions, "features": cfg.features,
        "complete": complete, "updates": position["step"], "num_seeds": cfg.num_seeds,
        "transitions_per_seed": position["step"] * cfg.batch_size,
        "epochs": next((r["perf/epoch"] for r in reversed(rows) if "perf/epoch" in r), 0.0), **facts,
        "final": _tail_means(rows),
        "eval": evaluation["summary"] if evaluation else None,
    }
    atomic_write_json(run_dir / "summary.json", summary)
    if rows:
        plot_learning_curve(metrics_path, run_dir / "learning_curve.png", key="loss/actor",
                            title=f"{algo} on {cfg.env} ({Path(spec.directory).name})")
    return summary
