"""What the PPO family (ppo, ppo_rnn, ppo_rnd) shares, written once.

Algorithm files never import each other (docs/design.md), so the pieces they all need live here: the
common hyperparameters, the clipped PPO losses, the epochs-of-shuffled-minibatches optimiser loop,
evaluation, the host loop that runs compiled chunks, and the conversion of saved rollouts into the
trajectory-dataset layout. Each algorithm supplies an :class:`Algorithm`: pure ``init`` and
``train_chunk`` functions of one seed, and a :class:`Policy` for evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from utils import envs, evaluation, parallel, training
from utils import sweep as sweeps
from utils.config import RunConfig
from utils.errors import UserError
from utils.evaluation import Policy
from utils.training import ChunkOutput, HostLoop, init_per_seed


@dataclasses.dataclass
class PPOFamilyConfig(RunConfig):
    """PPO with GAE (defaults: the Craftax baselines, sized for a GPU; see --preset cpu / debug)."""

    num_envs: int = 1024
    """Parallel envs per seed."""
    num_steps: int = 64
    """Rollout length per update (steps per env)."""
    update_epochs: int = 4
    """Passes over each rollout."""
    num_minibatches: int = 8
    """Minibatches per pass."""
    lr: float = 2e-4
    """Adam learning rate (linearly annealed to 0 when --anneal-lr)."""
    anneal_lr: bool = True
    """Anneal the learning rate linearly to zero over the run."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.8
    """GAE lambda."""
    clip_eps: float = 0.2
    """PPO ratio clip (also clips the value update)."""
    ent_coef: float = 0.01
    """Entropy bonus coefficient."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    layer_width: int = 512
    """Units per hidden layer."""
    num_layers: int = 3
    """Hidden layers of the actor and of the critic MLP (symbolic observations)."""
    activation: str = "tanh"
    """Hidden activation of the MLPs: tanh or relu."""
    reset_ratio: int = 16
    """Optimistic resets: generate num_envs / reset_ratio fresh worlds per step."""
    updates_per_chunk: int = 10
    """PPO updates per compiled chunk; the host logs and checkpoints between chunks."""
    eval_every: int = 100
    """Evaluate every this many updates (and at the end); 0: only at the end."""
    eval_envs: int = 32
    """Evaluation episodes per seed (one per env)."""
    eval_max_steps: int = 10_000
    """Evaluation stops after this many steps even if some episodes are still running."""
    save_trajectories: str | None = None
    """Folder to save rollouts to, in the dataset format of docs/design.md (off when unset)."""
    save_every: int = 1
    """With --save-trajectories, save the rollout of every this-many-th update."""

    #: Fields that change no array shape: the compiled program takes them as traced values (see
    #: :func:`hyper_of`), so a sweep over them trains in one program and a single run uses the same code.
    SWEEP_FIELDS: ClassVar[tuple[str, ...]] = ("lr", "max_grad_norm", "gamma", "gae_lambda", "clip_eps", "ent_coef",
                                               "vf_coef")


@dataclasses.dataclass
class ScaleOutConfig(PPOFamilyConfig, sweeps.SweepFields):
    """PPO-family fields of the runs :func:`run_training` drives: devices and sweeps (SWEEP_FIELDS: lr,
    max_grad_norm, gamma, gae_lambda, clip_eps, ent_coef, vf_coef train in one program)."""

    devices: int = 0
    """Devices to split the envs over (data parallel, one global program); 0: all local devices."""


class Transition(NamedTuple):
    """One env step of a rollout; ``reward`` is the env's own (extrinsic) reward, as saved to disk."""

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    done: jax.Array
    log_prob: jax.Array
    value: jax.Array
    terminal_obs: jax.Array | None


def memoryless_policy(logits_fn: Callable[[Any, jax.Array], jax.Array]) -> Policy:
    def act(params, obs, state, key):
        return jax.random.categorical(key, logits_fn(params, obs)), state

    return Policy(act, lambda n: (), lambda state, done: state)


