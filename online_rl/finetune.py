"""PPO fine-tuned from a trained policy: ``--init-from``, ``--critic-warmup`` and ``--init-kl-coef``.

Offline-to-online fine-tuning has a known failure: the pretrained actor meets a critic that knows
nothing (BC has none; an offline critic was fitted to another policy's data), the first advantages are
noise, and PPO's first updates follow them and undo the pretraining (Nair et al. 2020, AWAC; Lee et al.
2021; Nakamoto et al. 2023, Cal-QL). Two remedies, both off by default:

* ``--critic-warmup N``: the first N updates train only the critic, on the normal rollouts, with the
  actor (and any torso it shares with the critic: the pixel CNN, PPO-RNN's GRU) frozen. Actor and critic
  then have separate Adam states, each clipped to ``--max-grad-norm`` alone (as offline RL does), and
  the actor's (with its learning-rate schedule) only starts counting when the warm-up ends, so its first
  steps are an ordinary Adam start, not a bias-correction jump after N silent updates.
* ``--init-kl-coef C --init-kl-steps S``: ``C * max(0, 1 - env steps / S) * KL(pi || pi_init)`` is added
  to the PPO loss, on the minibatch's observations, pulling the policy towards the one it started from
  while the critic catches up; logged as ``loss/init_kl`` and ``loss/init_kl_coef``.

``--init-from RUN`` takes the actor, and the critic where the source has one, from

* an offline-RL run (``offline_rl.bc``, ``awr``, ``iql``; PyTorch, read through
  :mod:`utils.torch_checkpoint`): the actor MLP and policy head, and the critic MLP and value head of AWR
  (its value net) and IQL (its ``V``; the Q networks are not a state value and stay behind). BC has no
  critic: PPO's starts fresh. Only symbolic observations: the offline CNN (one per actor and critic,
  ceil-mode pooling) is not PPO's (one shared CNN, SAME pooling), so no pixel policy would carry over.
* a run of the same PPO-family algorithm (its newest checkpoint's parameters, every leaf): ``ppo`` (any
  ``--bonus``) for ``ppo``/``ppo_rnd``, ``ppo_rnn`` for ``ppo_rnn``. The critic's extrinsic value output
  carries over; an intrinsic one carries over only between two bonus runs; a bonus's own networks and
  statistics start fresh.

The networks must match exactly, and nothing is resized: an offline policy's width, depth and activation
are its config's (``--layer-width``, ``--num-layers``, ``--activation``; offline defaults 256, 2, relu,
PPO's 512, 3, tanh), so the PPO run passes the same three flags; the error says which. The env must be
the same, and a policy that read LLM hidden states (an offline run with ``--features hidden_state``, a
``ppo_llm`` run) cannot start a PPO that sees observations only. Everything is checked before anything is
compiled or written; a mismatch is one line and exit status 2.

Seed ``i`` of the new run starts from the source's seed ``i`` (``--init-from-seed K``: every seed from
seed ``K``). A resumed run restores its own checkpoint (the KL anchor travels in it); the source is read
and checked again on every start, so it must stay where it was until the run is finished.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from utils.errors import UserError

Path_ = tuple[str, ...]
"""A parameter's path in a flax tree, e.g. ``("params", "MLP_0", "Dense_0", "kernel")``."""

# utils.networks.ActorCritic's flax names: the actor's torso and head are built first, the critic's second.
ACTOR_TORSO, CRITIC_TORSO, POLICY_HEAD, VALUE_HEAD = "MLP_0", "MLP_1", "Dense_0", "Dense_1"


@dataclasses.dataclass
class FineTuneFields:
    """Command-line fields of a PPO-family trainer that can start from a trained policy."""

    init_from: str | None = None
    """Start from a trained policy: an offline-RL run (bc, awr, iql: the actor, and the critic of awr and iql's V) or
    a run of this algorithm (actor and critic). Env, layer shapes, activation and observation features must match."""
    init_from_seed: int | None = None
    """Seed of the --init-from run that every seed starts from; default: seed i starts from the source's seed i."""
    critic_warmup: int = 0
    """With --init-from: the first this-many updates train only the critic (the actor is frozen); 0: off."""
    init_kl_coef: float = 0.0
    """With --init-from: weight of a KL(pi || pi_init) penalty, decayed linearly to 0 over --init-kl-steps; 0: off."""
    init_kl_steps: int = 1_000_000
    """Env steps per seed over which --init-kl-coef decays linearly to 0."""


