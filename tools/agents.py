"""Trained agents from any run folder or checkpoint, behind one small interface for the tools.

A loader turns a run folder (or checkpoint file) into an :class:`Agent` that acts on ONE
unbatched observation at a time. Loaders are registered by the run's ``(area, algo)``, the two
folder names of ``runs/<area>/<algo>/<env>/<run>`` that every training entry point also writes to
``summary.json``, so an area adds its own with :func:`register` without touching the tools:

* ``online_rl``: ``ppo`` and the names its ``--bonus`` files runs under (``ppo_icm``, ``ppo_e3b``,
  ``ppo_rnd``; ``python -m online_rl.ppo_rnd`` writes ``ppo_rnd`` too), ``ppo_rnn``;
  ``world_models``: ``dreamer_v1``/``v2``/``v3``. The config is rebuilt from
  ``config.yaml``; the algorithm's own ``make_train`` gives the checkpoint's structure (traced,
  not computed) and its evaluation policy (``act(params, obs, state, key)``, the one its
  evaluation uses); only the policy's parameters are restored from the newest Orbax checkpoint
  (``utils.checkpoint.Checkpointer.restore_fields``), never the env states or a replay buffer.
* ``offline_rl``: ``awr``, ``bc``: ``offline_rl.checkpoint`` loads the self-describing file and
  its per-seed networks; policies trained on LLM features get them live through
  ``offline_rl.evaluate.make_feature_fn``, exactly as evaluation does.
* ``online_rl_llm``: ``ppo_llm``: restored like the PPO family (parameters and the running feature
  statistics); the LLM the run used (its model, or ``--llm-model`` for a copy elsewhere; its server
  when it trained through one) gives hidden states live, refreshed at each episode start and every
  ``skip_n`` steps as in the run's own evaluation, and must match the run's ``features.json``.

The registered names are exactly those an entry point files runs under (``tests/test_tools.py``
checks it), so a name no run can have is never advertised and every trained run can be rendered.

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
    """``act(obs) -> action`` for one unbatched observation; ``reset()`` before each episode. ``step`` is the
    checkpoint's update (None where a loader cannot tell), so a recording can say which policy played."""

    env_name: str
    act: Callable[[np.ndarray], int]
    reset: Callable[[], None]
    description: str
    step: int | None = None


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
    cfg = config_from_yaml(config_cls, run_dir / "config.yaml")
    pieces = build(cfg)
    (params,), step = restore_seed_fields(run_dir, cfg, pieces.init, [pieces.params_field], seed_index)
    return cfg, pieces, params, step


def restore_seed_fields(run_dir: Path, cfg: Any, init: Callable[[Any], Any], fields: list[tuple[str, ...]],
                        seed_index: int = 0) -> tuple[list[Any], int]:
    """One seed's values of the carry's ``fields`` (attribute paths, e.g. ``("features", "norm")``) from
    the newest checkpoint of ``run_dir``, and its step. ``init`` (one seed's) is only traced, for the
    checkpoint's structure; nothing else of the carry is read."""
    import jax
    from flax import serialization

    from utils import training
    from utils.checkpoint import Checkpointer

    if not 0 <= seed_index < cfg.num_seeds:
        raise UserError(f"--seed-index {seed_index}: {run_dir} trained {cfg.num_seeds} seed(s)")
    if not (run_dir / "checkpoints").is_dir():
        raise UserError(f"{run_dir}: no checkpoints/ folder; train the run first")
    checkpointer = Checkpointer(run_dir / "checkpoints")
    step = checkpointer.latest_step()
    if step is None:
        raise UserError(f"{run_dir}/checkpoints holds no checkpoint; train the run first")
    keys = training.seed_keys(cfg.seed, cfg.num_seeds)
    carry_like = jax.eval_shape(jax.vmap(init), keys)  # traced only: nothing is computed
    likes, wanted = [], {}
    for path in fields:
        like = carry_like
        for name in path:
            like = getattr(like, name)
        likes.append(like)
        node = wanted
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = serialization.to_state_dict(like)  # struct dataclasses as the dicts Orbax saved
    restored, _ = checkpointer.restore_fields(step, wanted)
    checkpointer.close()
    values = []
    for path, like in zip(fields, likes):
        value = restored
        for name in path:
            value = value[name]
        value = serialization.from_state_dict(like, value)
        values.append(jax.tree.map(lambda x: x[seed_index], value))
    return values, int(step)


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

        return Agent(cfg.env, act, reset, f"{run_dir.name} (update {step}, seed {options.seed_index})", step)

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