class Algorithm(NamedTuple):
    """One seed's compiled program. ``train_chunk(carry, length, hyper=None) -> (carry, (stats, losses),
    saved)`` where ``hyper`` holds the shape-free hyperparameters (:func:`hyper_of`; None: the config's)
    and ``saved`` is ``(Transition rollout [T, N], last_value [N])`` of the chunk's last update when
    trajectories are saved, else None. ``carry.params`` are what ``policy`` acts with. ``load_start``
    (None unless a fine-tuning flag is set: :mod:`online_rl.finetune`) checks ``--init-from``'s policy
    and returns the :class:`online_rl.finetune.Start` that puts it into the fresh carry."""

    init: Callable[[jax.Array], Any]
    train_chunk: Callable[..., tuple]
    policy: Policy
    load_start: Callable[[], Any] | None = None


# ---------------------------------------------------------------------------------------------------
# Losses and the optimiser loop
# ---------------------------------------------------------------------------------------------------


def categorical_log_prob_entropy(logits: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]:
    log_probs = jax.nn.log_softmax(logits)
    log_prob = jnp.take_along_axis(log_probs, action[..., None].astype(jnp.int32), -1)[..., 0]
    entropy = -(jnp.exp(log_probs) * log_probs).sum(-1)
    return log_prob, entropy


def clipped_value_loss(value, old_value, targets, clip_eps: float) -> jax.Array:
    value_clipped = old_value + jnp.clip(value - old_value, -clip_eps, clip_eps)
    return 0.5 * jnp.maximum((value - targets) ** 2, (value_clipped - targets) ** 2).mean()


def ppo_policy_loss(log_prob, entropy, old_log_prob, advantages, clip_eps: float) -> tuple[jax.Array, dict]:
    """Clipped surrogate on batch-normalised advantages; returns ``(actor_loss, diagnostics)``
    where diagnostics hold the entropy (the caller weights it) and the usual KL/clip monitors."""
    ratio = jnp.exp(log_prob - old_log_prob)
    norm_adv = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    actor_loss = -jnp.minimum(ratio * norm_adv, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * norm_adv).mean()
    diagnostics = {
        "loss/entropy": entropy.mean(),
        "loss/approx_kl": ((ratio - 1) - jnp.log(ratio)).mean(),
        "loss/clip_fraction": (jnp.abs(ratio - 1) > clip_eps).mean(),
    }
    return actor_loss, diagnostics


def hyper_of(cfg: PPOFamilyConfig) -> dict[str, float]:
    """The shape-free hyperparameters (``cfg.SWEEP_FIELDS``) a compiled update reads, as Python floats.

    ``train_chunk(carry, length, hyper)`` takes them as an argument, so :func:`run_training` passes them
    as traced float32 scalars, one per slot, and vmaps over them beside the seeds: a sweep over them is
    one program, and a single run is a sweep of one point."""
    return sweeps.hyper_of(cfg)


def make_optimizer(cfg: PPOFamilyConfig, total_updates: int, hyper: dict | None = None) -> optax.GradientTransformation:
    """Clip, then Adam with the (annealed) learning rate. ``hyper`` overrides ``lr`` and ``max_grad_norm``
    with traced values: the optimiser is rebuilt inside the traced update from them. Its state's structure
    does not depend on their values (unlike ``optax.inject_hyperparams``, which would add them to the state),
    so checkpoints keep their format and ``optimizer.init`` can use the config's values."""
    lr = cfg.lr if hyper is None else hyper["lr"]
    max_grad_norm = cfg.max_grad_norm if hyper is None else hyper["max_grad_norm"]
    steps_per_update = cfg.update_epochs * cfg.num_minibatches
    schedule = optax.linear_schedule(lr, 0.0, total_updates * steps_per_update) if cfg.anneal_lr else lr
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(schedule, eps=1e-5))