def enabled(cfg: Any) -> bool:
    """Whether any fine-tuning flag is set (otherwise the algorithm runs its unchanged default program)."""
    return bool(cfg.init_from or cfg.critic_warmup or cfg.init_kl_coef)


class Transfer(NamedTuple):
    """What a PPO-family algorithm tells this module about its network."""

    kind: str
    """The run kind it starts from: ``ppo`` (feed-forward, any bonus) or ``ppo_rnn``."""
    arch_fields: tuple[str, ...]
    """Config fields that fix its parameter shapes besides the env: a source run's must be equal."""
    params_like: Callable[[dict], Any]
    """A source run's config (a dict) -> one seed's parameter shapes (``jax.ShapeDtypeStruct`` leaves)."""
    heads: Path_
    """Where its :class:`utils.networks.ActorCritic` sits in the parameters."""
    offline: bool
    """Whether an offline-RL MLP policy maps onto it (the feed-forward PPO on symbolic observations)."""
    kl: bool
    """Whether it supports ``--init-kl-coef``."""


# ---------------------------------------------------------------------------------------------------
# The optimiser during and after the warm-up, and the KL penalty
# ---------------------------------------------------------------------------------------------------


def critic_labels(heads: Path_) -> Callable[[Any], Any]:
    """``params -> tree of "actor" / "critic"``: the critic's own torso and value head are ``critic``; every
    other leaf (the actor, and what the actor shares: a pixel CNN, a GRU) is ``actor``, frozen in the warm-up."""
    critic = (heads + (CRITIC_TORSO,), heads + (VALUE_HEAD,))

    def labels(params):
        def label(path, _):
            names = _names(path)
            return "critic" if any(names[:len(prefix)] == prefix for prefix in critic) else "actor"

        return jax.tree_util.tree_map_with_path(label, params)

    return labels


def paused(inner: optax.GradientTransformation, pause: jax.Array | bool) -> optax.GradientTransformation:
    """``inner`` giving zero updates and keeping its state (moments, step count, schedule) while ``pause``."""

    def update(updates, state, params=None):
        new_updates, new_state = inner.update(updates, state, params)
        new_updates = jax.tree.map(lambda u: jnp.where(pause, jnp.zeros_like(u), u), new_updates)
        new_state = jax.tree.map(lambda new, old: jnp.where(pause, old, new), new_state, state)
        return new_updates, new_state

    return optax.GradientTransformation(inner.init, update)


def optimizer(cfg: Any, make: Callable[[], optax.GradientTransformation], labels: Callable[[Any], Any],
              update: jax.Array | None = None) -> optax.GradientTransformation:
    """``make()`` unchanged without ``--critic-warmup``; with it, one ``make()`` for the actor's leaves, paused
    while the update after ``update`` completed ones is in the warm-up, and one for the critic's. ``update``
    None (for ``init``: the state's structure does not depend on it) pauses nothing."""
    if not cfg.critic_warmup:
        return make()
    warming = False if update is None else update < cfg.critic_warmup
    return optax.multi_transform({"actor": paused(make(), warming), "critic": make()}, labels)


def init_kl_coef(cfg: Any, update: jax.Array, steps_per_update: int) -> jax.Array:
    """``--init-kl-coef`` decayed linearly to 0 over ``--init-kl-steps`` env steps (per seed)."""
    done = update.astype(jnp.float32) * steps_per_update
    return cfg.init_kl_coef * jnp.clip(1.0 - done / cfg.init_kl_steps, 0.0, 1.0)


def kl_to_initial(logits: jax.Array, initial_logits: jax.Array) -> jax.Array:
    """Mean over the batch of ``KL(pi || pi_init)``, exact for categorical policies; ``pi_init`` is a constant."""
    log_p = jax.nn.log_softmax(logits)
    log_q = jax.nn.log_softmax(jax.lax.stop_gradient(initial_logits))
    return (jnp.exp(log_p) * (log_p - log_q)).sum(-1).mean()


