"""PPO on Craftax (MLP for symbolic, CNN for pixel observations), with an optional exploration bonus.

Read top to bottom: the config, ``make_train`` (pure and jittable: one call runs a chunk of PPO
updates for one seed, vmapped over seeds by the host loop in :mod:`online_rl.common`), and ``main``.
The bonuses (ICM, E3B, RND) are plug-ins from :mod:`online_rl.bonuses`; with one, the critic gets a
second (intrinsic) value output and the policy's advantage mixes both returns.

    python -m online_rl.ppo --preset debug
    python -m online_rl.ppo --env Craftax-Symbolic-v1 --total-steps 1000000 --num-seeds 2
    python -m online_rl.ppo --preset cpu --bonus icm    # curiosity: ICM forward-model error
    python -m online_rl.ppo --preset cpu --bonus e3b    # elliptical episodic bonus on ICM embeddings
    python -m online_rl.ppo --preset cpu --bonus rnd    # Random Network Distillation
    python -m online_rl.ppo --preset cpu --init-from RUN --critic-warmup 10 --init-kl-coef 0.1   # fine-tune
    python -m online_rl.ppo --env Craftax-Classic-Pixels-v1 --preset cpu --augment shift   # DrQ/RAD shifts

``--init-from`` starts from a trained policy (an offline-RL run or another PPO run), ``--critic-warmup``
and ``--init-kl-coef`` protect it in the first updates (:mod:`online_rl.finetune`). ``--augment shift``
randomly shifts the frames of every minibatch of the update (pixel envs, :mod:`utils.augment`).

Runs with a bonus are filed under ``runs/online_rl/ppo_<bonus>`` so they never share a run folder
with plain PPO.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from online_rl import finetune
from online_rl.bonuses import BonusBatch, ReturnScale, make_bonus
from online_rl.common import (
    Algorithm,
    ScaleOutConfig,
    Transition,
    categorical_log_prob_entropy,
    clipped_value_loss,
    hyper_of,
    make_optimizer,
    memoryless_policy,
    minibatch_epochs,
    next_obs_for_bonus,
    ppo_policy_loss,
    run_main,
    run_sweep,
    run_training,
    scan_updates,
)
from utils import envs
from utils.augment import AugmentFields, check_augment, random_shift
from utils.errors import exit_on_user_error
from utils.networks import ActorCritic, actor_critic
from utils.returns import gae
from utils.training import EpisodeStats

AREA, ALGO = "online_rl", "ppo"
HEADS = ("params",)  # where the ActorCritic's actor and critic sit in the parameters (online_rl.finetune)


@dataclasses.dataclass
class PPOConfig(ScaleOutConfig, finetune.FineTuneFields, AugmentFields):
    """PPO with GAE and an optional exploration bonus (PPO: Craftax-baseline defaults)."""

    bonus: str = "none"
    """Exploration bonus: none, icm (curiosity), e3b (elliptical episodic) or rnd (random network distillation)."""
    int_reward_coef: float = 1.0
    """Scale of the bonus after dividing it by the running std of its discounted return."""
    ext_adv_coef: float = 1.0
    """Weight of the extrinsic advantage in the policy's advantage (with a bonus)."""
    int_adv_coef: float = 0.1
    """Weight of the intrinsic advantage in the policy's advantage (with a bonus)."""
    int_gamma: float = 0.99
    """Discount of the intrinsic return."""
    icm_latent_size: int = 32
    """Size of the ICM embedding (E3B's feature size); icm and e3b."""
    icm_layer_width: int = 256
    """Units per hidden layer of the ICM encoder, forward and inverse models."""
    icm_lr: float = 3e-4
    """Adam learning rate of the ICM networks."""
    icm_forward_coef: float = 1.0
    """Weight of the forward-model loss (trains the forward model only)."""
    icm_inverse_coef: float = 1.0
    """Weight of the inverse-model loss (trains the inverse model and the encoder)."""
    e3b_lambda: float = 0.1
    """E3B ridge: each episode's inverse covariance starts at I / lambda."""
    rnd_layer_width: int = 256
    """Units per hidden layer of RND's target and predictor networks."""
    rnd_output_size: int = 512
    """Size of the random target's output that the predictor regresses."""
    rnd_lr: float = 3e-4
    """Adam learning rate of RND's predictor."""
    rnd_episodic: bool = False
    """Cut RND's intrinsic return at episode ends (Burda et al. found non-episodic works better)."""
    obs_clip: float = 5.0
    """RND: normalised inputs of target and predictor are clipped to [-obs_clip, obs_clip]."""

    SWEEP_FIELDS = ScaleOutConfig.SWEEP_FIELDS + ("int_reward_coef", "ext_adv_coef", "int_adv_coef")


