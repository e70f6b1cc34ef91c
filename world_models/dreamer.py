"""Dreamer V1, V2 and V3 on batched Craftax envs, trained end to end in compiled chunks.

Read top to bottom: the config (named settings; ``--version K`` applies the preset ``vK`` of that paper),
``make_train`` (pure and jittable: act in the envs with the posterior state, store rows in the
device replay, train at the configured ratio; vmapped over seeds), the host loop (logging, progress,
evaluation with open-loop reports, checkpoints and resume, through :class:`utils.training.HostLoop`)
and ``main``. The networks and losses live in :mod:`world_models.common`, shared by the versions.

    python -m world_models.dreamer --version 3 --preset debug
    python -m world_models.dreamer --version 3 --preset xs cpu --total-steps 200000 --num-seeds 2
    python -m world_models.dreamer --version 2 --env Craftax-Classic-Pixels-v1 --preset s
    python -m world_models.dreamer --version 1 --help

Runs are filed under ``runs/world_models/dreamer_v<k>/<env>/<run-name>/``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import warnings
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from utils import envs, training
from utils import sweep as sweeps
from utils.config import RunConfig, apply_presets, load_presets, parse_config
from utils.errors import UserError, exit_on_user_error
from utils.evaluation import Policy, make_evaluate
from utils.training import ChunkOutput, EpisodeStats, HostLoop
from world_models.common import replay as replay_lib
from world_models.common.agent import Agent, AgentState
from world_models.common.config import AgentConfig
from world_models.common.report import make_openloop, write_report

AREA, PRESETS = "world_models", "dreamer"
VERSIONS = (1, 2, 3)
#: XLA options for --fast-compile: no LLVM optimisation of the generated code.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@dataclasses.dataclass
class DreamerConfig(RunConfig, sweeps.SweepFields):
    """Dreamer V1/V2/V3 (defaults: the chosen version's paper settings; see --preset debug / xs..xl / cpu)."""

    #: Read by the gradient step as traced values (``Agent.hyper``): a --sweep over them is one program.
    SWEEP_FIELDS: ClassVar[tuple[str, ...]] = ("model_lr", "actor_lr", "critic_lr", "actor_entropy")

    #: No schedule depends on the run's length (the replay buffer, learning rates and the actor's
    #: entropy are constant), so a finished run extends when re-run with a larger --total-steps.
    LENGTH_FIELDS: ClassVar[frozenset[str]] = frozenset({"total_steps"})

    version: int = 3
    """Dreamer version 1, 2 or 3: shorthand for the preset v<k> (that paper's named settings and sizes,
    applied before other presets); also names the run folder dreamer_v<k>."""
    # -- collection and replay
    num_envs: int = 16
    """Parallel envs per seed (each is one replay stream)."""
    reset_ratio: int = 16
    """Optimistic resets: generate num_envs / reset_ratio fresh worlds per step."""
    collect_steps: int = 2
    """Env steps per env in one update, before its gradient steps."""
    train_ratio: float = 32.0
    """Replayed steps per env step (V3's definition); gradient steps per update are
    train_ratio * num_envs * collect_steps / (batch_size * batch_length) and must be whole."""
    early_train_ratio: float = 0.0
    """Train ratio for the first --early-steps env steps (then --train-ratio): more gradient steps while
    the reward head has not yet separated achievements, fewer once it has; 0: one ratio throughout."""
    early_steps: int = 0
    """Env steps per seed trained at --early-train-ratio (a whole number of updates)."""
    prefill: int = 256
    """Env steps per env with uniform random actions before training starts (>= batch_length)."""
    replay_size: int = 1_000_000
    """Replay capacity per seed in env steps, split evenly over the env streams."""
    symbolic_storage: str = "float16"
    """dtype symbolic observations are stored in (float16 or float32); pixels are stored as uint8."""
    batch_size: int = 16
    """Sequences per gradient step."""
    batch_length: int = 64
    """Steps per sequence."""
    # -- world model
    deter: int = 512
    """GRU (deterministic state) units."""
    hidden: int = 512
    """Units of the RSSM's input, prior and posterior layers."""
    stoch: int = 32
    """Stochastic latent variables (V1: Gaussian dimensions; V2/V3: categoricals)."""
    classes: int = 32
    """Classes per categorical latent (V2/V3)."""
    units: int = 512
    """Units per layer of the MLP encoder, decoder, heads, actor and critic."""
    layers: int = 2
    """Layers of those MLPs."""
    cnn_depth: int = 32
    """Channels of the first CNN layer (doubling per stage) for pixel envs."""
    cnn_stages: int = 4
    """Stride-2 CNN stages (a 63x63 frame becomes 4x4)."""
    act: str = "silu"
    """Activation: silu (V3), elu (V1/V2) or relu."""
    norm: bool = True
    """LayerNorm after every hidden layer (V2/V3)."""
    unimix: float = 0.01
    """Uniform mix into the categorical latents and the actor's categorical (V3: 0.01; V1/V2: 0)."""
    min_std: float = 0.1
    """V1: minimum std of the Gaussian latent."""
    bins: int = 255
    """Bins of symlog_twohot reward and critic heads (V3: 255)."""
    # -- named settings: the presets v1, v2, v3 set each paper's values; any mix of them runs
    latent: str = "categorical"
    """Stochastic latent: gaussian (V1, Hafner et al. 2020: stoch dims) or categorical (V2 2021, V3 2023:
    stoch one-hots of classes classes, straight-through)."""
    symlog_inputs: bool = True
    """Symlog a symbolic observation before the encoder (V3; V1/V2: no)."""
    recon: str = "symlog_mse"
    """Reconstruction loss: gaussian (1/2 squared error, V1/V2) or symlog_mse (V3: squared error on
    symlog(obs) for vector observations, on the pixels for images)."""
    reward_head: str = "symlog_twohot"
    """Reward head: gaussian (1/2 squared error, V1/V2), symlog_twohot (V3 paper: cross-entropy over bins
    bins evenly spaced in symlog space, zero-initialised) or symexp_twohot (current DreamerV3 code: two-hot
    of the raw reward over symexp-spaced bins, expectation read out in raw space)."""
    critic_head: str = "symlog_twohot"
    """Critic head: gaussian (1/2 squared error, V1/V2), symlog_twohot (V3) or symexp_twohot."""
    kl: str = "free_bits"
    """KL regulariser: free_nats (V1: max(mean KL, free_nats)), balanced (V2: kl_balance, kl_scale,
    free_nats per side) or free_bits (V3: dyn_scale and rep_scale, free_nats per step)."""
    actor_grad: str = "reinforce"
    """Actor gradient: dynamics (V1: returns backpropagated through the imagined dynamics), reinforce
    (V2/V3: log-prob times advantage) or mix (DreamerV2 for continuous control; see actor_grad_mix)."""
    actor_grad_mix: float = 0.1
    """With --actor-grad mix: the dynamics term's weight, the rest REINFORCE (DreamerV2's actor_grad_mix)."""
    actor_init_scale: float = 0.01
    """Scale of the actor's output-layer initialisation (V3: 0.01, a near-uniform first policy; V1/V2: 1)."""
    return_norm: str = "percentile"
    """Advantage normalisation: none (V1/V2) or percentile (V3: divided by max(1, EMA of the returns'
    95th - 5th percentile))."""
    slow_critic: str = "ema"
    """Slow critic: none (V1), copy (V2's target network, every target_update_every steps) or ema (V3,
    rate slow_critic_rate)."""
    slow_critic_returns: bool = False
    """Lambda-returns bootstrap from the slow critic (V2) instead of the critic (V1/V3)."""
    replay_value_scale: float = 0.0
    """Weight of the replay-value loss (current DreamerV3 code: 0.3; papers: 0): the critic also regresses
    lambda-returns of the real rewards on the replayed posterior states, bootstrapped from imagination (with
    imag_starts, from the critic's value where no imagination started)."""
    dyn_inputs: str = "joint"
    """How the previous sample and action enter the RSSM's GRU: joint (V1-V3 papers: one dense layer over
    their concatenation) or split (current DreamerV3 code: a normalised layer each for the previous
    deter, sample and action, so a few action dims are not drowned by a 1,024-wide sample)."""
    imag_starts: int = 0
    """Imagine from this many posterior states of each batch, drawn at random; 0: from all of them."""
    replay_context: bool = False
    """Replay context (current DreamerV3 code, its replay_context: 1; the papers: off): replay keeps each
    row's posterior latent (deter as float16, the sample as class indices), a training chunk starts from
    the latent of the row before it instead of zeros, so memory resets only where an episode starts, and
    each gradient step writes its posteriors back into the rows it replayed. Without it a chunk starts
    blind: Craftax's symbolic observation shows no achievement flags, so it cannot tell a first unlock
    (+1) from a repeat (0) early in a chunk. Off until measured (docs/world_models.md)."""
    imag_cont: str = "prob"
    """How imagined returns use the continue head: prob (discount by its probability, V2) or mode (0 or 1,
    the DreamerV3 code). With prob, a state the model thinks half over keeps imagining past its end, so a
    large reward on ending (Tetris' shaping on a bad board) can be collected again at every step."""
    # -- world-model losses
    free_nats: float = 1.0
    """V1: free nats on the mean KL; V2: on each balanced term; V3: free bits per step."""
    kl_balance: float = 0.8
    """V2: weight of the prior's side of the KL."""
    kl_scale: float = 1.0
    """V2: scale of the balanced KL loss."""
    dyn_scale: float = 0.5
    """V3: weight of the dynamics KL loss."""
    rep_scale: float = 0.1
    """V3: weight of the representation KL loss."""
    # -- optimisers
    model_lr: float = 1e-4
    """World-model Adam learning rate."""
    model_eps: float = 1e-8
    """World-model Adam epsilon."""
    model_grad_clip: float = 1000.0
    """World-model gradient global-norm clip."""
    actor_lr: float = 3e-5
    """Actor Adam learning rate."""
    critic_lr: float = 3e-5
    """Critic Adam learning rate."""
    ac_eps: float = 1e-5
    """Actor and critic Adam epsilon."""
    ac_grad_clip: float = 100.0
    """Actor and critic gradient global-norm clip."""
    # -- behaviour
    imag_horizon: int = 15
    """Imagined steps per start state."""
    gamma: float = 0.997
    """Discount."""
    lam: float = 0.95
    """Lambda of the lambda-returns."""
    actor_entropy: float = 3e-4
    """Entropy bonus of the actor."""
    target_update_every: int = 100
    """slow_critic copy (V2): copy the critic into the slow critic every this many gradient steps."""
    slow_critic_rate: float = 0.02
    """slow_critic ema (V3): EMA rate of the slow critic."""
    slow_critic_reg: float = 1.0
    """Weight of the critic's loss towards the slow critic's values (V3: 1; V1/V2: 0)."""
    retnorm_decay: float = 0.99
    """return_norm percentile (V3): EMA decay of the return percentiles."""
    # -- the host loop
    updates_per_chunk: int = 25
    """Updates per compiled chunk; the host logs and checkpoints between chunks."""
    checkpoint_every: int = 500
    """Save a checkpoint (including the replay) every this many updates (and at the end)."""
    eval_every: int = 0
    """Evaluate and write the open-loop report every this many updates; 0: only at the end."""
    eval_envs: int = 16
    """Evaluation episodes per seed (one per env); 0 turns evaluation episodes off."""
    eval_max_steps: int = 10_000
    """Evaluation stops after this many steps even if some episodes are still running."""
    report_context: int = 8
    """Open-loop report: steps observed before predicting."""
    report_horizon: int = 24
    """Open-loop report: steps predicted from the actions alone."""
    report_sequences: int = 4
    """Open-loop report: replay sequences shown."""
    fast_compile: bool = False
    """Compile without XLA's backend optimisations: about half the compile time on a CPU, slower
    steps; for short checks (the debug preset). Symbolic envs only: unoptimised pixel rendering and
    convolutions run 10x slower or worse, which costs more than the compile saves."""


def algo_name(cfg: DreamerConfig) -> str:
    return f"dreamer_v{cfg.version}"


def version_from_argv(argv: Sequence[str]) -> int:
    """The ``--version`` on the command line (last one wins), needed before presets are applied."""
    version = DreamerConfig.version
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--version=") else (
            argv[i + 1] if arg == "--version" and i + 1 < len(argv) else None)
        if value is not None:
            if value not in {str(v) for v in VERSIONS}:
                raise UserError(f"--version must be one of {', '.join(map(str, VERSIONS))}, got {value!r}")
            version = int(value)
    return version


