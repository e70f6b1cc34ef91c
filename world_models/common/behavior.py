"""Actor-critic learning in imagination, by named settings (:class:`~world_models.common.config.ActorCriticConfig`).

From every posterior state of a replay batch the actor imagines ``horizon`` steps with the world
model's prior; predicted rewards, continue probabilities and critic values give lambda-returns.

* ``actor_grad``: ``dynamics`` (V1) backpropagates the returns through the imagined dynamics into
  the actor (value gradients, straight-through one-hot actions); ``reinforce`` (V2, V3) uses the
  log-probability of the action times its advantage; ``mix`` weighs the two (DreamerV2's
  ``actor_grad_mix``, the dynamics term's weight).
* ``slow_critic_returns`` (V2): the returns bootstrap from the slow critic (a target network,
  copied every ``target_update_every`` steps) instead of the critic itself (V1, V3).
* ``return_norm``: ``percentile`` (V3) divides advantages by the EMA of the returns' 5th-95th
  percentile range (at least 1), so rewards of any scale give similar gradients without drowning
  the entropy bonus; ``none`` (V1, V2) leaves them as they are.
* ``critic_head``: ``gaussian`` (V1, V2) regresses the returns with a squared error;
  ``symlog_twohot`` (V3) predicts a symlog two-hot distribution (zero-initialised output).
  ``slow_critic_reg`` (V3: 1) adds the same loss towards the slow critic's values (an EMA copy in V3).

Steps are time-major: states ``0..H``, actions ``0..H-1``; the return of step ``t`` looks at the
rewards of states ``t+1..``. Each step is weighted by the probability that the imagined episode
is still going (cumulative discounted continue), so the actor never learns from after a death.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from utils.returns import lambda_returns
from world_models.common import dists
from world_models.common.config import ActorCriticConfig
from world_models.common.networks import Head
from world_models.common.rssm import RSSMState, features, img_step
from world_models.common.world_model import WorldModel

sg = jax.lax.stop_gradient


def continuation(prob: jax.Array, readout: str) -> jax.Array:
    """The continue head's probability as imagination uses it: as is (``prob``) or rounded to 0 or 1
    (``mode``), which ends an imagined episode outright where the model thinks it more likely over."""
    return prob if readout == "prob" else (prob > 0.5).astype(prob.dtype)


class ReturnNorm(NamedTuple):
    """EMA of the 5th and 95th percentiles of imagined returns (V3)."""

    low: jax.Array
    high: jax.Array

    @classmethod
    def initial(cls) -> "ReturnNorm":
        return cls(jnp.float32(0.0), jnp.float32(0.0))

    def update(self, returns: jax.Array, decay: float) -> "ReturnNorm":
        low, high = jnp.percentile(returns, jnp.array([5.0, 95.0]))
        return ReturnNorm(decay * self.low + (1 - decay) * low, decay * self.high + (1 - decay) * high)

    def scale(self, limit: float = 1.0) -> jax.Array:
        return jnp.maximum(limit, self.high - self.low)


class Imagined(NamedTuple):
    states: RSSMState  # [H + 1, N]
    actions: jax.Array  # [H, N, A] one-hot (straight-through in V1)
    logits: jax.Array  # [H, N, A] the actor's logits at states 0..H-1


class ReplayTargets(NamedTuple):
    """What the replay-value loss needs from a replay batch, all ``[T, B]`` (feat ``[T, B, F]``)."""

    feat: jax.Array  # posterior features, gradient stopped
    reward: jax.Array  # reward that came with each row
    is_terminal: jax.Array
    boot: jax.Array  # the imagined lambda-return from each posterior state


class ActorCritic:
    """The actor (categorical over actions) and critic heads on world-model features."""

    def __init__(self, cfg: ActorCriticConfig, feat_size: int, num_actions: int):
        self.cfg = cfg
        self.num_actions = num_actions
        self.feat_size = feat_size
        style = dict(act=cfg.act, norm=cfg.norm)
        self.critic_out = dists.ScalarHead.make(cfg.critic_head, cfg.bins)
        self.actor = Head(num_actions, cfg.units, cfg.layers, out_scale=cfg.actor_init_scale, **style)
        self.critic = Head(self.critic_out.size, cfg.units, cfg.layers, out_scale=self.critic_out.out_scale, **style)

    def init(self, key: jax.Array) -> tuple[dict, dict]:
        actor_key, critic_key = jax.random.split(key)
        feat = jnp.zeros((1, self.feat_size))
        return self.actor.init(actor_key, feat), self.critic.init(critic_key, feat)

    def logits(self, actor_params, feat: jax.Array) -> jax.Array:
        return dists.unimix_logits(self.actor.apply(actor_params, feat), self.cfg.unimix)

    def value(self, critic_params, feat: jax.Array) -> jax.Array:
        return self.critic_out.mean(self.critic.apply(critic_params, feat))

    # -- imagination ----------------------------------------------------------------------------------
    def imagine(self, wm: WorldModel, wm_params: dict, actor_params, start: RSSMState, key: jax.Array) -> Imagined:
        """Roll the actor out in the world model for ``imag_horizon`` steps from ``start`` ``[N]``.

        With value gradients (``actor_grad`` dynamics or mix) gradients flow through features and
        straight-through actions; with REINFORCE alone they stop, so the actor learns only through
        the log-probabilities of its actions.
        """
        value_gradients = self.cfg.value_gradients

        def step(state, key):
            action_key, state_key = jax.random.split(key)
            feat = features(state)
            logits = self.logits(actor_params, feat if value_gradients else sg(feat))
            action = dists.straight_through_onehot(action_key, logits)
            action = action if value_gradients else sg(action)
            next_state = img_step(wm.rssm, wm_params["rssm"], state, action, state_key)
            next_state = next_state if value_gradients else sg(next_state)
            return next_state, (next_state, action, logits)

        keys = jax.random.split(key, self.cfg.imag_horizon)
        _, (states, actions, logits) = jax.lax.scan(step, start, keys)
        states = jax.tree.map(lambda first, rest: jnp.concatenate([first[None], rest], 0), start, states)
        return Imagined(states, actions, logits)

    # -- losses ---------------------------------------------------------------------------------------
    def actor_loss(self, actor_params, wm: WorldModel, wm_params: dict, critic_params, target_params,
                   retnorm: ReturnNorm, start: RSSMState, start_cont: jax.Array, key: jax.Array,
                   actor_entropy: jax.Array | float | None = None):
        """``(loss, (imagined rollout, returns, weights, new ReturnNorm, metrics))`` for one batch of
        start states; gradients reach only ``actor_params``. ``actor_entropy`` (default the config's)
        may be a traced value, so a sweep over it trains in one program."""
        cfg = self.cfg
        actor_entropy = cfg.actor_entropy if actor_entropy is None else actor_entropy
        traj = self.imagine(wm, wm_params, actor_params, start, key)
        feat = features(traj.states)  # [H + 1, N, F]
        reward = wm.reward(wm_params, feat[1:])
        cont = jnp.concatenate([start_cont[None], continuation(wm.cont(wm_params, feat[1:]), cfg.imag_cont)], 0)
        discount = cfg.gamma * cont
        value_params = target_params if cfg.slow_critic_returns else critic_params
        values = self.value(value_params, feat)
        returns = lambda_returns(reward, discount[1:], values[1:], cfg.lam)  # [H, N]
        weight = sg(jnp.cumprod(jnp.concatenate([cont[:1], discount[1:-1]], 0), 0))  # [H, N]

        log_probs = jax.nn.log_softmax(traj.logits, -1)
        entropy = -(jnp.exp(log_probs) * log_probs).sum(-1)
        metrics = {}
        if cfg.return_norm == "percentile":
            retnorm = retnorm.update(sg(returns), cfg.retnorm_decay)
            metrics["loss/return_scale"] = retnorm.scale()
        normalise = (lambda x: x / retnorm.scale()) if cfg.return_norm == "percentile" else (lambda x: x)
        # Value gradients: the returns themselves (a baseline sg(values) would not change the gradient).
        dynamics = lambda: normalise(returns)
        reinforce = lambda: (log_probs * sg(traj.actions)).sum(-1) * sg(normalise(returns - values[:-1]))
        if cfg.actor_grad == "dynamics":
            objective = dynamics()
        elif cfg.actor_grad == "reinforce":
            objective = reinforce()
        else:
            objective = cfg.actor_grad_mix * dynamics() + (1 - cfg.actor_grad_mix) * reinforce()
        loss = -(weight * (objective + actor_entropy * entropy)).mean()
        metrics.update(self.diagnostics(returns, values, weight, entropy, retnorm))
        metrics.update({
            "loss/actor": loss,
            "loss/actor_entropy": entropy.mean(),
            "loss/imag_return": returns.mean(),
            "loss/imag_value": values.mean(),
            "loss/imag_reward": reward.mean(),
            "loss/imag_cont": cont[1:].mean(),
        })
        return loss, (sg(traj), sg(returns), weight, retnorm, metrics)

    def diagnostics(self, returns: jax.Array, values: jax.Array, weight: jax.Array, entropy: jax.Array,
                    retnorm: ReturnNorm) -> dict:
        """Whether the actor can exploit at all: with REINFORCE its objective is the normalised
        advantage plus ``actor_entropy`` times the entropy, so an actor whose advantages are small
        next to that bonus stays near uniform whatever the model predicts. Means weighted like the loss:

        * ``diag/return_scale``: what advantages are divided by (``max(1, EMA(P95 - P5))`` with
          ``return_norm`` percentile, else 1); ``diag/return_range``: this batch's P95 - P5 of the
          returns, unfloored (below 1 the floor, not the returns, sets the scale).
        * ``diag/adv_abs_mean`` and ``diag/adv_norm_abs_mean``: mean ``|return - value|`` before and
          after that division; the second is what competes with ``actor_entropy * diag/actor_entropy``.
        * ``diag/actor_entropy``: the policy's mean entropy on imagined states (uniform: ``log(actions)``).
        """
        advantage = sg(returns - values[:-1])
        scale = retnorm.scale() if self.cfg.return_norm == "percentile" else jnp.float32(1.0)
        low, high = jnp.percentile(sg(returns), jnp.array([5.0, 95.0]))
        weighted = lambda x: (weight * x).sum() / jnp.maximum(weight.sum(), 1e-8)
        return {
            "diag/return_scale": scale,
            "diag/return_range": high - low,
            "diag/adv_abs_mean": weighted(jnp.abs(advantage)),
            "diag/adv_norm_abs_mean": weighted(jnp.abs(advantage)) / scale,
            "diag/actor_entropy": weighted(sg(entropy)),
        }

    def critic_loss(self, critic_params, slow_params, traj: Imagined, returns: jax.Array, weight: jax.Array,
                    replay: ReplayTargets | None = None):
        """The critic's loss on the imagined rollout, plus ``replay_value_scale`` times its loss on
        the replayed posterior states (``replay``, needed when that scale is not 0)."""
        loss = self._regression(critic_params, slow_params, features(traj.states)[:-1], returns, weight)
        metrics = {"loss/critic": loss}
        if self.cfg.replay_value_scale:
            replay_loss = self.replay_value_loss(critic_params, slow_params, replay)
            metrics["loss/replay_value"] = replay_loss
            loss = loss + self.cfg.replay_value_scale * replay_loss
            metrics["loss/critic"] = loss
        return loss, metrics

    def _regression(self, critic_params, slow_params, feat: jax.Array, target: jax.Array, weight: jax.Array):
        """Weighted mean of the head's loss towards ``target``, plus ``slow_critic_reg`` times its loss
        towards the slow critic's values."""
        out = self.critic.apply(critic_params, feat)
        loss = self.critic_out.loss(out, target)
        if self.cfg.slow_critic_reg:
            loss = loss + self.cfg.slow_critic_reg * self.critic_out.loss(out, self.value(slow_params, feat))
        return (weight * loss).mean()

    def replay_value_loss(self, critic_params, slow_params, replay: ReplayTargets) -> jax.Array:
        """The current DreamerV3 code's replay-value loss (its ``repl_loss``): the critic also
        regresses, on the replayed posterior states ``[T, B]``, lambda-returns of the real rewards
        and terminals that bootstrap from each state's imagined return. Steps ``0..T-2`` count, each
        unless it ends an episode (its return would look into the next one). Features arrive
        stopped: the world model learns only from its own loss here (DreamerV3 lets this loss shape
        the representation too, ``repval_grad``)."""
        live = self.cfg.gamma * (1.0 - replay.is_terminal[1:].astype(jnp.float32))
        returns = lambda_returns(replay.reward[1:], live, replay.boot[1:], self.cfg.lam)  # [T - 1, B]
        weight = 1.0 - replay.is_terminal[:-1].astype(jnp.float32)
        return self._regression(critic_params, slow_params, replay.feat[:-1], sg(returns), weight)