def minibatch_epochs(loss_fn: Callable, optimizer: optax.GradientTransformation, params, opt_state,
                     key: jax.Array, data: Any, *, epochs: int, num_minibatches: int,
                     augment: Callable[[jax.Array, Any], Any] | None = None):
    """``epochs`` passes of shuffled minibatch gradient steps over ``data``'s leading axis.

    ``loss_fn(params, batch) -> (loss, aux dict)``. The leading axis is rows for feed-forward
    agents and whole env sequences for recurrent ones. Returns params, optimiser state, key and
    the aux values averaged over every step.

    ``augment(key, batch) -> batch`` (image augmentation, :mod:`utils.augment`) transforms each
    minibatch before the loss, with a key of its own per minibatch. Those keys are folded out of the
    epoch's permutation key instead of split from the carried key, so the key stream, and with it every
    permutation, is the same with and without augmentation; without it the program is unchanged.
    """
    items = jax.tree.leaves(data)[0].shape[0]
    if items % num_minibatches:
        raise UserError(f"{items} rows/sequences per update must be divisible by num_minibatches ({num_minibatches})")

    def epoch(state, _):
        params, opt_state, key = state
        key, perm_key = jax.random.split(key)
        order = jax.random.permutation(perm_key, items).reshape(num_minibatches, -1)
        augment_keys = None if augment is None else jax.random.split(jax.random.fold_in(perm_key, 1), num_minibatches)

        def step(state, inputs):
            params, opt_state = state
            idx, augment_key = inputs
            batch = jax.tree.map(lambda x: x[idx], data)
            if augment is not None:
                batch = augment(augment_key, batch)
            grads, aux = jax.grad(loss_fn, has_aux=True)(params, batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), aux

        (params, opt_state), aux = jax.lax.scan(step, (params, opt_state), (order, augment_keys))
        return (params, opt_state, key), aux

    (params, opt_state, key), aux = jax.lax.scan(epoch, (params, opt_state, key), None, length=epochs)
    return params, opt_state, key, jax.tree.map(jnp.mean, aux)


def next_obs_for_bonus(obs_after: jax.Array, done: jax.Array, info: dict) -> jax.Array:
    """The observation each transition really led to: the terminal one where the episode ended
    (the env has already reset those envs), so curiosity bonuses never score the reset."""
    mask = done.reshape(done.shape + (1,) * (obs_after.ndim - done.ndim))
    return jnp.where(mask, info["terminal_obs"], obs_after)


def scan_updates(update: Callable, save_rollout: bool, default_hyper: dict | None = None) -> Callable:
    """``train_chunk(carry, length, hyper=None)`` from a one-update step ``update(carry, hyper) -> (carry,
    (stats, logs, saved))``: scans ``length`` updates and keeps only the last update's saved rollout.
    ``hyper`` (default ``default_hyper``, the config's values) holds the shape-free hyperparameters."""

    def train_chunk(carry, length: int, hyper: dict | None = None):
        hyper = default_hyper if hyper is None else hyper
        carry, (stats, logs, saved) = jax.lax.scan(lambda c, _: update(c, hyper), carry, None, length=length)
        last = jax.tree.map(lambda x: x[-1], saved) if save_rollout else None
        return carry, (stats, logs), last

    return train_chunk


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


def make_evaluate(cfg: PPOFamilyConfig, policy: Policy):
    """``evaluate(params, key)``: one episode in each of ``eval_envs`` fresh envs, sampled actions."""
    return evaluation.make_evaluate(cfg.env, cfg.eval_envs, policy, max_steps=cfg.eval_max_steps,
                                    reset_ratio=cfg.reset_ratio)


# ---------------------------------------------------------------------------------------------------
# The host loop
# ---------------------------------------------------------------------------------------------------


def num_updates_for(cfg: PPOFamilyConfig) -> int:
    """Enough updates to take at least ``total_steps`` env steps per seed."""
    return training.updates_for(cfg.total_steps, cfg.num_envs * cfg.num_steps)


def chunk_length(cfg: PPOFamilyConfig) -> int:
    """Updates per compiled chunk; when saving, also a divisor of the save interval (a saved rollout
    must be a chunk's last update). Between chunks the host spends milliseconds, so short chunks cost little."""
    total = num_updates_for(cfg)
    multiple_of = math.gcd(total, cfg.save_every) if cfg.save_trajectories else total
    return training.largest_chunk(total, cfg.updates_per_chunk, multiple_of)