def version_defaults(version: int) -> DreamerConfig:
    """The dataclass defaults with the version's paper preset applied."""
    cfg = apply_presets(DreamerConfig(version=version), [f"v{version}"], load_presets(AREA, PRESETS),
                        f"configs/{AREA}/{PRESETS}.yaml")
    return dataclasses.replace(cfg, preset=())


def make_config(version: int = 3, presets: Sequence[str] = (), **fields) -> DreamerConfig:
    """What ``--version V --preset P... --field value`` resolves to (for tests and benchmarks)."""
    cfg = apply_presets(version_defaults(version), list(presets), load_presets(AREA, PRESETS),
                        f"configs/{AREA}/{PRESETS}.yaml")
    return dataclasses.replace(cfg, **fields)


def grad_steps_per_update(cfg: DreamerConfig, ratio: float | None = None) -> int:
    """Whole gradient steps per update at ``ratio`` (default ``train_ratio``), or a UserError saying how to
    get them."""
    ratio = cfg.train_ratio if ratio is None else ratio
    env_steps = cfg.num_envs * cfg.collect_steps
    exact = ratio * env_steps / (cfg.batch_size * cfg.batch_length)
    if exact < 1 - 1e-9 or abs(exact - round(exact)) > 1e-6:
        per_env_step = ratio * cfg.num_envs / (cfg.batch_size * cfg.batch_length)
        fix = next((k for k in range(1, 10_001) if abs(k * per_env_step - round(k * per_env_step)) < 1e-6
                    and round(k * per_env_step) >= 1), None)
        hint = f"; e.g. --collect-steps {fix}" if fix else ""
        raise UserError(
            f"train_ratio {ratio} x {env_steps} env steps per update / ({cfg.batch_size} x "
            f"{cfg.batch_length}) replayed steps per gradient step = {exact:.4g} gradient steps per update; "
            f"it must be a whole number >= 1{hint}")
    return int(round(exact))