def algo_name(cfg: PPOConfig) -> str:
    return ALGO if cfg.bonus == "none" else f"{ALGO}_{cfg.bonus}"


# ---------------------------------------------------------------------------------------------------
# The compiled program
# ---------------------------------------------------------------------------------------------------


@struct.dataclass
class BonusCarry:
    state: Any  # the bonus's own (networks, statistics)
    scale: ReturnScale


@struct.dataclass
class TrainCarry:
    """Everything a seed needs to continue training; it is exactly what a checkpoint holds."""

    params: Any
    opt_state: Any
    env_state: envs.VecEnvState
    obs: jax.Array
    key: jax.Array
    update: jax.Array  # completed updates
    bonus: Any  # BonusCarry with --bonus, else None


@struct.dataclass
class AnchoredCarry(TrainCarry):
    """The carry with --init-kl-coef: also the initial policy's parameters, which the KL penalty pulls
    towards (in the checkpoint, so a resumed run keeps its anchor). Other runs keep :class:`TrainCarry`,
    whose checkpoints are unchanged."""

    anchor: Any = None


def make_network(cfg: PPOConfig, env: envs.VecEnv, value_outputs: int = 1) -> ActorCritic:
    return actor_critic(env.num_actions, env.is_pixels, cfg.layer_width, cfg.num_layers, cfg.activation,
                        value_outputs=value_outputs)


def make_augment(cfg: PPOConfig, env: envs.VecEnv):
    """``augment(key, minibatch) -> minibatch`` for :func:`online_rl.common.minibatch_epochs` with
    ``--augment shift``, else None (the update is then the plain one).

    RAD's way for PPO (Laskin et al. 2020): the policy and value losses read randomly shifted frames,
    while the rollout acts, and its log-probabilities and values are taken, on the frames as they are.
    Only the observations the losses read change; a bonus learns on its own, unshifted batch."""
    if not check_augment(cfg, env.is_pixels, cfg.env):
        return None

    def augment(key: jax.Array, batch: tuple) -> tuple:
        transitions, *rest = batch
        return (transitions._replace(obs=random_shift(key, transitions.obs, cfg.augment_pad)), *rest)

    return augment


def split_value(value: jax.Array, with_bonus: bool) -> tuple[jax.Array, jax.Array | None]:
    """``(extrinsic, intrinsic or None)`` from the critic's output."""
    return (value[..., 0], value[..., 1]) if with_bonus else (value, None)