def add_init_kl(total: jax.Array, logs: dict, logits: jax.Array, initial_logits: jax.Array,
                coef: jax.Array) -> tuple[jax.Array, dict]:
    """The PPO loss with the decayed KL penalty added, and its logs with the KL and the coefficient."""
    kl = kl_to_initial(logits, initial_logits)
    total = total + coef * kl
    return total, {**logs, "loss/total": total, "loss/init_kl": kl, "loss/init_kl_coef": coef}


# ---------------------------------------------------------------------------------------------------
# The source policy, checked, and its weights put into the fresh carry
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Start:
    """A checked source policy: for every seed of this run, the ``{path: array}`` leaves it replaces."""

    description: str
    seeds: list[dict[Path_, np.ndarray]]

    def apply(self, carry: Any) -> Any:
        """``carry`` (stacked over seeds) with the source's leaves in its parameters, and, where the
        carry keeps the initial policy for the KL penalty (``anchor``), there as well."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(carry.params)
        leaves = []
        for path, leaf in flat:
            name = _names(path)
            if name in self.seeds[0]:
                leaf = jnp.stack([_fill(leaf[s], seed[name]) for s, seed in enumerate(self.seeds)])
            leaves.append(leaf)
        params = jax.tree_util.tree_unflatten(treedef, leaves)
        carry = carry.replace(params=params)
        return carry.replace(anchor=params) if hasattr(carry, "anchor") else carry


def starter(cfg: Any, env: Any, init: Callable, total_updates: int,
            transfer: Transfer) -> Callable[[], Start] | None:
    """None without fine-tuning flags (the default program); else a function that checks the flags and the
    source against this run and returns its :class:`Start`. It is called before anything is compiled or
    written; only tracing (no compute) gives the shapes of ``init``'s parameters."""
    if not enabled(cfg):
        return None

    def load() -> Start:
        check_flags(cfg, total_updates, transfer)
        path = Path(cfg.init_from)
        description, seeds = read_source(path, cfg, env, transfer)
        like = _flat(jax.eval_shape(init, jax.random.PRNGKey(0)).params)
        for name, array in seeds[0].items():
            _check_leaf(path, name, array.shape, like, transfer.heads)
        return Start(description, [seeds[i] for i in _seed_indices(path, cfg, len(seeds))])

    return load


def check_flags(cfg: Any, total_updates: int, transfer: Transfer) -> None:
    """Flag combinations that cannot work, refused before the source is even read."""
    if cfg.init_kl_coef < 0:
        raise UserError(f"--init-kl-coef must be zero or more, got {cfg.init_kl_coef}")
    if not cfg.init_from:
        raise UserError("--critic-warmup and --init-kl-coef fine-tune a trained policy; pass --init-from RUN too")
    if cfg.init_kl_coef and not transfer.kl:
        raise UserError(f"--init-kl-coef is not available for {transfer.kind} (its initial policy's recurrent "
                        "state is not tracked); use --critic-warmup alone")
    if cfg.critic_warmup >= total_updates:
        raise UserError(f"--critic-warmup {cfg.critic_warmup} leaves the actor no update of the run's "
                        f"{total_updates}; lower it or raise --total-steps")


def read_source(path: Path, cfg: Any, env: Any, transfer: Transfer) -> tuple[str, list[dict[Path_, np.ndarray]]]:
    """``(description, per source seed {path: array})`` of the run ``--init-from`` names, in this
    algorithm's parameter layout, after checking env, features and network against this run."""
    from utils.run_dir import read_saved_config
    from utils.torch_checkpoint import newest_checkpoint

    if not path.exists():
        raise UserError(f"--init-from: {path} does not exist; pass a run folder of offline_rl.bc/awr/iql or "
                        f"online_rl.{transfer.kind}")
    offline_file = newest_checkpoint(path)
    if offline_file is not None:
        return _read_offline(path, offline_file, cfg, env, transfer)
    fields = read_saved_config(path, "--init-from") if path.is_dir() else None
    if fields is None or not (path / "checkpoints").is_dir():
        raise UserError(f"--init-from: {path} is not a trained run (no checkpoints/step_*.pt of an offline run, "
                        "no config.yaml and checkpoints/ of a PPO run)")
    return _read_ppo(path, fields, cfg, transfer)