def early_updates(cfg: DreamerConfig) -> int:
    """Updates trained at ``early_train_ratio`` (0: no schedule)."""
    if not cfg.early_train_ratio or not cfg.early_steps:
        return 0
    per_update = cfg.num_envs * cfg.collect_steps
    if cfg.early_steps % per_update or cfg.early_steps < 0:
        raise UserError(f"--early-steps {cfg.early_steps} must be a whole number of updates: a multiple of "
                        f"num_envs x collect_steps = {per_update}")
    return cfg.early_steps // per_update


def sequence_length(cfg: DreamerConfig) -> int:
    """Rows a training chunk reads from replay: with replay context, one more before the chunk."""
    return cfg.batch_length + int(cfg.replay_context)


def validate(cfg: DreamerConfig) -> None:
    if cfg.version not in VERSIONS:
        raise UserError(f"--version must be one of {', '.join(map(str, VERSIONS))}, got {cfg.version}")
    if cfg.env not in envs.ENV_NAMES:
        raise envs.UnknownEnvError(f"unknown env {cfg.env!r}; valid names: {', '.join(envs.ENV_NAMES)}")
    capacity = cfg.replay_size // cfg.num_envs
    needed = max(sequence_length(cfg), cfg.report_context + cfg.report_horizon)
    if capacity < needed:
        raise UserError(f"replay_size {cfg.replay_size} gives {capacity} steps per env stream; need at least "
                        f"{needed} (batch_length, one more with --replay-context, and report_context + "
                        "report_horizon)")
    if cfg.prefill < needed:
        raise UserError(f"prefill {cfg.prefill} must be at least {needed} so that replay holds whole sequences "
                        "before training")
    if cfg.symbolic_storage not in ("float16", "float32"):
        raise UserError(f"--symbolic-storage must be float16 or float32, got {cfg.symbolic_storage!r}")
    if cfg.act not in ("silu", "elu", "relu"):
        raise UserError(f"--act must be silu, elu or relu, got {cfg.act!r}")
    grad_steps_per_update(cfg)
    if early_updates(cfg):
        grad_steps_per_update(cfg, cfg.early_train_ratio)
    AgentConfig.from_fields(cfg)  # the named settings' choices
    if cfg.imag_starts > cfg.batch_size * cfg.batch_length:
        raise UserError(f"--imag-starts {cfg.imag_starts} is more than the {cfg.batch_size * cfg.batch_length} "
                        "posterior states of a batch (batch_size x batch_length)")


