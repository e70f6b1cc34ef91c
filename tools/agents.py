"""Trained agents from any run folder or checkpoint, behind one small interface for the tools.

A loader turns a run folder (or checkpoint file) into an :class:`Agent` that acts on ONE
unbatched observation at a time. Loaders are registered by the run's ``(area, algo)``, the two
folder names of ``runs/<area>/<algo>/<env>/<run>`` that every training entry point also writes to
``summary.json``, so an area adds its own with :func:`register` without touching the tools:

* ``online_rl``: ``ppo`` (and its ``ppo_icm``/``ppo_e3b``/``ppo_icm_e3b`` variants), ``ppo_rnn``,
  ``ppo_rnd``; ``world_models``: ``dreamer_v1``/``v2``/``v3``. The config is rebuilt from
  ``config.yaml``; the algorithm's own ``make_train`` gives the checkpoint's structure (traced,
  not computed) and its evaluation policy (``act(params, obs, state, key)``, the one its
  evaluation uses); only the policy's parameters are restored from the newest Orbax checkpoint
  (``utils.checkpoint.Checkpointer.restore_fields``), never the env states or a replay buffer.
* ``offline_rl``: ``awr``, ``bc``: ``offline_rl.checkpoint`` loads the self-describing file and
  its per-seed networks; policies trained on LLM features get them live through
  ``offline_rl.evaluate.make_feature_fn``, exactly as evaluation does.

Actions are sampled from the policy, as in the algorithms' own evaluation.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import yaml

from utils.errors import UserError


class Agent(NamedTuple):
    """``act(obs) -> action`` for one unbatched observation; ``reset()`` before each episode."""

    env_name: str
    act: Callable[[np.ndarray], int]
    reset: Callable[[], None]
    description: str


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    seed_index: int = 0  # which of the run's trained seeds acts
    sample_seed: int = 0  # seed of the action sampling
    device: str = "cpu"  # torch device (offline RL)
    llm_model: str | None = None  # offline RL with hidden-state features: override the labels' model


Loader = Callable[[Path, LoadOptions], Agent]
_LOADERS: dict[tuple[str, str], Loader] = {}


def register(area: str, algo: str, loader: Loader) -> None:
    _LOADERS[(area, algo)] = loader


def registered() -> list[str]:
    return sorted(f"{area}/{algo}" for area, algo in _LOADERS)


def load_agent(path: str | Path, options: LoadOptions = LoadOptions(), algo: str | None = None) -> Agent:
    """The agent of a run folder or checkpoint; ``algo`` ("area/algo") overrides detection."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--run {path}: no such run folder or checkpoint")
    area_algo = _parse_algo(algo) if algo else identify(path)
    loader = _LOADERS.get(area_algo)
    if loader is None:
        raise UserError(f"{path}: no agent loader for {'/'.join(area_algo)}; registered: {', '.join(registered())}")
    return loader(path, options)


def identify(path: Path) -> tuple[str, str]:
    """(area, algo) of a run folder: an offline-RL checkpoint file, ``summary.json``, or the path."""
    if _offline_checkpoint(path) is not None:
        from offline_rl.checkpoint import load_checkpoint

        return "offline_rl", str(load_checkpoint(_offline_checkpoint(path))["algo"])
    summary = path / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        if data.get("area") and data.get("algo"):
            return str(data["area"]), str(data["algo"])
    parts = path.resolve().parts
    for i, part in enumerate(parts[:-1]):
        if any(area == part and algo == parts[i + 1] for area, algo in _LOADERS):
            return part, parts[i + 1]
    raise UserError(f"{path}: cannot tell which algorithm wrote this run (no summary.json, not under "
                    f"runs/<area>/<algo>/); pass --algo, one of: {', '.join(registered())}")


def _parse_algo(text: str) -> tuple[str, str]:
    if text.count("/") != 1:
        raise UserError(f"--algo {text!r}: expected area/algo, one of {', '.join(registered())}")
    area, algo = text.split("/")
    return area, algo


