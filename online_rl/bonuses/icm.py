"""ICM (Pathak et al., 2017): curiosity as the error of a forward model in an embedding space.

The encoder learns only from the inverse model (predict the action from two embeddings), so it keeps
what the agent controls and cannot collapse to make the forward model's job trivial. The bonus is the
forward model's error predicting the next embedding. E3B (:mod:`online_rl.bonuses.e3b`) reuses these
networks and their training for its embedding.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.linen.initializers import orthogonal

from online_rl.bonuses import BonusBatch, flat
from online_rl.common import minibatch_epochs
from utils.networks import MLP, make_torso


class ICM(nn.Module):
    """An encoder, a forward model f(z, a) -> z' and an inverse model g(z, z') -> a."""

    num_actions: int
    latent_size: int
    width: int
    pixels: bool = False

    def setup(self):
        torso = make_torso(self.pixels, self.width, 2, "relu")()
        self.encoder = nn.Sequential([torso, nn.Dense(self.latent_size, kernel_init=orthogonal(1.0))])
        self.forward_model = nn.Sequential([MLP(self.width, 2, "relu"), nn.Dense(self.latent_size)])
        self.inverse_model = nn.Sequential([MLP(self.width, 2, "relu"), nn.Dense(self.num_actions)])

    def encode(self, obs):
        return self.encoder(obs)

    def predict_next(self, z, action):
        return self.forward_model(jnp.concatenate([z, jax.nn.one_hot(action, self.num_actions)], -1))

    def __call__(self, obs, next_obs, action):
        """``(predicted next embedding, inverse-model logits, next embedding)``."""
        z, z_next = self.encode(obs), self.encode(next_obs)
        predicted = self.predict_next(jax.lax.stop_gradient(z), action)
        return predicted, self.inverse_model(jnp.concatenate([z, z_next], -1)), z_next


def icm_losses(icm: ICM, params, obs, next_obs, action) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(forward loss, inverse loss, per-transition forward error)``; the error is ICM's reward."""
    predicted, inverse_logits, z_next = icm.apply(params, obs, next_obs, action)
    error = 0.5 * jnp.mean((predicted - jax.lax.stop_gradient(z_next)) ** 2, -1)
    inverse = optax.softmax_cross_entropy_with_integer_labels(inverse_logits, action.astype(jnp.int32))
    return error.mean(), inverse.mean(), error


@struct.dataclass
class ICMState:
    params: Any
    opt_state: Any


class ICMTrainer(struct.PyTreeNode):
    """The ICM networks with their optimiser: ``init`` and one epoch of minibatch ``learn``."""

    icm: ICM = struct.field(pytree_node=False)
    optimizer: optax.GradientTransformation = struct.field(pytree_node=False)
    forward_coef: float = struct.field(pytree_node=False)
    inverse_coef: float = struct.field(pytree_node=False)

    def init(self, key: jax.Array, obs: jax.Array) -> ICMState:
        params = self.icm.init(key, obs[:1], obs[:1], jnp.zeros(1, jnp.int32))
        return ICMState(params, self.optimizer.init(params))

    def learn(self, state: ICMState, key: jax.Array, batch: BonusBatch, num_minibatches: int):
        def loss_fn(params, data):
            forward, inverse, _ = icm_losses(self.icm, params, *data)
            total = self.forward_coef * forward + self.inverse_coef * inverse
            return total, {"loss/icm_forward": forward, "loss/icm_inverse": inverse}

        data = (flat(batch.obs), flat(batch.next_obs), flat(batch.action))
        params, opt_state, key, aux = minibatch_epochs(loss_fn, self.optimizer, state.params, state.opt_state, key,
                                                       data, epochs=1, num_minibatches=num_minibatches)
        return ICMState(params, opt_state), key, aux


def make_icm_trainer(cfg, env) -> ICMTrainer:
    icm = ICM(env.num_actions, cfg.icm_latent_size, cfg.icm_layer_width, pixels=env.is_pixels)
    optimizer = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(cfg.icm_lr, eps=1e-5))
    return ICMTrainer(icm, optimizer, cfg.icm_forward_coef, cfg.icm_inverse_coef)


class ICMBonus(struct.PyTreeNode):
    """Bonus: the forward model's error on each transition (non-episodic, as curiosity is)."""

    trainer: ICMTrainer
    name: str = struct.field(pytree_node=False, default="icm")
    value_outputs: int = struct.field(pytree_node=False, default=2)
    episodic: bool = struct.field(pytree_node=False, default=False)

    def init(self, key: jax.Array, obs: jax.Array) -> ICMState:
        return self.trainer.init(key, obs)

    def rewards(self, state: ICMState, batch: BonusBatch):
        _, _, error = icm_losses(self.trainer.icm, state.params, batch.obs, batch.next_obs, batch.action)
        return error, state, {"explore/icm_reward": error.mean()}

    def learn(self, state: ICMState, key: jax.Array, batch: BonusBatch, num_minibatches: int):
        return self.trainer.learn(state, key, batch, num_minibatches)


def make_icm_bonus(cfg, env) -> ICMBonus:
    return ICMBonus(make_icm_trainer(cfg, env))