# ---------------------------------------------------------------------------------------------------
# The compiled program
# ---------------------------------------------------------------------------------------------------


@struct.dataclass
class Collector:
    """Where every env stream stands: the row the agent is about to act on, and its memory."""

    env_state: envs.VecEnvState
    obs: jax.Array  # [N, ...] as stored in replay
    reward: jax.Array  # [N] reward that came with obs
    is_first: jax.Array  # [N] obs starts an episode
    is_terminal: jax.Array  # [N] obs is the last of its episode (the env has already reset)
    reset_obs: jax.Array  # [N, ...] first obs of the next episode, shown after a terminal row
    policy_state: Any  # (RSSMState [N], previous action one-hot [N, A])
    unlock: jax.Array  # [N] int8 achievement done by the step that led to obs (-1: none); diagnostics only
    unlock_first: jax.Array  # [N] that step unlocked an achievement for the first time in its episode


@struct.dataclass
class TrainCarry:
    """Everything a seed needs to continue training; it is exactly what a checkpoint holds."""

    agent: AgentState
    replay: replay_lib.Replay
    collector: Collector
    key: jax.Array
    env_steps: jax.Array  # int32, steps taken per env
    update: jax.Array  # int32, completed updates


def storage_dtype(cfg: DreamerConfig, env: envs.VecEnv):
    return jnp.uint8 if env.is_pixels else jnp.dtype(cfg.symbolic_storage)