def _offline_checkpoint(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".pt":
        return path
    found = sorted((path / "checkpoints").glob("step_*.pt")) if path.is_dir() else []
    return found[-1] if found else None


# ----------------------------------------------------------------------------------------------
# JAX runs: online_rl (the PPO family) and world_models (Dreamer)
# ----------------------------------------------------------------------------------------------


def config_from_yaml(config_cls: type, path: Path) -> Any:
    """The run's config from its ``config.yaml`` (tuples restored; unknown fields refused)."""
    if not path.is_file():
        raise UserError(f"{path}: missing; an online-RL run folder holds its resolved config there")
    saved = yaml.safe_load(path.read_text()) or {}
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise UserError(f"{path}: fields {', '.join(unknown)} are not in {config_cls.__name__}; "
                        "is --algo right?")
    default = config_cls()
    values = {k: tuple(v) if isinstance(getattr(default, k), tuple) and isinstance(v, list) else v
              for k, v in saved.items()}
    return dataclasses.replace(default, **values)


class PolicyPieces(NamedTuple):
    """What a JAX algorithm gives the tools: its evaluation policy (``act(params, obs [N], state,
    key)``, ``initial_state(n)``), one seed's ``init`` (only traced, for the checkpoint's structure)
    and where the policy's parameters sit in the checkpointed carry."""

    policy: Any
    init: Callable[[Any], Any]
    params_field: tuple[str, ...]  # e.g. ("params",) or ("agent", "params")


def restore_policy_params(run_dir: Path, config_cls: type, build: Callable[[Any], PolicyPieces],
                          seed_index: int = 0) -> tuple[Any, PolicyPieces, Any, int]:
    """``(config, pieces, params of one seed, checkpoint step)`` of a run folder written through
    ``utils.training.HostLoop`` (``config.yaml``, Orbax checkpoints of a carry stacked over seeds).
    Only the policy's parameters are read from the checkpoint."""
    import jax

    from utils import training
    from utils.checkpoint import Checkpointer

    cfg = config_from_yaml(config_cls, run_dir / "config.yaml")
    if not 0 <= seed_index < cfg.num_seeds:
        raise UserError(f"--seed-index {seed_index}: {run_dir} trained {cfg.num_seeds} seed(s)")
    if not (run_dir / "checkpoints").is_dir():
        raise UserError(f"{run_dir}: no checkpoints/ folder; train the run first")
    checkpointer = Checkpointer(run_dir / "checkpoints")
    step = checkpointer.latest_step()
    if step is None:
        raise UserError(f"{run_dir}/checkpoints holds no checkpoint; train the run first")
    pieces = build(cfg)
    keys = training.seed_keys(cfg.seed, cfg.num_seeds)
    like = jax.eval_shape(jax.vmap(pieces.init), keys)  # traced only: nothing is computed
    for name in pieces.params_field:
        like = getattr(like, name)
    wanted = like
    for name in reversed(pieces.params_field):
        wanted = {name: wanted}
    restored, _ = checkpointer.restore_fields(step, wanted)
    checkpointer.close()
    for name in pieces.params_field:
        restored = restored[name]
    return cfg, pieces, jax.tree.map(lambda x: x[seed_index], restored), int(step)


def jax_run_loader(config_cls: Callable[[], type], build: Callable[[Any], PolicyPieces]) -> Loader:
    """Loader for a JAX run folder: its newest checkpoint acting through the algorithm's policy."""

    def load(run_dir: Path, options: LoadOptions) -> Agent:
        import jax

        cfg, pieces, params, step = restore_policy_params(run_dir, config_cls(), build, options.seed_index)
        policy = pieces.policy
        act_batch = jax.jit(policy.act)
        memory = {"state": policy.initial_state(1), "key": jax.random.PRNGKey(options.sample_seed)}

        def act(obs: np.ndarray) -> int:
            memory["key"], key = jax.random.split(memory["key"])
            action, memory["state"] = act_batch(params, jax.numpy.asarray(obs)[None], memory["state"], key)
            return int(action[0])

        def reset() -> None:
            memory["state"] = policy.initial_state(1)

        return Agent(cfg.env, act, reset, f"{run_dir.name} (update {step}, seed {options.seed_index})")

    return load


def ppo_family_pieces(module_name: str) -> Callable[[Any], PolicyPieces]:
    def build(cfg) -> PolicyPieces:
        from online_rl.common import num_updates_for
        from utils import envs

        module = importlib.import_module(module_name)
        env = envs.make(cfg.env, cfg.num_envs, reset_ratio=cfg.reset_ratio)
        algorithm = module.make_train(cfg, env, num_updates_for(cfg), False)
        return PolicyPieces(algorithm.policy, algorithm.init, ("params",))

    return build


def _config(module_name: str, name: str) -> Callable[[], type]:
    return lambda: getattr(importlib.import_module(module_name), name)


for _algo in ("ppo", "ppo_icm", "ppo_e3b", "ppo_icm_e3b"):
    register("online_rl", _algo, jax_run_loader(_config("online_rl.ppo", "PPOConfig"),
                                                ppo_family_pieces("online_rl.ppo")))
register("online_rl", "ppo_rnn", jax_run_loader(_config("online_rl.ppo_rnn", "PPORNNConfig"),
                                                ppo_family_pieces("online_rl.ppo_rnn")))
register("online_rl", "ppo_rnd", jax_run_loader(_config("online_rl.ppo_rnd", "PPORNDConfig"),
                                                ppo_family_pieces("online_rl.ppo_rnd")))


# ----------------------------------------------------------------------------------------------
# world_models: Dreamer V1-V3
# ----------------------------------------------------------------------------------------------


def dreamer_pieces(cfg) -> PolicyPieces:
    from utils import envs
    from world_models import dreamer

    env = envs.make(cfg.env, cfg.num_envs, reset_ratio=cfg.reset_ratio)
    program = dreamer.make_train(cfg, env)
    policy = dreamer.make_policy(program.agent, dreamer.make_store(cfg, env))
    return PolicyPieces(policy, program.init, ("agent", "params"))


for _version in (1, 2, 3):
    register("world_models", f"dreamer_v{_version}",
             jax_run_loader(_config("world_models.dreamer", "DreamerConfig"), dreamer_pieces))


# ----------------------------------------------------------------------------------------------
# offline_rl: AWR and BC
# ----------------------------------------------------------------------------------------------


def load_offline(path: Path, options: LoadOptions) -> Agent:
    import torch

    from offline_rl.checkpoint import find_checkpoint, load_checkpoint, policies_from_checkpoint
    from offline_rl.evaluate import make_feature_fn
    from offline_rl.networks import resolve_device

    device = resolve_device(options.device)
    payload = load_checkpoint(find_checkpoint(path), device)
    policies = policies_from_checkpoint(payload, device)
    if not 0 <= options.seed_index < len(policies):
        raise UserError(f"--seed-index {options.seed_index}: {path} holds {len(policies)} trained seed(s)")
    policy = policies[options.seed_index]
    features = (make_feature_fn(payload, options.llm_model, device=options.device)
                if policy.spec.feature_dim else None)
    generator = torch.Generator().manual_seed(options.sample_seed)

    def act(obs: np.ndarray) -> int:
        batch = np.array(obs)[None]  # a writable copy: torch will not wrap read-only arrays
        feats = torch.from_numpy(features(batch)).to(device) if features is not None else None
        with torch.no_grad():
            logits, _ = policy(torch.from_numpy(batch).to(device), feats)
        probs = torch.softmax(logits.float(), -1).cpu()
        return int(torch.multinomial(probs, 1, generator=generator)[0, 0])

    name = Path(payload["path"]).name
    return Agent(payload["env_name"], act, lambda: None,
                 f"{payload.get('algo')} {name} (seed {options.seed_index})")


register("offline_rl", "awr", load_offline)
register("offline_rl", "bc", load_offline)