def seed_keys(cfg: PPOFamilyConfig) -> jax.Array:
    return training.seed_keys(cfg.seed, cfg.num_seeds)


#: Carry fields whose leaves have the env axis right after the slot axis: split over devices.
ENV_FIELDS = ("env_state", "obs", "first", "hidden")


def run_training(cfg: ScaleOutConfig, area: str, algo: str,
                 make_train: Callable[[Any, envs.VecEnv, int, bool], Algorithm],
                 stop_after_updates: int | None = None, points: list[dict] | None = None) -> dict:
    """Train (or resume) the run described by ``cfg``; returns the summary, final carry and run folder.

    ``make_train(cfg, env, total_updates, save_rollout)`` builds the algorithm's compiled pieces.
    ``stop_after_updates`` ends the loop early as if the process had been killed there (for tests).
    ``points``: shape-free hyperparameter sets (:func:`hyper_of`) trained together in this one program,
    each with all of ``cfg``'s seeds (a sweep; default: ``cfg``'s own values). The program's batch axis then
    has ``len(points) * num_seeds`` slots, point major, and slot ``p * num_seeds + s`` starts exactly like
    seed ``s`` of a single run with point ``p``'s values. With ``--devices N`` (N > 1) every slot's envs
    are split over N devices (:mod:`utils.parallel`).
    """
    points = points or [hyper_of(cfg)]
    slots = len(points) * cfg.num_seeds
    mesh = parallel.make_mesh(getattr(cfg, "devices", 1))
    parallel.check_divisible(cfg.num_envs, mesh, "the envs of each seed", "--num-envs")
    env = envs.make(cfg.env, cfg.num_envs, reset_ratio=cfg.reset_ratio)
    length = chunk_length(cfg)
    total_updates = math.ceil(num_updates_for(cfg) / length) * length
    save_rollout = bool(cfg.save_trajectories)
    if save_rollout and len(points) > 1:
        raise UserError("--save-trajectories cannot be combined with --sweep; save from a single run")
    if save_rollout and jax.process_count() > 1:
        raise UserError("--save-trajectories needs a single-process run; save from one host")
    algorithm = make_train(cfg, env, total_updates, save_rollout)
    start = algorithm.load_start() if algorithm.load_start else None  # checked before anything is compiled

    def per_slot(tree):
        """Seed-major ``[seeds, ...]`` -> ``[points * seeds, ...]``: every point starts from the same seeds."""
        return jax.tree.map(lambda x: jnp.concatenate([x] * len(points)), tree)

    hyper = {k: jnp.asarray(np.repeat([p[k] for p in points], cfg.num_seeds), jnp.float32) for k in points[0]}
    loop = HostLoop(cfg, area, algo, steps_per_update=cfg.num_envs * cfg.num_steps,
                    total_updates=total_updates, achievement_names=env.achievement_names)
    carry = init_per_seed(algorithm.init, seed_keys(cfg))
    if start is not None and not loop.resuming:
        loop.say(f"starting from the {start.description}")
        carry = start.apply(carry)
    carry = per_slot(carry)
    jit_kwargs, eval_kwargs, on_mesh = {}, {}, lambda tree: tree
    if mesh.size > 1:
        carry = parallel.place(carry, mesh, ENV_FIELDS, axis=1, size=cfg.num_envs)
        rep = parallel.replicated(mesh)
        on_mesh = functools.partial(parallel.replicate, mesh=mesh)
        hyper = on_mesh(hyper)
        jit_kwargs = {"out_shardings": (parallel.shardings_of(carry), rep, rep)}
        eval_kwargs = {"out_shardings": rep}
    carry = loop.restore(carry)  # restored into ``carry``'s placement, whatever device count saved it
    writer = loop.open_trajectory_writer(env, cfg.save_trajectories, num_streams=cfg.num_seeds * cfg.num_envs)

    run_chunk = jax.jit(jax.vmap(lambda c, h: algorithm.train_chunk(c, length, h)), **jit_kwargs)
    run_eval = jax.jit(jax.vmap(make_evaluate(cfg, algorithm.policy)), **eval_kwargs)

    def train_chunk(carry, _length: int) -> ChunkOutput:
        start = time.perf_counter()
        carry, (stats, losses), rollout = run_chunk(carry, hyper)
        stats, losses = jax.device_get((stats, losses))
        # The loop counts num_seeds per row; a sweep's program trains every slot.
        sps = slots * length * cfg.num_envs * cfg.num_steps / max(time.perf_counter() - start, 1e-9)
        return ChunkOutput(carry, stats, losses, metrics={"perf/sps": sps} if len(points) > 1 else {}, saved=rollout)

    def save_rollout(update: int, output: ChunkOutput) -> None:
        if writer is not None and update % cfg.save_every == 0:
            writer.write_rollout_async(**rollout_for_writer(output.saved, update - 1))

    def evaluate(carry, key) -> dict:
        keys = on_mesh(per_slot(jax.random.split(key, cfg.num_seeds)))
        return loop.eval_metrics(jax.device_get(run_eval(carry.params, keys)))

    summary_fields = (lambda: {"sweep_points": len(points), "slots": slots}) if len(points) > 1 else None
    try:
        return loop.run(carry, train_chunk, updates_per_chunk=length, evaluate=evaluate, eval_every=cfg.eval_every,
                        after_chunk=save_rollout, summary_fields=summary_fields, stop_after_updates=stop_after_updates)
    finally:
        if writer is not None:
            writer.close()