def make_store(cfg: DreamerConfig, env: envs.VecEnv):
    """Env observation -> the form kept in replay (and acted on, so acting sees what training sees)."""
    dtype = storage_dtype(cfg, env)
    if dtype == jnp.uint8:
        return lambda obs: jnp.round(jnp.clip(obs, 0.0, 1.0) * 255).astype(jnp.uint8)
    return lambda obs: obs.astype(dtype)


def achievement_events(env: envs.VecEnv, key: jax.Array, env_state: envs.VecEnvState, action: jax.Array):
    """``(unlock [N] int8, unlock_first [N] bool)`` of ``env.step(key, env_state, action)``: an achievement
    the step does (-1: none; a first unlock if it has one) and whether it unlocks one for the first time.

    For the diagnostics ``diag/reward_pred_{first,repeat}`` only. An env's achievement flags are sticky, so
    a repeat (wood collected again) changes nothing the step returns; the step is taken again from the same
    state with its flags cleared and the same per-env keys as ``VecEnv.step`` (its observation is dropped,
    so compiled code does not render it). Envs whose state has no ``achievements`` report none."""
    state = env_state.env_state
    n = action.shape[0]
    if not hasattr(state, "achievements"):
        return jnp.full(n, -1, jnp.int8), jnp.zeros(n, bool)
    step_key, _ = jax.random.split(key)  # as VecEnv.step: (step, reset) keys, then one step key per env
    cleared = state.replace(achievements=jnp.zeros_like(state.achievements))
    after = jax.vmap(lambda k, s, a: env.base_env.step(k, s, a, env.params)[1])(
        jax.random.split(step_key, n), cleared, action)
    done, before = after.achievements.astype(bool), state.achievements.astype(bool)
    first = done & ~before
    unlock = jnp.where(first.any(-1), jnp.argmax(first, -1), jnp.where(done.any(-1), jnp.argmax(done, -1), -1))
    return unlock.astype(jnp.int8), first.any(-1)


def where_env(mask: jax.Array, new, old):
    """Per-env select over pytrees whose leaves lead with the env axis."""
    return jax.tree.map(lambda a, b: jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b), new, old)


class Program(NamedTuple):
    """The compiled pieces. ``init``, ``init_from_reset`` and ``collect`` are for one seed;
    ``train_chunk(carry, length, hyper=None)`` takes the seeds stacked (``init_seeds``), runs ``length``
    updates and returns ``(carry, (episode stats [seeds, length], metrics [seeds, length]))``; ``hyper``
    holds ``Agent.hyper``'s fields, one value per seed (slot) when a sweep trains several points at once.
    ``init(key)`` is ``init_from_reset(key', *env.reset(reset_key))``."""

    agent: Agent
    init: Callable[[jax.Array], TrainCarry]
    init_from_reset: Callable[..., TrainCarry]
    collect: Callable[[TrainCarry], tuple]  # one update's acting and replay writes, no training
    train_chunk: Callable[[TrainCarry, int], tuple]


