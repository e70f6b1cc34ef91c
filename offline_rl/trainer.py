"""The host loop AWR, BC and IQL share: config fields, run folder, data, seeds, logging, checkpoints, resume.

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
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from offline_rl.augment import batch_augmentation
from offline_rl.checkpoint import CheckpointDir, checkpoint_step, load_checkpoint
from offline_rl.data import BatchLoader, DataSpec, feature_stats, open_dataset
from offline_rl.networks import NetworkSpec, PolicyNetwork, build_network, resolve_device
from utils.augment import AugmentFields
from utils.config import RunConfig, to_dict
from utils.errors import UserError
from utils.io import read_jsonl
from utils.training import ChunkOutput, HostLoop
from utils.trajectories import TrajectoryDataset

AREA = "offline_rl"


@dataclasses.dataclass
class OfflineConfig(RunConfig, AugmentFields):
    """Fields shared by the offline-RL trainers (AWR, BC, IQL)."""

    env: str | None = None
    """Environment; default the dataset's. When given it must match the dataset (a safety check)."""
    dataset: str = ""
    """Dataset folder written by `python -m online_rl.ppo --save-trajectories DIR`, or a labelled copy."""
    features: str = "none"
    """Extra policy input: none, or a labelled feature of the dataset (z-normalised with training-set stats):
    hidden_state (a text LLM's labels), image_hidden_state (a vision-language model's), or a --feature name."""
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
    q_heads: int = 0  # build this many Q(s, .) networks with target copies (IQL)
    transitions: bool = False  # batches also carry reward, done, next_obs, next_valid (one-step TD targets)
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

    def after_step(self, model: PolicyNetwork) -> None:
        """After each optimiser step (target networks follow the trained ones here)."""


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


@dataclasses.dataclass
class OfflineCarry:
    """What the host loop carries and checkpoints: the seeds' networks and optimisers (updated in place)
    and the position in the data (epoch, batch within it, updates so far)."""

    models: list[PolicyNetwork]
    optimizers: list[torch.optim.Optimizer]
    position: dict[str, int]


class TorchCheckpoints:
    """The checkpoint store :class:`utils.training.HostLoop` expects, over self-describing PyTorch files."""

    def __init__(self, directory: Path, payload: Callable[[OfflineCarry], dict[str, Any]], device: torch.device):
        self.files, self.payload, self.device = CheckpointDir(directory), payload, device

    def latest_step(self) -> int | None:
        latest = self.files.latest()
        return None if latest is None else checkpoint_step(latest)

    def restore(self, step: int, carry: OfflineCarry) -> tuple[OfflineCarry, dict]:
        position = _restore(self.files.latest(), carry.models, carry.optimizers, self.device)
        return dataclasses.replace(carry, position=position), {}

    def save(self, step: int, carry: OfflineCarry, meta: dict) -> None:
        self.files.save(step, self.payload(carry))

    def close(self) -> None:
        pass