def run_sweep(cfg: ScaleOutConfig, area: str, algo: str,
              make_train: Callable[[Any, envs.VecEnv, int, bool], Algorithm],
              stop_after_updates: int | None = None) -> dict:
    """Every point of ``cfg.sweep`` times every seed (this part's programs with ``--sweep-part``): one
    compiled program per combination of the shape-changing fields, each training its shape-free points at
    once (:func:`run_training` with ``points``); see :func:`utils.sweep.run_grid` for the folder layout."""
    return sweeps.run_grid(cfg, area, algo,
                           lambda program_cfg, points: run_training(program_cfg, area, algo, make_train,
                                                                    stop_after_updates,
                                                                    points=[hyper_of(p) for p in points]))


def run_main(config_cls: type, area: str, algo: str, train: Callable, argv: list[str] | None,
             sweep: Callable | None = None) -> dict:
    """The body of every PPO-family ``main``: compilation cache, config from presets and flags, train
    (or ``sweep(cfg)`` when ``--sweep`` is given)."""
    from utils import distributed
    from utils.config import parse_config
    from utils.jax_setup import enable_compilation_cache

    enable_compilation_cache()
    distributed.initialize()  # several processes (Slurm, or CRAFTAX_COORDINATOR): before any device is used
    cfg = parse_config(config_cls, area, algo, argv)
    if getattr(cfg, "sweep", ()):
        result = sweep(cfg)
        print(f"sweep folder: {result['run_dir']} (rank it: python -m benchmarks.sweep {result['run_dir']})")
        return result
    result = train(cfg)
    print(f"run folder: {result['run_dir']}")
    return result


def rollout_for_writer(rollout, update: int) -> dict:
    """Turn the vmapped last rollout ([seeds, T, envs, ...]) into time-major [T, seeds*envs, ...]."""
    transitions, last_value = jax.device_get(rollout)

    def streams(x):
        x = np.swapaxes(np.asarray(x), 0, 1)  # [T, S, N, ...]
        return x.reshape((x.shape[0], -1) + x.shape[3:])

    return {
        "update": update,
        "obs": streams(transitions.obs),
        "action": streams(transitions.action),
        "reward": streams(transitions.reward),
        "done": streams(transitions.done),
        "log_prob": streams(transitions.log_prob),
        "value": streams(transitions.value),
        "terminal_obs": streams(transitions.terminal_obs),
        "last_value": np.asarray(last_value).reshape(-1),
    }
