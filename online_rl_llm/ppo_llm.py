"""PPO whose policy sees a language model's hidden state of the observation next to the observation.

Every ``skip_n`` env steps, and at the first step of every episode, each env's observation is
turned into what the model reads and its hidden state fetched from a model in this process
(``--llm-model``) or from the hidden-state server (``--server-url``), through a cache
(``online_rl_llm.features``). On a symbolic env that is the canonical text (``utils.text_obs``, the
renderer labelling uses) and a language model; on a pixel env it is the frame itself and a
vision-language model (``utils.llm.frame_features``), and the policy is a CNN on the frame joined
with the feature (``utils.networks.feature_actor_critic``). Between refreshes the policy acts on the
held feature, z-normalised by running statistics (the offline-RL rule with running instead of
dataset statistics). The PPO pieces (losses, GAE, minibatch epochs, optimiser, evaluation, host
loop) come from ``online_rl.common`` and ``utils``.

Read top to bottom: the config, the network (observation + feature branch), ``make_train`` (pure,
jittable pieces: a segment of env steps that runs until the rollout is full or some env needs a
refresh, the PPO update, evaluation segments), the host loop that refreshes features between
segments (:class:`Runner`), and ``main``.

    python -m online_rl_llm.ppo_llm --preset debug --llm-model PATH
    python -m online_rl_llm.ppo_llm --preset cpu --llm-model Qwen/Qwen2.5-0.5B-Instruct --skip-n 25
    python -m online_rl_llm.ppo_llm --preset debug --server-url http://127.0.0.1:8000
    python -m online_rl_llm.ppo_llm --preset debug pixel --llm-model runs/tiny_vlm   # frames, a VLM
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from online_rl.common import (
    PPOFamilyConfig,
    Transition,
    categorical_log_prob_entropy,
    chunk_length,
    clipped_value_loss,
    make_optimizer,
    minibatch_epochs,
    num_updates_for,
    ppo_policy_loss,
    seed_keys,
)
from online_rl_llm.features import (
    HeldFeatures,
    LiveFeatures,
    RefreshCounters,
    check_same_identity,
    encoder_identity,
    feature_modality,
    normalise,
    open_encoder,
)
from utils import envs
from utils.envs.vec_env import strong_types
from utils.errors import UserError, exit_on_user_error
from utils.evaluation import FirstEpisodes
from utils.io import atomic_write_json
from utils.llm import LLMSpec
from utils.networks import ActorCritic, feature_actor_critic
from utils.returns import gae
from utils.run_dir import resolve_run_dir
from utils.training import ChunkOutput, EpisodeStats, HostLoop, init_per_seed

AREA, ALGO = "online_rl_llm", "ppo_llm"
FEATURES_FILE = "features.json"


@dataclasses.dataclass
class PPOLLMConfig(PPOFamilyConfig):
    """PPO with GAE whose policy also sees live LLM hidden states of the observation's text, or of
    its frame through a vision-language model on a pixel env."""

    skip_n: int = 25
    """Refresh every env's LLM feature every this many env steps (and at each episode's first step)."""
    llm_model: str | None = None
    """Model folder or hub id to load in this process (not needed with --server-url)."""
    server_url: str | None = None
    """Base URL of a hidden-state server (python -m servers.hidden_state_server); its model and prompt are used."""
    llm_layer: int = -1
    """Hidden-state layer (0 = embeddings, -1 = last); as in labelling."""
    llm_pooling: str = "last"
    """Pool token states into one vector: last, mean, or image_mean (a frame's image tokens; pixel envs)."""
    llm_template: str = "{text}"
    """Prompt template; '{text}' is replaced by the observation text (pixel envs: the env family's question)."""
    llm_system_prompt: str | None = None
    """Optional system prompt (through the tokenizer's chat template; pixel envs: replaces the family's)."""
    llm_backend: str = "transformers"
    """In-process backend: transformers (CPU or GPU) or vllm (GPU)."""
    llm_batch_size: int = 64
    """Texts per LLM forward pass."""
    llm_dtype: str = "auto"
    """LLM compute dtype: auto, float32, bfloat16 or float16."""
    llm_device: str = "auto"
    """LLM device: auto, cpu, cuda or cuda:N."""
    feature_width: int = 128
    """Units of the dense layer that projects the normalised feature before it joins the observation
    (one per actor and critic torso; on pixel envs one, after the shared CNN); 0 concatenates the
    normalised feature directly."""
    feature_cache_size: int = 100_000
    """Texts (or frames) whose hidden states are kept (least recently used dropped); memory about size * dim * 4 bytes."""

    def llm_spec(self) -> LLMSpec | None:
        """The in-process LLM's spec; None when the server supplies the features."""
        if self.server_url:
            return None
        return LLMSpec(model=self.llm_model or "", layer=self.llm_layer, pooling=self.llm_pooling,
                       template=self.llm_template, system_prompt=self.llm_system_prompt,
                       backend=self.llm_backend, batch_size=self.llm_batch_size, dtype=self.llm_dtype,
                       device=self.llm_device)


def check_config(cfg: PPOLLMConfig) -> None:
    if cfg.skip_n < 1:
        raise UserError(f"--skip-n must be at least 1, got {cfg.skip_n}")
    if cfg.save_trajectories:
        raise UserError("ppo_llm does not save trajectories (the dataset format has no place for live "
                        "features); record data with online_rl.ppo and label it with labelling")
    if cfg.server_url and cfg.llm_model:
        raise UserError("pass either --llm-model (load the LLM here) or --server-url (ask a server), not both")


# ---------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------


class PolicyInput(NamedTuple):
    """What the policy sees at one step; the rollout stores it, so PPO's ratio re-reads exactly it."""

    obs: jax.Array
    feature: jax.Array  # z-normalised LLM hidden state


def make_network(cfg: PPOLLMConfig, env: envs.VecEnv) -> ActorCritic:
    """``(obs, feature) -> (logits, value)``: utils.networks' feature actor-critic, an MLP torso each
    for actor and critic on symbolic observations (a shared torso lets the value loss swamp the
    policy), one CNN shared by both on pixels."""
    return feature_actor_critic(env.num_actions, env.is_pixels, cfg.layer_width, cfg.num_layers, cfg.activation,
                                cfg.feature_width)


# ---------------------------------------------------------------------------------------------------
# The compiled pieces
# ---------------------------------------------------------------------------------------------------


@struct.dataclass
class TrainCarry:
    """One seed's training state (stacked over seeds by the host loop); exactly what a checkpoint holds."""

    params: Any
    opt_state: Any
    env_state: envs.VecEnvState
    obs: jax.Array
    features: HeldFeatures
    key: jax.Array
    update: jax.Array  # completed updates
    step: jax.Array  # env steps taken by each env since the start; refreshes fall on multiples of skip_n


@struct.dataclass
class EvalState:
    """One seed's evaluation: one episode per env, features refreshed every skip_n steps for the
    envs still in their first episode (the others no longer count, so they cost no LLM calls)."""

    key: jax.Array
    obs: jax.Array
    env_state: envs.VecEnvState
    raw: jax.Array  # [n, D] held features
    t: jax.Array
    episodes: FirstEpisodes


class LLMAlgorithm(NamedTuple):
    """Pure, jittable pieces; the host loop (:class:`Runner`) calls them between refreshes.

    Training pieces take the carry stacked over seeds, so one refresh serves every seed:
    ``segment(carry, rollout, t)`` takes env steps ``t, t+1, ...`` of the rollout until the rollout
    is full or some env is stale; ``learn(carry, rollout)`` is the PPO update. Evaluation pieces are
    per seed (vmap them)."""

    init: Callable[[jax.Array], TrainCarry]
    new_rollout: Callable[[TrainCarry], Any]
    segment: Callable[[TrainCarry, Any, jax.Array], tuple]
    learn: Callable[[TrainCarry, Any], tuple]
    eval_start: Callable[[jax.Array], EvalState]
    eval_segment: Callable[[Any, Any, EvalState], EvalState]
    eval_running: Callable[[EvalState], jax.Array]


def make_train(cfg: PPOLLMConfig, env: envs.VecEnv, total_updates: int, dim: int) -> LLMAlgorithm:
    """The compiled pieces for LLM features of size ``dim``."""
    network = make_network(cfg, env)
    optimizer = make_optimizer(cfg, total_updates)

    def init(key: jax.Array) -> TrainCarry:
        key, init_key, reset_key = jax.random.split(key, 3)
        obs, env_state = env.reset(reset_key)
        held = HeldFeatures.create(cfg.num_envs, dim)
        params = network.init(init_key, obs[:1], held.raw[:1])
        carry = TrainCarry(params, optimizer.init(params), env_state, obs, held, key, jnp.int32(0), jnp.int32(0))
        return strong_types(carry)

    def act_and_step(carry: TrainCarry):  # one seed, one env step
        key, action_key, step_key = jax.random.split(carry.key, 3)
        held = carry.features.observe()
        feature = held.normalised()
        logits, value = network.apply(carry.params, carry.obs, feature)
        action = jax.random.categorical(action_key, logits)
        log_prob, _ = categorical_log_prob_entropy(logits, action)
        obs, env_state, reward, done, info = env.step(step_key, carry.env_state, action)
        transition = Transition(PolicyInput(carry.obs, feature), action, reward, done, log_prob, value, None)
        carry = carry.replace(env_state=env_state, obs=obs, key=key, step=carry.step + 1,
                              features=held.mark_stale(done, carry.step, cfg.skip_n))
        return carry, (transition, EpisodeStats.from_step(done, info))

    step_all = jax.vmap(act_and_step)

    def new_rollout(carry: TrainCarry):
        """Zeros shaped like a rollout [T, seeds, N, ...] of (Transition, EpisodeStats)."""
        shapes = jax.eval_shape(step_all, carry)[1]
        return jax.tree.map(lambda s: jnp.zeros((cfg.num_steps,) + s.shape, s.dtype), shapes)

    def segment(carry: TrainCarry, rollout, t: jax.Array):
        def running(state):
            carry, _, t = state
            return (t < cfg.num_steps) & ~carry.features.stale.any()

        def body(state):
            carry, rollout, t = state
            carry, out = step_all(carry)
            return carry, jax.tree.map(lambda buf, x: buf.at[t].set(x), rollout, out), t + 1

        return jax.lax.while_loop(running, body, (carry, rollout, t))

    def loss_fn(params, batch):
        transitions, advantages, targets = batch
        logits, value = network.apply(params, transitions.obs.obs, transitions.obs.feature)
        log_prob, entropy = categorical_log_prob_entropy(logits, transitions.action)
        actor_loss, diagnostics = ppo_policy_loss(log_prob, entropy, transitions.log_prob, advantages, cfg.clip_eps)
        value_loss = clipped_value_loss(value, transitions.value, targets, cfg.clip_eps)
        total = actor_loss + cfg.vf_coef * value_loss - cfg.ent_coef * diagnostics["loss/entropy"]
        return total, {"loss/total": total, "loss/actor": actor_loss, "loss/value": value_loss, **diagnostics}

    def learn_one(carry: TrainCarry, rollout: Transition, stats: EpisodeStats):  # one seed, [T, N]
        # The host refreshed the carry after the last step, so the bootstrap value sees the
        # feature the next step will act on.
        _, last_value = network.apply(carry.params, carry.obs, carry.features.normalised())
        advantages, targets = gae(rollout.reward, rollout.value, rollout.done, last_value, cfg.gamma, cfg.gae_lambda)
        flat = lambda x: x.reshape((-1,) + x.shape[2:])
        data = jax.tree.map(flat, (rollout, advantages, targets))
        params, opt_state, key, losses = minibatch_epochs(loss_fn, optimizer, carry.params, carry.opt_state,
                                                          carry.key, data, epochs=cfg.update_epochs,
                                                          num_minibatches=cfg.num_minibatches)
        carry = carry.replace(params=params, opt_state=opt_state, key=key, update=carry.update + 1)
        return carry, (stats.sum(0), losses)

    def learn(carry: TrainCarry, rollout):
        transitions, stats = rollout
        return jax.vmap(learn_one, in_axes=(0, 1, 1))(carry, transitions, stats)

    # -- evaluation (per seed) --------------------------------------------------------------------
    eval_env = envs.make(cfg.env, cfg.eval_envs, reset_ratio=cfg.reset_ratio)
    n = cfg.eval_envs

    def eval_start(key: jax.Array) -> EvalState:
        key, reset_key = jax.random.split(key)
        obs, env_state = eval_env.reset(reset_key)
        episodes = FirstEpisodes.start(n, len(eval_env.achievement_names), eval_env.episode_metric_names)
        return strong_types(EvalState(key, obs, env_state, jnp.zeros((n, dim), jnp.float32), jnp.int32(0), episodes))

    def eval_running(s: EvalState) -> jax.Array:
        return ~s.episodes.finished.all() & (s.t < cfg.eval_max_steps)

    def eval_segment(params, norm, s: EvalState) -> EvalState:
        """Steps up to the next multiple of skip_n (the next refresh), sampling actions."""
        end = (s.t // cfg.skip_n + 1) * cfg.skip_n
        feature = normalise(norm, s.raw)  # constant within the segment: no statistics updates here

        def body(s: EvalState) -> EvalState:
            key, action_key, step_key = jax.random.split(s.key, 3)
            logits, _ = network.apply(params, s.obs, feature)
            action = jax.random.categorical(action_key, logits)
            obs, env_state, _, done, info = eval_env.step(step_key, s.env_state, action)
            return s.replace(key=key, obs=obs, env_state=env_state, t=s.t + 1, episodes=s.episodes.record(done, info))

        return jax.lax.while_loop(lambda s: eval_running(s) & (s.t < end), body, s)

    return LLMAlgorithm(init, new_rollout, segment, learn, eval_start, eval_segment, eval_running)


# ---------------------------------------------------------------------------------------------------
# The host loop
# ---------------------------------------------------------------------------------------------------


class Runner:
    """Runs the compiled pieces and does the refreshes in between.

    A refresh reads which envs are stale and their observations (a small device-to-host copy),
    asks :class:`LiveFeatures` for their features, and writes them back. With many envs some
    episode ends almost every step, so segments are short; the LLM calls, not the returns to the
    host, are the cost (``perf/llm_time_share``)."""

    def __init__(self, cfg: PPOLLMConfig, algorithm: LLMAlgorithm, live: LiveFeatures):
        self.cfg, self.live = cfg, live
        self._new_rollout = jax.jit(algorithm.new_rollout)
        self._segment = jax.jit(algorithm.segment, donate_argnums=(0, 1))
        self._learn = jax.jit(algorithm.learn, donate_argnums=(0,))
        self._refreshed = jax.jit(lambda held, new, need: held.refreshed(new, need))
        self._eval_start = jax.jit(jax.vmap(algorithm.eval_start))
        self._eval_segment = jax.jit(jax.vmap(algorithm.eval_segment))
        self._eval_running = jax.jit(jax.vmap(algorithm.eval_running))

    def refresh(self, carry: TrainCarry) -> TrainCarry:
        stale = np.asarray(carry.features.stale)
        if not stale.any():
            return carry
        new = self.live(np.asarray(carry.obs), stale)
        return carry.replace(features=self._refreshed(carry.features, new, stale))

    def collect(self, carry: TrainCarry):
        """One rollout of num_steps for every seed; the carry comes back refreshed."""
        rollout, t = self._new_rollout(carry), 0
        while True:
            carry = self.refresh(carry)
            if t == self.cfg.num_steps:
                return carry, rollout
            carry, rollout, t = self._segment(carry, rollout, jnp.int32(t))
            t = int(t)

    def update(self, carry: TrainCarry):
        carry, rollout = self.collect(carry)
        return self._learn(carry, rollout)

    def train_chunk(self, carry: TrainCarry, length: int):
        """``length`` updates; logs stacked as [seeds, length], as HostLoop.after_chunk reads them."""
        logs = []
        for _ in range(length):
            carry, log = self.update(carry)
            logs.append(log)
        return carry, jax.tree.map(lambda *xs: np.stack(xs, axis=1), *jax.device_get(logs))

    def evaluate(self, params, norm, keys: jax.Array) -> dict:
        """One episode per eval env and seed, as ``HostLoop.eval_metrics`` reads it."""
        s = self._eval_start(keys)
        while True:
            running = np.asarray(self._eval_running(s))
            if not running.any():
                break
            need = running[:, None] & ~np.asarray(s.episodes.finished)
            if need.any():
                s = s.replace(raw=jnp.where(need[..., None], self.live(np.asarray(s.obs), need), s.raw))
            s = self._eval_segment(params, norm, s)
        return jax.device_get(s.episodes.result())


def check_feature_identity(cfg: PPOLLMConfig, identity: dict) -> None:
    """A run folder with a checkpoint must keep getting its features from the same model, layer,
    pooling and prompt; checked before the host loop touches the folder."""
    run_dir = resolve_run_dir(cfg, AREA, ALGO)
    saved = run_dir / FEATURES_FILE
    if saved.exists() and any((run_dir / "checkpoints").glob("[0-9]*")):
        check_same_identity(json.loads(saved.read_text()), identity, f"run folder {run_dir}")


def train(cfg: PPOLLMConfig, stop_after_updates: int | None = None, encoder=None) -> dict:
    """Train (or resume) the run described by ``cfg``; returns the summary, final carry and run folder.

    ``encoder`` (anything with ``spec``, ``hidden_size`` and ``hidden_states(texts)``, or with
    ``modality = "image"`` and ``image_hidden_states(frames, env)`` for a pixel env) replaces the
    LLM the config names; ``stop_after_updates`` ends the loop early as if the process had been
    killed there (both for tests).
    """
    check_config(cfg)
    feature_modality(cfg.env)  # an env with neither text nor frames stops here, before anything loads
    env = envs.make(cfg.env, cfg.num_envs, reset_ratio=cfg.reset_ratio)
    encoder = encoder or open_encoder(cfg.llm_spec(), cfg.server_url, cfg.env)  # fails fast, before any folder exists
    live = LiveFeatures(cfg.env, encoder, cfg.feature_cache_size)
    length = chunk_length(cfg)
    total_updates = math.ceil(num_updates_for(cfg) / length) * length
    algorithm = make_train(cfg, env, total_updates, live.dim)
    runner = Runner(cfg, algorithm, live)

    identity = encoder_identity(encoder, cfg.server_url)
    check_feature_identity(cfg, identity)
    loop = HostLoop(cfg, AREA, ALGO, steps_per_update=cfg.num_envs * cfg.num_steps,
                    total_updates=total_updates, achievement_names=env.achievement_names)
    atomic_write_json(loop.run_dir / FEATURES_FILE, identity)
    carry = loop.restore(init_per_seed(algorithm.init, seed_keys(cfg)))

    def train_chunk(carry: TrainCarry, length: int) -> ChunkOutput:
        start, before = time.perf_counter(), live.counters()
        carry, (stats, losses) = runner.train_chunk(carry, length)
        return ChunkOutput(carry, stats, losses, live.counters().since(before).metrics(time.perf_counter() - start))

    def evaluate(carry: TrainCarry, key: jax.Array) -> dict:
        keys = jax.random.split(key, cfg.num_seeds)
        return loop.eval_metrics(runner.evaluate(carry.params, carry.features.norm, keys))

    started, first = time.perf_counter(), live.counters()
    result = loop.run(carry, train_chunk, updates_per_chunk=length, evaluate=evaluate, eval_every=cfg.eval_every,
                      stop_after_updates=stop_after_updates,
                      summary_fields=lambda: {"features": feature_summary(identity, live.counters().since(first),
                                                                          time.perf_counter() - started)})
    return {**result, "live": live}


def feature_summary(identity: dict, counters: RefreshCounters, seconds: float) -> dict:
    """This process's totals (a resumed run reports its own part): where features came from and what they cost."""
    metrics = counters.metrics(seconds)
    hit_rate = metrics["perf/feature_cache_hit_rate"]
    return {
        **identity,
        "texts_looked_up": counters.cache.lookups,
        "texts_sent_to_llm": counters.cache.encoded,
        "cache_hit_rate": None if math.isnan(hit_rate) else hit_rate,
        "llm_seconds": round(counters.cache.encode_seconds, 3),
        "llm_time_share": metrics["perf/llm_time_share"],
        "feature_time_share": metrics["perf/feature_time_share"],
    }


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    # JAX and an in-process PyTorch/vLLM model share the GPU: let JAX take memory as it needs it
    # instead of reserving most of the GPU up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from utils.config import parse_config
    from utils.jax_setup import enable_compilation_cache

    enable_compilation_cache()
    result = train(parse_config(PPOLLMConfig, AREA, ALGO, argv))
    print(f"run folder: {result['run_dir']}")
    return result


if __name__ == "__main__":
    main()