def _read_offline(path: Path, file: Path, cfg: Any, env: Any, transfer: Transfer):
    try:
        import torch  # noqa: F401  (only to give a clear error when the offline extra is missing)
    except ImportError:
        raise UserError(f"--init-from {path}: reading an offline-RL checkpoint needs PyTorch; "
                        "pip install -e '.[offline]'") from None
    from utils.torch_checkpoint import load_checkpoint, mlp_policy_layers

    payload = load_checkpoint(file)
    network, algo = payload["network"], payload.get("algo", "offline")
    what = f"--init-from {path}: the {algo} policy"
    if not transfer.offline:
        raise UserError(f"{what} is an MLP with no recurrent core; {transfer.kind} cannot start from it "
                        "(fine-tune it with python -m online_rl.ppo)")
    _check_env(what, payload["env_name"], cfg.env)
    if payload.get("features", "none") != "none" or network.get("feature_dim"):
        labels = payload.get("labels") or {}
        raise UserError(f"{what} reads LLM hidden states (--features {payload.get('features')}: model "
                        f"{labels.get('model')}, layer {labels.get('layer')}), this PPO sees observations only; "
                        "start from a run trained with --features none")
    if len(network["obs_shape"]) != 1:
        raise UserError(f"{what} reads pixels with the offline CNN, which is not PPO's (one CNN each for actor "
                        "and critic, another pooling); --init-from takes offline policies on symbolic observations")
    if tuple(network["obs_shape"]) != tuple(env.obs_shape) or network["num_actions"] != env.num_actions:
        raise UserError(f"{what} takes observations {tuple(network['obs_shape'])} and {network['num_actions']} "
                        f"actions, {cfg.env} gives {tuple(env.obs_shape)} and {env.num_actions}")
    _check_arch(what, {"layer_width": network["width"], "num_layers": network["depth"],
                       "activation": network["activation"]}, cfg)
    seeds = [_offline_leaves(mlp_policy_layers(payload, i), transfer.heads) for i in range(len(payload["models"]))]
    critic = "actor and critic" if network.get("critic") else "actor; no critic, the critic starts fresh"
    return f"{algo} policy {payload['path']} ({critic})", seeds


def _offline_leaves(layers: dict, heads: Path_) -> dict[Path_, np.ndarray]:
    """An offline policy's dense layers under their names in :class:`utils.networks.ActorCritic`."""
    leaves: dict[Path_, np.ndarray] = {}

    def dense(module: Path_, layer) -> None:
        leaves[heads + module + ("kernel",)], leaves[heads + module + ("bias",)] = layer

    for torso, head, torso_layers, head_layer in ((ACTOR_TORSO, POLICY_HEAD, layers["actor"], layers["logits"]),
                                                  (CRITIC_TORSO, VALUE_HEAD, layers["critic"], layers["value"])):
        if torso_layers is None:
            continue
        for i, layer in enumerate(torso_layers):
            dense((torso, f"Dense_{i}"), layer)
        dense((head,), head_layer)
    return leaves


def run_kind(fields: dict) -> str:
    """A run folder's kind from its saved config's fields (folders may live anywhere, so not its path)."""
    if "skip_n" in fields or "llm_layer" in fields:
        return "ppo_llm"
    if "update_epochs" in fields and "hidden_size" in fields:
        return "ppo_rnn"
    if "update_epochs" in fields and "bonus" in fields:
        return "ppo"
    return "unknown"