def make_train(cfg: PPOConfig, env: envs.VecEnv, total_updates: int, save_rollout: bool) -> Algorithm:
    """One seed's ``init`` and ``train_chunk``; ``train_chunk`` returns the last rollout when saving.

    The update reads the shape-free hyperparameters (``cfg.SWEEP_FIELDS``) from its ``hyper`` argument,
    never from ``cfg``, so they can be traced values that differ between vmapped slots (a sweep)."""
    bonus = make_bonus(cfg, env)
    network = make_network(cfg, env, bonus.value_outputs if bonus else 1)
    labels = finetune.critic_labels(HEADS)
    optimizer = finetune.optimizer(cfg, lambda: make_optimizer(cfg, total_updates), labels)
    with_kl = cfg.init_kl_coef > 0
    augment = make_augment(cfg, env)

    def init(key: jax.Array) -> TrainCarry:
        key, init_key, reset_key, bonus_key = jax.random.split(key, 4)
        obs, env_state = env.reset(reset_key)
        params = network.init(init_key, obs[:1])
        bonus_carry = BonusCarry(bonus.init(bonus_key, obs), ReturnScale.create(cfg.num_envs)) if bonus else None
        fields = (params, optimizer.init(params), env_state, obs, key, jnp.int32(0), bonus_carry)
        return AnchoredCarry(*fields, anchor=params) if with_kl else TrainCarry(*fields)

    def env_step(carry: TrainCarry, _):
        key, action_key, step_key = jax.random.split(carry.key, 3)
        logits, value = network.apply(carry.params, carry.obs)
        value, value_int = split_value(value, bonus is not None)
        action = jax.random.categorical(action_key, logits)
        log_prob, _ = categorical_log_prob_entropy(logits, action)
        obs, env_state, reward, done, info = env.step(step_key, carry.env_state, action)
        transition = Transition(carry.obs, action, reward, done, log_prob, value,
                                info["terminal_obs"] if save_rollout else None)
        intrinsic = (value_int, next_obs_for_bonus(obs, done, info)) if bonus else None
        stats = EpisodeStats.from_step(done, info)
        return carry.replace(env_state=env_state, obs=obs, key=key), (transition, intrinsic, stats)

    def intrinsic_advantages(carry: TrainCarry, rollout: Transition, value_int, next_obs, last_value_int, hp):
        """The bonus, in units of its return's running std, through its own GAE: ``(advantages,
        targets, bonus inputs, carry, logs)``."""
        batch = BonusBatch(rollout.obs, rollout.action, next_obs, rollout.done)
        raw, state, logs = bonus.rewards(carry.bonus.state, batch)
        reward_int, scale = carry.bonus.scale.normalise(raw, cfg.int_gamma)
        reward_int = hp["int_reward_coef"] * reward_int
        done_int = rollout.done if bonus.episodic else jnp.zeros_like(rollout.done)
        advantages, targets = gae(reward_int, value_int, done_int, last_value_int, cfg.int_gamma, hp["gae_lambda"])
        logs = {**logs, "explore/intrinsic_reward": reward_int.mean(), "explore/intrinsic_return_std": scale.stats.std}
        return advantages, targets, batch, carry.replace(bonus=BonusCarry(state, scale)), logs

    def loss_fn(params, batch, hp, kl=None):
        """The PPO loss; ``kl``: ``(anchor params, coefficient)`` with --init-kl-coef, else None."""
        transitions, advantages, targets, intrinsic = batch
        logits, value = network.apply(params, transitions.obs)
        value, value_int = split_value(value, bonus is not None)
        log_prob, entropy = categorical_log_prob_entropy(logits, transitions.action)
        actor_loss, diagnostics = ppo_policy_loss(log_prob, entropy, transitions.log_prob, advantages, hp["clip_eps"])
        value_loss = clipped_value_loss(value, transitions.value, targets, hp["clip_eps"])
        logs = {"loss/actor": actor_loss, "loss/value": value_loss, **diagnostics}
        if bonus:
            old_value_int, targets_int = intrinsic
            logs["loss/value_int"] = clipped_value_loss(value_int, old_value_int, targets_int, hp["clip_eps"])
            value_loss = value_loss + logs["loss/value_int"]
        total = actor_loss + hp["vf_coef"] * value_loss - hp["ent_coef"] * diagnostics["loss/entropy"]
        logs = {"loss/total": total, **logs}
        if kl is not None:
            anchor, coef = kl
            total, logs = finetune.add_init_kl(total, logs, logits, network.apply(anchor, transitions.obs)[0], coef)
        return total, logs

    def update(carry: TrainCarry, hp: dict):
        carry, (rollout, intrinsic, stats) = jax.lax.scan(env_step, carry, None, length=cfg.num_steps)
        _, last_value = network.apply(carry.params, carry.obs)
        last_value, last_value_int = split_value(last_value, bonus is not None)
        advantages, targets = gae(rollout.reward, rollout.value, rollout.done, last_value, hp["gamma"],
                                  hp["gae_lambda"])
        logs, bonus_data = {}, None
        if bonus:
            value_int, next_obs = intrinsic
            adv_int, targets_int, bonus_batch, carry, logs = intrinsic_advantages(carry, rollout, value_int, next_obs,
                                                                                 last_value_int, hp)
            advantages = hp["ext_adv_coef"] * advantages + hp["int_adv_coef"] * adv_int
            bonus_data = (value_int, targets_int)

        flat = lambda x: x.reshape((-1,) + x.shape[2:])
        data = jax.tree.map(flat, (rollout._replace(terminal_obs=None), advantages, targets, bonus_data))
        kl = (carry.anchor, finetune.init_kl_coef(cfg, carry.update, cfg.num_envs * cfg.num_steps)) if with_kl else None
        update_optimizer = finetune.optimizer(cfg, lambda: make_optimizer(cfg, total_updates, hp), labels, carry.update)
        params, opt_state, key, losses = minibatch_epochs(lambda p, b: loss_fn(p, b, hp, kl), update_optimizer,
                                                          carry.params, carry.opt_state, carry.key, data,
                                                          epochs=cfg.update_epochs, num_minibatches=cfg.num_minibatches,
                                                          augment=augment)
        carry = carry.replace(params=params, opt_state=opt_state, key=key, update=carry.update + 1)
        if bonus:
            state, key, bonus_logs = bonus.learn(carry.bonus.state, carry.key, bonus_batch, cfg.num_minibatches)
            carry = carry.replace(bonus=carry.bonus.replace(state=state), key=key)
            logs.update(bonus_logs)
        saved = (rollout, last_value) if save_rollout else None
        return carry, (stats.sum(), {**losses, **logs}, saved)

    def params_like(source: dict):
        """Parameter shapes of a PPO run with this network and the source's bonus (its value outputs)."""
        source_bonus = make_bonus(dataclasses.replace(cfg, bonus=source.get("bonus", "none")), env)
        source_network = make_network(cfg, env, source_bonus.value_outputs if source_bonus else 1)
        return jax.eval_shape(lambda key: source_network.init(key, env.reset(key)[0][:1]), jax.random.PRNGKey(0))

    transfer = finetune.Transfer(ALGO, ("layer_width", "num_layers", "activation"), params_like, HEADS,
                                 offline=True, kl=True)
    policy = memoryless_policy(lambda params, obs: network.apply(params, obs)[0])
    return Algorithm(init, scan_updates(update, save_rollout, hyper_of(cfg)), policy,
                     finetune.starter(cfg, env, init, total_updates, transfer))


def train(cfg: PPOConfig, stop_after_updates: int | None = None) -> dict:
    """Train (or resume) the run described by ``cfg``; returns the summary, final carry and run folder.

    ``stop_after_updates`` ends the loop early as if the process had been killed there (for tests).
    """
    return run_training(cfg, AREA, algo_name(cfg), make_train, stop_after_updates)


def sweep(cfg: PPOConfig, stop_after_updates: int | None = None) -> dict:
    """Train every point of ``cfg.sweep`` x every seed (see :func:`online_rl.common.run_sweep`)."""
    return run_sweep(cfg, AREA, algo_name(cfg), make_train, stop_after_updates)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    return run_main(PPOConfig, AREA, ALGO, train, argv, sweep)


if __name__ == "__main__":
    main()