def make_train(cfg: DreamerConfig, env: envs.VecEnv) -> Program:
    agent = Agent(AgentConfig.from_fields(cfg), env.obs_shape, env.num_actions)
    store = make_store(cfg, env)
    capacity = cfg.replay_size // cfg.num_envs
    n = cfg.num_envs

    def init_from_reset(key: jax.Array, obs: jax.Array, env_state: envs.VecEnvState) -> TrainCarry:
        key, agent_key = jax.random.split(key)
        obs = store(obs)
        false = jnp.zeros(n, bool)
        policy_state = agent.initial_policy_state(n)
        no_unlock = jnp.full(n, -1, jnp.int8)
        collector = Collector(env_state, obs, jnp.zeros(n), jnp.ones(n, bool), false, obs, policy_state, no_unlock,
                              false)
        example_row = dict(obs=obs, action=jnp.zeros(n, jnp.int32), reward=jnp.zeros(n), is_first=false,
                           is_terminal=false, unlock=no_unlock, unlock_first=false,
                           **agent.replay_fields(policy_state))
        return TrainCarry(agent.init(agent_key), replay_lib.empty(example_row, n, capacity), collector, key,
                          jnp.int32(0), jnp.int32(0))

    def init(key: jax.Array) -> TrainCarry:
        key, reset_key = jax.random.split(key)
        return init_from_reset(key, *env.reset(reset_key))

    def env_step(state, _):
        """One step of every env. A terminal row is shown to the agent (so the model learns the last
        reward and the end of the episode) while its env stays put; the reset observation follows."""
        c, params, env_steps, key = state
        key, act_key, step_key = jax.random.split(key, 3)
        action, policy_state = agent.act(params, c.obs, c.policy_state, c.is_first, act_key,
                                         random=env_steps < cfg.prefill)
        row = dict(obs=c.obs, action=action, reward=c.reward, is_first=c.is_first, is_terminal=c.is_terminal,
                   unlock=c.unlock, unlock_first=c.unlock_first, **agent.replay_fields(policy_state))
        obs, env_state, reward, done, info = env.step(step_key, c.env_state, action)
        unlock, unlock_first = achievement_events(env, step_key, c.env_state, action)
        skip = c.is_terminal  # this env showed its terminal row: move on to the stashed first obs
        done = done & ~skip
        obs, terminal_obs = store(obs), store(info["terminal_obs"])
        c = Collector(
            env_state=where_env(skip, c.env_state, env_state),
            obs=where_env(skip, c.reset_obs, where_env(done, terminal_obs, obs)),
            reward=jnp.where(skip, 0.0, reward),
            is_first=skip,
            is_terminal=done,
            reset_obs=where_env(done, obs, c.reset_obs),
            policy_state=policy_state,
            unlock=jnp.where(skip, -1, unlock).astype(jnp.int8),
            unlock_first=unlock_first & ~skip,
        )
        return (c, params, env_steps + 1, key), (row, EpisodeStats.from_step(done, info))

    latent_keys = tuple(agent.replay_fields(agent.initial_policy_state(1)))  # empty without replay context

    def train(agent_state: AgentState, replay: replay_lib.Replay, latents: dict, key: jax.Array, hyper: dict,
              grad_steps: int):
        """``grad_steps`` gradient steps; returns the replay's ``latents`` as they refreshed them (replay
        context; ``{}`` without). Only these fields travel through the loops and the branch around them:
        a replay passed back out of them could cost a copy of every observation per update."""

        def grad_step(state, key):
            agent_state, latents = state
            agent_state, updated, metrics = agent.replay_step(
                agent_state, replay._replace(data={**replay.data, **latents}), key, cfg.batch_size, cfg.batch_length,
                hyper)
            return (agent_state, {k: updated.data[k] for k in latents}), metrics

        (agent_state, latents), metrics = jax.lax.scan(grad_step, (agent_state, latents),
                                                       jax.random.split(key, grad_steps))
        return agent_state, latents, grad_step_means(metrics)

    def collect(carry: TrainCarry) -> tuple[TrainCarry, EpisodeStats]:
        """``collect_steps`` steps of every env, written to replay; stats summed over the steps."""
        key, collect_key = jax.random.split(carry.key)
        (collector, _, env_steps, _), (rows, stats) = jax.lax.scan(
            env_step, (carry.collector, carry.agent.params, carry.env_steps, collect_key), None,
            length=cfg.collect_steps)
        carry = carry.replace(replay=replay_lib.add(carry.replay, rows), collector=collector, env_steps=env_steps,
                              key=key)
        return carry, stats.sum()

    def update(carry: TrainCarry, hyper: dict, grad_steps: int):
        """One update of every seed (``carry`` leads with the seed axis). Whether to train is decided
        once for all seeds -- they step in lockstep -- so that ``cond`` stays a branch; on a per-seed
        predicate vmap turns it into a select that runs the gradient steps during prefill too."""
        carry, stats = jax.vmap(collect)(carry)
        keys = jax.vmap(jax.random.split)(carry.key)
        key, train_key = keys[:, 0], keys[:, 1]
        first = jax.tree.map(lambda x: x[0], carry)
        ready = replay_lib.can_sample(first.replay, sequence_length(cfg)) & (first.env_steps >= cfg.prefill)
        train_seeds = jax.vmap(functools.partial(train, grad_steps=grad_steps))
        latents = {k: carry.replay.data[k] for k in latent_keys}
        metrics_shape = jax.eval_shape(train_seeds, carry.agent, carry.replay, latents, train_key, hyper)[2]
        skip = lambda agent_state, replay, latents, key, hyper: (
            agent_state, latents, jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), metrics_shape))
        agent_state, latents, metrics = jax.lax.cond(ready, train_seeds, skip, carry.agent, carry.replay, latents,
                                                     train_key, hyper)
        metrics["perf/grad_steps"] = agent_state.grad_steps.astype(jnp.float32)
        replay = carry.replay._replace(data={**carry.replay.data, **latents})
        carry = carry.replace(agent=agent_state, replay=replay, key=key, update=carry.update + 1)
        return carry, (stats, metrics)

    def train_chunk(carry: TrainCarry, length: int, hyper: dict | None = None, ratio: float | None = None):
        """``length`` updates of every seed at train ratio ``ratio`` (default ``train_ratio``); outputs lead
        with the seed axis, then the update."""
        grad_steps = grad_steps_per_update(cfg, ratio)
        if hyper is None:
            seeds = jax.tree.leaves(carry.key)[0].shape[0]
            hyper = {k: jnp.full(seeds, v, jnp.float32) for k, v in agent.hyper().items()}
        carry, outputs = jax.lax.scan(lambda c, _: update(c, hyper, grad_steps), carry, None, length=length)
        return carry, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outputs)

    return Program(agent, init, init_from_reset, collect, train_chunk)