def _read_ppo(path: Path, fields: dict, cfg: Any, transfer: Transfer):
    from utils.checkpoint import Checkpointer

    kind = "ppo_llm" if (path / "features.json").exists() else run_kind(fields)  # ppo_llm's feature identity
    what = f"--init-from {path}: the {kind} run"
    if kind == "ppo_llm":
        raise UserError(f"{what} reads live LLM hidden states (its features.json), this PPO sees observations "
                        "only; start from a run without LLM features")
    if kind != transfer.kind:
        sources = f"{'an offline-RL run or ' if transfer.offline else ''}an online_rl.{transfer.kind} run"
        raise UserError(f"--init-from {path}: {transfer.kind} starts from {sources}; "
                        f"this is {'an unknown kind of run' if kind == 'unknown' else 'a ' + kind + ' run'}")
    _check_env(what, fields.get("env"), cfg.env)
    _check_arch(what, {name: fields.get(name) for name in transfer.arch_fields}, cfg)
    if fields.get("sweep"):
        raise UserError(f"{what} is a sweep program (several points in one checkpoint); start from a single run")
    seeds = int(fields.get("num_seeds", 1))
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct((seeds,) + x.shape, x.dtype), transfer.params_like(fields))
    checkpointer = Checkpointer(path / "checkpoints")
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise UserError(f"{what} has no checkpoint yet; train it first")
        restored, _ = checkpointer.restore_fields(step, {"params": like})
    except ValueError as error:
        if isinstance(error, UserError):
            raise
        raise UserError(f"{what}: its checkpoint does not match its config.yaml ({str(error).splitlines()[0]})") from None
    finally:
        checkpointer.close()
    flat = _flat(jax.device_get(restored["params"]))
    return f"{kind} run {path} (update {step})", [{k: np.asarray(v[s]) for k, v in flat.items()} for s in range(seeds)]


def _check_env(what: str, source_env: str | None, env: str) -> None:
    if source_env != env:
        raise UserError(f"{what} was trained on {source_env}, this run is on {env}; pass --env {source_env} "
                        "or start from a run on this env")


def _check_arch(what: str, source: dict, cfg: Any) -> None:
    """The network fields must be equal: nothing is resized. The error gives the flags that make them so."""
    differing = {name: value for name, value in source.items() if getattr(cfg, name) != value}
    if differing:
        has = ", ".join(f"{name} {value}" for name, value in source.items())
        flags = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in differing.items())
        raise UserError(f"{what} has {has}; this run has "
                        f"{', '.join(f'{name} {getattr(cfg, name)}' for name in differing)}; pass {flags}")


def _check_leaf(path: Path, name: Path_, shape: tuple, like: dict[Path_, Any], heads: Path_) -> None:
    """The source leaf must exist in this network with the same shape; a value head may differ in its outputs
    (extrinsic first, then intrinsic), and the outputs both have are taken."""
    target = like.get(name)
    where = f"--init-from {path}: layer {'/'.join(name[1:])}"
    if target is None:
        raise UserError(f"{where} has no counterpart in this network; start from a run of the same network")
    value_head = name[:len(heads) + 1] == heads + (VALUE_HEAD,)
    if tuple(shape) != tuple(target.shape) and not (value_head and tuple(shape[:-1]) == tuple(target.shape[:-1])):
        raise UserError(f"{where} has shape {tuple(shape)}, this network {tuple(target.shape)}; "
                        "start from a run of the same network")


def _seed_indices(path: Path, cfg: Any, available: int) -> list[int]:
    if cfg.init_from_seed is not None:
        if cfg.init_from_seed >= available:
            raise UserError(f"--init-from-seed {cfg.init_from_seed}: {path} holds {available} seed(s)")
        return [cfg.init_from_seed] * cfg.num_seeds
    if available < cfg.num_seeds:
        raise UserError(f"--init-from {path} holds {available} seed(s), this run trains {cfg.num_seeds}; pass "
                        "--init-from-seed K to start every seed from the source's seed K")
    return list(range(cfg.num_seeds))


def _fill(fresh: jax.Array, source: np.ndarray) -> jax.Array:
    """``source`` in place of ``fresh``; for a value head with other outputs, the outputs both have."""
    if source.shape == fresh.shape:
        return jnp.asarray(source, fresh.dtype)
    k = min(source.shape[-1], fresh.shape[-1])
    return fresh.at[..., :k].set(jnp.asarray(source[..., :k], fresh.dtype))


def _names(path) -> Path_:
    return tuple(str(getattr(key, "key", key)) for key in path)


def _flat(tree: Any) -> dict[Path_, Any]:
    return {_names(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