# The names online_rl.ppo files runs under: "ppo" and "ppo_<bonus>" for each --bonus (rnd included,
# which python -m online_rl.ppo_rnd also writes; its config reads as PPOConfig with bonus: rnd).
PPO_BONUS_ALGOS = ("ppo_icm", "ppo_e3b", "ppo_rnd")
for _algo in ("ppo", *PPO_BONUS_ALGOS):
    register("online_rl", _algo, jax_run_loader(_config("online_rl.ppo", "PPOConfig"),
                                                ppo_family_pieces("online_rl.ppo")))
register("online_rl", "ppo_rnn", jax_run_loader(_config("online_rl.ppo_rnn", "PPORNNConfig"),
                                                ppo_family_pieces("online_rl.ppo_rnn")))


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
register("offline_rl", "iql", load_offline)


# ----------------------------------------------------------------------------------------------
# online_rl_llm: PPO with live LLM features
# ----------------------------------------------------------------------------------------------


def load_ppo_llm(run_dir: Path, options: LoadOptions) -> Agent:
    """A ``ppo_llm`` run's policy with its LLM features computed live, as its evaluation computes them:
    of the observation's text on a symbolic env, of its frame through the VLM on a pixel env
    (``online_rl_llm.features.observation_rows``, the rows training used).

    The features come from where the run got them (its in-process model on ``options.device``, or its
    server while that still runs); ``options.llm_model`` loads the model from another place instead,
    and then model and revision are not compared. Everything else that decides a vector (layer,
    pooling, prompt, size, backend, compute dtype) must equal the run's ``features.json``."""
    import jax
    import jax.numpy as jnp

    from online_rl_llm import ppo_llm
    from online_rl_llm.features import IDENTITY_FIELDS, encoder_identity, normalise, observation_rows, open_encoder
    from utils import envs
    from utils.llm import check_identity

    cfg = config_from_yaml(ppo_llm.PPOLLMConfig, run_dir / "config.yaml")
    saved_path = run_dir / ppo_llm.FEATURES_FILE
    if not saved_path.is_file():
        raise UserError(f"{saved_path}: missing; a ppo_llm run folder records its LLM features there")
    saved = json.loads(saved_path.read_text())
    if options.llm_model or not cfg.server_url:
        spec = dataclasses.replace(cfg, server_url=None).llm_spec()  # a server's run: its settings, here
        spec = spec.replace(model=options.llm_model or spec.model, device=options.device)
        encoder, server_url = open_encoder(spec, None, cfg.env), None
    else:
        try:
            encoder, server_url = open_encoder(None, cfg.server_url, cfg.env), cfg.server_url
        except UserError as error:
            raise UserError(f"{error}; {run_dir} got its features from that server: start it again, or pass "
                            f"--llm-model with the server's model ({saved.get('model')})") from None
    fields = [k for k in IDENTITY_FIELDS if not (options.llm_model and k in ("model", "model_revision"))]
    check_identity(saved, encoder_identity(encoder, server_url), fields, subject=f"run folder {run_dir}",
                   fix="render with the run's model, backend and compute dtype (--llm-model for a copy of the "
                       "model elsewhere, --device for the run's kind of device)")

    rows = observation_rows(cfg.env, encoder)  # texts or frames, refused in one line for the other kind
    env = envs.make(cfg.env, cfg.num_envs, reset_ratio=cfg.reset_ratio)
    dim = int(saved["dim"])
    algorithm = ppo_llm.make_train(cfg, env, 1, dim)  # traced for the carry; the update count shapes no array read
    (params, norm), step = restore_seed_fields(run_dir, cfg, algorithm.init, [("params",), ("features", "norm")],
                                               options.seed_index)
    network = ppo_llm.make_network(cfg, env)

    @jax.jit
    def act_batch(params, obs, raw, key):
        logits, _ = network.apply(params, obs, normalise(norm, raw))
        return jax.random.categorical(key, logits)

    memory = {"t": 0, "raw": None, "key": jax.random.PRNGKey(options.sample_seed)}

    def act(obs: np.ndarray) -> int:
        if memory["t"] % cfg.skip_n == 0:  # the episode's first step and every skip_n-th after it
            _, items = rows.keys_and_items(np.asarray(obs)[None])
            memory["raw"] = jnp.asarray(rows.encode(items), jnp.float32)
        memory["t"] += 1
        memory["key"], key = jax.random.split(memory["key"])
        return int(act_batch(params, jnp.asarray(obs)[None], memory["raw"], key)[0])

    def reset() -> None:
        memory["t"] = 0

    return Agent(cfg.env, act, reset, f"{run_dir.name} (update {step}, seed {options.seed_index}, "
                                      f"LLM {saved.get('model')})", step)


register("online_rl_llm", "ppo_llm", load_ppo_llm)