def init_seeds(program: Program, env: envs.VecEnv, keys: jax.Array) -> TrainCarry:
    """``program.init`` for each seed, stacked: one seed at a time like ``utils.training.init_per_seed``, with
    the env reset compiled on its own -- that program is the same for every version and agent size,
    so the persistent compilation cache serves it to every later run on the env."""
    reset, init_from_reset = jax.jit(env.reset), jax.jit(program.init_from_reset)
    carries = []
    for key in keys:
        key, reset_key = jax.random.split(key)
        carries.append(init_from_reset(key, *reset(reset_key)))
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *carries)


def make_policy(agent: Agent, store) -> Policy:
    """Evaluation acts like collection: the posterior state on each new observation."""

    def act(params, obs, state, key):
        policy_state, is_first = state
        action, policy_state = agent.act(params, store(obs), policy_state, is_first, key)
        return action, (policy_state, jnp.zeros_like(is_first))

    return Policy(act, lambda n: (agent.initial_policy_state(n), jnp.ones(n, bool)),
                  lambda state, done: (state[0], done))


# ---------------------------------------------------------------------------------------------------
# The host loop
# ---------------------------------------------------------------------------------------------------


def num_updates_for(cfg: DreamerConfig) -> int:
    return training.updates_for(cfg.total_steps, cfg.num_envs * cfg.collect_steps)


def chunk_length(cfg: DreamerConfig) -> int:
    """Updates per compiled chunk; with an early train ratio, also a divisor of its updates, so that no
    chunk straddles the switch."""
    total, early = num_updates_for(cfg), early_updates(cfg)
    return training.largest_chunk(total, cfg.updates_per_chunk, math.gcd(total, early) if early else None)


def compiler_options(cfg: DreamerConfig, env: envs.VecEnv) -> dict | None:
    return FAST_COMPILE if cfg.fast_compile and not env.is_pixels else None


def seed_keys(cfg: DreamerConfig) -> jax.Array:
    return training.seed_keys(cfg.seed, cfg.num_seeds)


def grad_step_means(metrics: dict) -> dict:
    """One value per metric for an update's gradient steps (leading axis). The diagnostics
    (``diag/...``) are means over the batch's steps of one kind (e.g. rewarded steps) and are NaN for a
    batch that has none, so they average over the batches that have some; a NaN loss still shows."""
    return {k: jnp.nanmean(v, 0) if k.startswith("diag/") else jnp.mean(v, 0) for k, v in metrics.items()}