def train(cfg: OfflineConfig, algorithm: OfflineAlgorithm, stop_after_updates: int | None = None) -> dict:
    """Train (or resume) the run ``cfg`` describes; ``stop_after_updates`` simulates a kill (tests)."""
    dataset, spec = open_dataset(cfg.dataset, cfg.features)
    if cfg.env is not None and cfg.env != spec.env_name:
        raise UserError(f"--env {cfg.env} does not match the dataset's env {spec.env_name}; "
                        "drop --env or pick the matching dataset")
    cfg = dataclasses.replace(cfg, env=spec.env_name)
    augment = batch_augmentation(cfg, spec, cfg.seed)  # None unless --augment shift
    if cfg.num_seeds < 1 or cfg.total_steps < 1:
        raise UserError("--num-seeds and --total-steps must be at least 1")
    device = resolve_device(cfg.device)
    # The loader (workers, or one thread when num_workers is 0) keeps at least one core busy.
    torch.set_num_threads(cfg.torch_threads or max(1, (os.cpu_count() or 1) - max(1, cfg.num_workers)))

    net_spec = NetworkSpec(obs_shape=spec.obs_shape, num_actions=spec.num_actions,
                           feature_dim=spec.feature_dim, width=cfg.layer_width, depth=cfg.num_layers,
                           activation=cfg.activation, critic=algorithm.critic, q_heads=algorithm.q_heads)
    models = [build_network(net_spec, cfg.seed + i).to(device) for i in range(cfg.num_seeds)]
    carry = OfflineCarry(models, [algorithm.make_optimizer(m) for m in models],
                         {"step": 0, "epoch": 0, "batch_in_epoch": 0})

    def checkpoint_payload(carry: OfflineCarry) -> dict[str, Any]:
        return {
            "algo": algorithm.name, "config": to_dict(cfg), "env_name": spec.env_name,
            "obs_encoding": spec.obs_encoding, "num_actions": spec.num_actions,
            "features": spec.features, "labels": spec.labels, "network": net_spec.to_dict(),
            "dataset": {"directory": spec.directory, "transitions": spec.num_transitions},
            "models": [m.state_dict() for m in carry.models],
            "optimizers": [o.state_dict() for o in carry.optimizers],
            "position": dict(carry.position), "torch_rng": torch.get_rng_state(),
        }

    loop = HostLoop(cfg, AREA, algorithm.name, steps_per_update=1, total_updates=cfg.total_steps,
                    achievement_names=(), env_steps=False,
                    checkpointer=lambda folder: TorchCheckpoints(folder, checkpoint_payload, device),
                    curve_key="loss/actor", curve_title=f"{algorithm.name} on {cfg.env} ({Path(spec.directory).name})")
    if not loop.resuming:
        _initialise(cfg, dataset, spec, models)
    carry = loop.restore(carry)
    if loop.resuming and not algorithm.exact_resume and loop.start_update < cfg.total_steps:
        loop.say("(targets are recomputed with the restored critic)")
    facts = algorithm.prepare(dataset, spec)
    loader = BatchLoader(spec, batch_size=cfg.batch_size * cfg.num_seeds, seed=cfg.seed,
                         num_workers=cfg.num_workers, shards_in_memory=cfg.shards_in_memory,
                         prefetch=cfg.prefetch, pin_memory=device.type == "cuda",
                         transitions=algorithm.transitions)
    epoch = _EpochIterator(cfg, algorithm, dataset, spec, loader, device)

    def train_chunk(carry: OfflineCarry, length: int) -> ChunkOutput:
        started, position = time.perf_counter(), carry.position
        sums: dict[str, list] = {}
        waited = 0.0
        for _ in range(length):
            start_wait = time.perf_counter()
            batch = epoch.next_batch(carry)
            waited += time.perf_counter() - start_wait
            if augment is not None:
                batch = augment(batch, position["step"])
            for i, (model, optimizer) in enumerate(zip(carry.models, carry.optimizers)):
                loss, metrics = algorithm.update(model, _seed_slice(batch, i, cfg.batch_size))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                _clip_per_group(optimizer, cfg.max_grad_norm)
                optimizer.step()
                algorithm.after_step(model)
                for key, value in metrics.items():  # tensors: a GPU is not synchronised every update
                    per_seed = sums.setdefault(key, [0.0] * cfg.num_seeds)
                    per_seed[i] = per_seed[i] + value.detach()
            position["step"] += 1
            position["batch_in_epoch"] += 1
        seconds = time.perf_counter() - started
        losses = {k: np.array([float(v) for v in per_seed]) / length for k, per_seed in sums.items()}
        perf = {"perf/sps": length * cfg.batch_size * cfg.num_seeds / max(seconds, 1e-9),
                "perf/loader_wait_fraction": waited / max(seconds, 1e-9),
                "perf/epoch": position["epoch"] + position["batch_in_epoch"] * cfg.batch_size * cfg.num_seeds
                / max(1, epoch.rows)}
        return ChunkOutput(carry, None, losses, perf)

    evaluation: dict | None = None

    def evaluate(carry: OfflineCarry, _key) -> dict:
        nonlocal evaluation
        evaluation = _final_evaluation(cfg, loop.run_dir, checkpoint_payload(carry))
        return {} if evaluation is None else evaluation["metrics"]

    def summary_fields() -> dict:
        rows = read_jsonl(loop.logger.path) if loop.logger.path.exists() else []
        result = evaluation or _saved_evaluation(loop.run_dir)
        return {
            "dataset": spec.directory, "dataset_transitions": spec.num_transitions, "features": cfg.features,
            "transitions_per_seed": carry.position["step"] * cfg.batch_size,
            "epochs": next((r["perf/epoch"] for r in reversed(rows) if "perf/epoch" in r), 0.0), **facts,
            "final": _tail_means(rows), "eval": result["summary"] if result else None,
        }

    try:
        result = loop.run(carry, train_chunk, updates_per_chunk=cfg.log_every, evaluate=evaluate,
                          summary_fields=summary_fields, stop_after_updates=stop_after_updates)
    finally:
        loader.close()
    return {"summary": result["summary"], "run_dir": result["run_dir"], "models": models}


class _EpochIterator:
    """Batches in data order across epochs, resumable at (epoch, batch within it); moved to the device."""

    def __init__(self, cfg: OfflineConfig, algorithm: OfflineAlgorithm, dataset: TrajectoryDataset,
                 spec: DataSpec, loader: BatchLoader, device: torch.device):
        self.cfg, self.algorithm, self.dataset, self.spec = cfg, algorithm, dataset, spec
        self.loader, self.device = loader, device
        self.batches = None
        self.rows = spec.num_transitions

    def next_batch(self, carry: OfflineCarry) -> dict[str, torch.Tensor]:
        position = carry.position
        while True:
            if self.batches is None:
                arrays, mask = self.algorithm.epoch_rows(self.dataset, self.spec, carry.models)
                self.rows = int(mask.sum()) if mask is not None else self.spec.num_transitions
                self.batches = self.loader.epoch(position["epoch"], arrays, mask, skip=position["batch_in_epoch"])
            batch = next(self.batches, None)
            if batch is not None:
                return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            if position["batch_in_epoch"] == 0:
                raise UserError(f"{self.spec.directory}: an epoch has {self.rows} usable rows, fewer than "
                                f"--batch-size x --num-seeds = {self.cfg.batch_size * self.cfg.num_seeds}; "
                                "lower the batch size or use more data")
            position["epoch"] += 1
            position["batch_in_epoch"] = 0
            self.batches = None


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


def _final_evaluation(cfg: OfflineConfig, run_dir: Path, payload: dict[str, Any]) -> dict | None:
    """Evaluate the final policies once (``eval.json``); a re-run of a finished run keeps the earlier result."""
    if cfg.eval_episodes <= 0:
        return None
    saved = _saved_evaluation(run_dir)
    if saved is not None:
        return saved
    from offline_rl.evaluate import add_dataset_scores, evaluate_payload, write_eval

    result = evaluate_payload(payload, episodes=cfg.eval_episodes, max_steps=cfg.eval_max_steps,
                              seed=cfg.seed + 10_000, progress=cfg.progress, device=cfg.device)
    add_dataset_scores(result, cfg.dataset)  # fraction of the data policy; normalised score on a tier
    write_eval(run_dir / "eval.json", result)
    return result


def _saved_evaluation(run_dir: Path) -> dict | None:
    path = run_dir / "eval.json"
    return json.loads(path.read_text()) if path.exists() else None

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
