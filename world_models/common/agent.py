"""One Dreamer agent: parameters, optimisers and the gradient step that trains all of it.

A gradient step trains the world model on a replay batch, then the actor in imagination from every
posterior state of that batch (or ``imag_starts`` random ones), then the critic on the imagined
rollout (and with ``replay_value_scale`` on the replayed states too), then moves the slow critic
(``slow_critic``: ``copy`` every ``target_update_every`` steps, V2's target network; ``ema`` at
``slow_critic_rate``, V3; ``none``, V1). Acting is a posterior step on the new observation followed
by a sample from the actor.

With ``replay_context`` (DreamerV3's current code) replay keeps with each row the posterior latent the
agent held after seeing it; :meth:`Agent.replay_step` starts each replayed chunk from the latent of
the row before it instead of zeros and writes the posteriors of its own world-model pass back into
the rows it replayed, so stored latents follow the model as it learns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

from world_models.common import replay as replay_lib
from world_models.common.behavior import ActorCritic, ReplayTargets, ReturnNorm
from world_models.common.config import AgentConfig
from world_models.common.rssm import LATENT_FIELDS, RSSMState, features, obs_step, pack, unpack
from world_models.common.world_model import WorldModel


@struct.dataclass
class AgentState:
    params: dict  # wm, actor, critic, slow_critic (copied or EMA; untouched with slow_critic none)
    opt_state: dict  # wm, actor, critic
    retnorm: ReturnNorm
    grad_steps: jax.Array  # int32


def optimizer(lr: float, eps: float, clip: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(clip), optax.adam(lr, eps=eps))


class Agent:
    """Static parts (networks, optimisers) of a Dreamer agent for one env's shapes."""

    def __init__(self, cfg: AgentConfig, obs_shape: tuple[int, ...], num_actions: int):
        self.cfg = cfg
        self.wm = WorldModel(cfg.wm, obs_shape, num_actions)
        self.ac = ActorCritic(cfg.ac, self.wm.feat_size, num_actions)
        self.num_actions = num_actions
        self.optimizers = {
            "wm": optimizer(cfg.model_lr, cfg.model_eps, cfg.model_grad_clip),
            "actor": optimizer(cfg.actor_lr, cfg.ac_eps, cfg.ac_grad_clip),
            "critic": optimizer(cfg.critic_lr, cfg.ac_eps, cfg.ac_grad_clip),
        }

    def init(self, key: jax.Array) -> AgentState:
        wm_key, ac_key = jax.random.split(key)
        actor, critic = self.ac.init(ac_key)
        params = {"wm": self.wm.init(wm_key), "actor": actor, "critic": critic, "slow_critic": critic}
        opt_state = {k: opt.init(params[k]) for k, opt in self.optimizers.items()}
        return AgentState(params, opt_state, ReturnNorm.initial(), jnp.int32(0))

    # -- acting ---------------------------------------------------------------------------------------
    def initial_policy_state(self, n: int) -> tuple[RSSMState, jax.Array]:
        """(latent, previous action one-hot) before the first observation."""
        return self.wm.initial_state((n,)), jnp.zeros((n, self.num_actions))

    def act(self, params: dict, obs: jax.Array, policy_state, is_first: jax.Array, key: jax.Array,
            random: jax.Array | bool = False):
        """Posterior step on ``obs`` then an action per env: sampled from the actor, or uniformly
        where ``random`` (prefill). Returns ``(action, new policy state)``."""
        latent, prev_action = policy_state
        obs_key, action_key = jax.random.split(key)
        embed = self.wm.embed(params["wm"], obs)
        latent, _ = obs_step(self.wm.rssm, params["wm"]["rssm"], latent, prev_action, embed, is_first, obs_key)
        logits = self.ac.logits(params["actor"], features(latent))
        logits = jnp.where(jnp.asarray(random), jnp.zeros_like(logits), logits)
        action = jax.random.categorical(action_key, logits)
        return action, (latent, jax.nn.one_hot(action, self.num_actions))

    def replay_fields(self, policy_state) -> dict:
        """What replay keeps of the agent's memory with the row it just acted on: the packed latent
        with ``replay_context``, nothing without."""
        return pack(self.wm.spec, policy_state[0]) if self.cfg.replay_context else {}

    # -- learning -------------------------------------------------------------------------------------
    def hyper(self) -> dict[str, float]:
        """The shape-free hyperparameters a gradient step reads (``DreamerConfig.SWEEP_FIELDS``), at the
        config's values; a sweep passes traced values of the same names, one per vmapped slot."""
        return {"model_lr": self.cfg.model_lr, "actor_lr": self.cfg.actor_lr, "critic_lr": self.cfg.critic_lr,
                "actor_entropy": self.cfg.ac.actor_entropy}

    def replay_step(self, state: AgentState, replay: replay_lib.Replay, key: jax.Array, batch_size: int,
                    batch_length: int, hyper: dict | None = None) -> tuple[AgentState, replay_lib.Replay, dict]:
        """One gradient step on a batch drawn from ``replay``. Without ``replay_context`` each chunk
        starts from zeros and replay is returned unchanged; with it, each chunk starts from the latent
        stored with the row before it and the chunk's rows get this step's posteriors."""
        batch_key, step_key = jax.random.split(key)
        if not self.cfg.replay_context:
            batch = replay_lib.sample(replay, batch_key, batch_size, batch_length)
            state, metrics = self.train_step(state, batch, step_key, hyper=hyper)
            return state, replay, metrics
        context, batch, index = replay_lib.sample_with_context(replay, batch_key, batch_size, batch_length)
        state, metrics, post = self.train_step_posterior(state, batch, step_key, self.context_start(context), hyper)
        return state, replay_lib.write(replay, index, pack(self.wm.spec, post)), metrics

    def context_start(self, context: dict) -> tuple[RSSMState, jax.Array]:
        """``(latent, previous action one-hot)`` to observe a chunk from: the latent stored with the row
        before it and the action taken there."""
        latent = unpack(self.wm.spec, {k: context[k] for k in LATENT_FIELDS})
        return latent, jax.nn.one_hot(context["action"], self.num_actions)

    def train_step(self, state: AgentState, batch: dict, key: jax.Array,
                   start: tuple[RSSMState, jax.Array] | None = None, hyper: dict | None = None
                   ) -> tuple[AgentState, dict]:
        """One gradient step of the world model, actor and critic on ``batch`` (``[T, B]`` rows), the
        world model observing it from ``start`` (see :meth:`WorldModel.loss`; zeros without).
        ``hyper``: :meth:`hyper`'s fields, possibly traced (default: the config's values)."""
        return self.train_step_posterior(state, batch, key, start, hyper)[:2]

    def train_step_posterior(self, state: AgentState, batch: dict, key: jax.Array,
                             start: tuple[RSSMState, jax.Array] | None = None, hyper: dict | None = None
                             ) -> tuple[AgentState, dict, RSSMState]:
        """:meth:`train_step`, also returning the world-model pass's posteriors ``[T, B]`` (before the update)."""
        cfg = self.cfg
        hyper = self.hyper() if hyper is None else hyper
        wm_key, imag_key = jax.random.split(key)
        params, opt_state = dict(state.params), dict(state.opt_state)

        grads, (post, metrics) = jax.grad(self.wm.loss, has_aux=True)(params["wm"], batch, wm_key, start)
        params["wm"], opt_state["wm"] = self._apply("wm", grads, params["wm"], opt_state["wm"], hyper["model_lr"])

        flat = lambda x: x.reshape((-1,) + x.shape[2:])
        start = jax.tree.map(lambda x: flat(jax.lax.stop_gradient(x)), post)
        start_cont = flat(1.0 - batch["is_terminal"].astype(jnp.float32))
        picked = None
        if cfg.imag_starts:
            imag_key, pick_key = jax.random.split(imag_key)
            picked = self._random_starts(pick_key, start_cont.shape[0])
            start, start_cont = jax.tree.map(lambda x: x[picked], (start, start_cont))
        grads, (traj, returns, weight, retnorm, actor_metrics) = jax.grad(self.ac.actor_loss, has_aux=True)(
            params["actor"], self.wm, params["wm"], params["critic"], params["slow_critic"], state.retnorm,
            start, start_cont, imag_key, hyper["actor_entropy"])
        params["actor"], opt_state["actor"] = self._apply("actor", grads, params["actor"], opt_state["actor"],
                                                          hyper["actor_lr"])

        replay = None
        if cfg.ac.replay_value_scale:
            replay = self._replay_targets(params, post, batch, returns[0], picked)
        grads, critic_metrics = jax.grad(self.ac.critic_loss, has_aux=True)(
            params["critic"], params["slow_critic"], traj, returns, weight, replay)
        params["critic"], opt_state["critic"] = self._apply("critic", grads, params["critic"], opt_state["critic"],
                                                            hyper["critic_lr"])

        grad_steps = state.grad_steps + 1
        if cfg.slow_critic == "copy":
            copy = grad_steps % cfg.target_update_every == 0
            params["slow_critic"] = jax.tree.map(lambda new, old: jnp.where(copy, new, old),
                                                 params["critic"], params["slow_critic"])
        elif cfg.slow_critic == "ema":
            rate = cfg.slow_critic_rate
            params["slow_critic"] = jax.tree.map(lambda new, old: rate * new + (1 - rate) * old,
                                                 params["critic"], params["slow_critic"])
        metrics = {**metrics, **actor_metrics, **critic_metrics}
        return AgentState(params, opt_state, retnorm, grad_steps), metrics, jax.lax.stop_gradient(post)

    def _random_starts(self, key: jax.Array, count: int) -> jax.Array:
        """Indices of ``imag_starts`` of the ``count`` replayed posterior states, drawn without
        replacement: imagination costs in proportion to its start states, and neighbouring steps of a
        sequence are near duplicates. ``world_models.dreamer.validate`` checks that the batch holds enough."""
        return jax.random.choice(key, count, (self.cfg.imag_starts,), replace=False)

    def _replay_targets(self, params: dict, post, batch: dict, start_returns: jax.Array,
                        picked: jax.Array | None) -> ReplayTargets:
        """What the replay-value loss regresses on, in the batch's ``[T, B]`` order. Each replayed state
        bootstraps from its imagined return (DreamerV3's ``repl_loss``); when imagination started from
        only ``picked`` states, the others bootstrap from the value that imagined returns bootstrap
        from (the critic, or the slow critic with ``slow_critic_returns``), so the loss's real rewards
        reach the critic at any number of imagination starts."""
        feat = features(jax.lax.stop_gradient(post))
        shape = batch["reward"].shape
        if picked is None:
            boot = start_returns
        else:
            value_params = params["slow_critic"] if self.cfg.ac.slow_critic_returns else params["critic"]
            boot = jax.lax.stop_gradient(self.ac.value(value_params, feat)).reshape(-1).at[picked].set(start_returns)
        return ReplayTargets(feat, batch["reward"], batch["is_terminal"], boot.reshape(shape))

    def _apply(self, name: str, grads, params, opt_state, lr):
        """An optimiser step at learning rate ``lr`` (maybe traced). The optimiser is rebuilt around it:
        Adam's state does not depend on the rate, so checkpoints keep their format (see
        ``online_rl.common.make_optimizer`` for the same choice in PPO)."""
        eps, clip = {"wm": (self.cfg.model_eps, self.cfg.model_grad_clip)}.get(
            name, (self.cfg.ac_eps, self.cfg.ac_grad_clip))
        updates, opt_state = optimizer(lr, eps, clip).update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