def chunk_means(metrics: dict) -> dict[str, np.ndarray]:
    """Per-seed means over the updates of a chunk that trained (``[seeds, 1]``; NaN if none did);
    counters (``perf/...``) keep their value at the end of the chunk."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a chunk entirely in prefill
        return {k: (np.asarray(v, dtype=np.float64)[:, -1:] if k.startswith("perf/")
                    else np.nanmean(np.asarray(v, dtype=np.float64), axis=1, keepdims=True))
                for k, v in metrics.items()}


def train(cfg: DreamerConfig, stop_after_updates: int | None = None, points: list[dict] | None = None) -> dict:
    """Train (or resume) the run described by ``cfg``; returns the summary, final carry and run folder.

    ``stop_after_updates`` ends the loop early as if the process had been killed there (for tests).
    ``points``: values of ``SWEEP_FIELDS`` trained together in this one program, each with all of
    ``cfg``'s seeds (slot ``p * num_seeds + s`` starts exactly like seed ``s``; default: ``cfg``'s own).
    """
    validate(cfg)
    points = points or [sweeps.hyper_of(cfg)]
    env = envs.make(cfg.env, cfg.num_envs, reset_ratio=cfg.reset_ratio)
    program = make_train(cfg, env)
    agent = program.agent
    length = chunk_length(cfg)
    total_updates = num_updates_for(cfg)
    loop = HostLoop(cfg, AREA, algo_name(cfg), steps_per_update=cfg.num_envs * cfg.collect_steps,
                    total_updates=total_updates, achievement_names=env.achievement_names)
    per_slot = lambda tree: jax.tree.map(lambda x: jnp.concatenate([x] * len(points)), tree)
    carry = loop.restore(per_slot(init_seeds(program, env, seed_keys(cfg))))
    hyper = {k: jnp.asarray(np.repeat([p[k] for p in points], cfg.num_seeds), jnp.float32) for k in points[0]}

    jit = lambda f: jax.jit(f, compiler_options=compiler_options(cfg, env))
    run_chunk = jit(lambda c, h: program.train_chunk(c, length, h))
    switch = early_updates(cfg)
    run_early = jit(lambda c, h: program.train_chunk(c, length, h, cfg.early_train_ratio)) if switch else None
    run_eval = None
    if cfg.eval_envs:
        evaluate = make_evaluate(cfg.env, cfg.eval_envs, make_policy(agent, make_store(cfg, env)),
                                 max_steps=cfg.eval_max_steps, reset_ratio=cfg.reset_ratio)
        run_eval = jit(jax.vmap(evaluate))
    openloop = make_openloop(agent, cfg.report_context, cfg.report_horizon, cfg.report_sequences)
    first_seed = lambda tree: jax.tree.map(lambda x: x[0], tree)
    run_report = jit(lambda params, replay, key: openloop(first_seed(params), first_seed(replay), key))

    def train_chunk(carry: TrainCarry, _length: int) -> ChunkOutput:
        early = run_early is not None and int(jax.device_get(carry.update[0])) < switch
        carry, (stats, metrics) = (run_early if early else run_chunk)(carry, hyper)
        stats, metrics = jax.device_get((stats, metrics))
        return ChunkOutput(carry, stats, chunk_means(metrics))

    def evaluate(carry: TrainCarry, key: jax.Array) -> dict:
        metrics = {}
        if run_eval is not None:
            keys = per_slot(jax.random.split(key, cfg.num_seeds))
            metrics.update(loop.eval_metrics(jax.device_get(run_eval(carry.agent.params, keys))))
        report = jax.device_get(run_report(carry.agent.params, carry.replay, key))
        metrics.update(write_report(report, loop.run_dir, cfg.report_context, env.is_pixels))
        return metrics

    summary_fields = (lambda: {"sweep_points": len(points), "slots": len(points) * cfg.num_seeds}) \
        if len(points) > 1 else None
    return loop.run(carry, train_chunk, updates_per_chunk=length, evaluate=evaluate, eval_every=cfg.eval_every,
                    summary_fields=summary_fields, stop_after_updates=stop_after_updates)


def sweep(cfg: DreamerConfig, stop_after_updates: int | None = None) -> dict:
    """Every point of ``cfg.sweep`` x every seed (:func:`utils.sweep.run_grid`): the learning rates and
    the entropy bonus train in one program; other fields (sizes, train ratio) one program per value."""
    return sweeps.run_grid(cfg, AREA, algo_name(cfg),
                           lambda program_cfg, points: train(program_cfg, stop_after_updates,
                                                             [sweeps.hyper_of(p) for p in points]))


def parse_dreamer_config(argv: Sequence[str] | None = None) -> DreamerConfig:
    """``--version`` first (it picks the paper preset), then presets left to right, then flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return parse_config(DreamerConfig, AREA, PRESETS, argv, default=version_defaults(version_from_argv(argv)))


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    from utils.jax_setup import enable_compilation_cache

    enable_compilation_cache()
    cfg = parse_dreamer_config(argv)
    if cfg.sweep:
        result = sweep(cfg)
        print(f"sweep folder: {result['run_dir']} (rank it: python -m benchmarks.sweep {result['run_dir']})")
        return result
    result = train(cfg)
    print(f"run folder: {result['run_dir']}")
    return result


if __name__ == "__main__":
    main()
