"""RND (Burda et al., 2018): a predictor learns to match a fixed random target network on the
observations the agent reaches; its error is high on observations it has rarely seen.

As in the paper, the networks' inputs are normalised by running statistics and clipped, and the
intrinsic return is non-episodic by default (``--rnd-episodic`` cuts it; dying does not end curiosity).
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
from utils.networks import make_torso
from utils.running_stats import RunningMeanStd


class RNDNetwork(nn.Module):
    """Target and predictor share this shape; only their initialisation and training differ."""

    width: int
    output_size: int
    pixels: bool = False

    @nn.compact
    def __call__(self, obs):
        x = make_torso(self.pixels, self.width, 2, "relu")()(obs)
        return nn.Dense(self.output_size, kernel_init=orthogonal(1.0))(x)


@struct.dataclass
class RNDState:
    target_params: Any  # fixed at init
    predictor_params: Any
    predictor_opt_state: Any
    obs_stats: RunningMeanStd  # of the observations fed to both networks


class RNDBonus(struct.PyTreeNode):
    """Bonus: the predictor's error on each transition's next observation."""

    network: RNDNetwork = struct.field(pytree_node=False)
    optimizer: optax.GradientTransformation = struct.field(pytree_node=False)
    obs_clip: float = struct.field(pytree_node=False)
    episodic: bool = struct.field(pytree_node=False, default=False)
    name: str = struct.field(pytree_node=False, default="rnd")
    value_outputs: int = struct.field(pytree_node=False, default=2)

    def init(self, key: jax.Array, obs: jax.Array) -> RNDState:
        target_key, predictor_key = jax.random.split(key)
        target = self.network.init(target_key, obs[:1])
        predictor = self.network.init(predictor_key, obs[:1])
        return RNDState(target, predictor, self.optimizer.init(predictor), RunningMeanStd.create(obs.shape[1:]))

    def prediction_error(self, state: RNDState, predictor_params, obs: jax.Array) -> jax.Array:
        """Per-observation squared error of the predictor against the target (the raw bonus)."""
        x = state.obs_stats.normalise(obs, self.obs_clip)
        target = jax.lax.stop_gradient(self.network.apply(state.target_params, x))
        return jnp.mean((self.network.apply(predictor_params, x) - target) ** 2, -1)

    def rewards(self, state: RNDState, batch: BonusBatch):
        """The observation statistics are updated first, so rare observations are scored in context."""
        state = state.replace(obs_stats=state.obs_stats.update(batch.next_obs))
        error = self.prediction_error(state, state.predictor_params, batch.next_obs)
        return error, state, {"explore/rnd_error": error.mean()}

    def learn(self, state: RNDState, key: jax.Array, batch: BonusBatch, num_minibatches: int):
        """One pass of minibatch regression of the predictor onto the target."""

        def loss_fn(params, obs):
            loss = self.prediction_error(state, params, obs).mean()
            return loss, {"loss/rnd": loss}

        params, opt_state, key, aux = minibatch_epochs(loss_fn, self.optimizer, state.predictor_params,
                                                       state.predictor_opt_state, key, flat(batch.next_obs),
                                                       epochs=1, num_minibatches=num_minibatches)
        return state.replace(predictor_params=params, predictor_opt_state=opt_state), key, aux


def make_rnd_bonus(cfg, env) -> RNDBonus:
    network = RNDNetwork(cfg.rnd_layer_width, cfg.rnd_output_size, pixels=env.is_pixels)
    optimizer = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(cfg.rnd_lr, eps=1e-5))
    return RNDBonus(network, optimizer, cfg.obs_clip, episodic=cfg.rnd_episodic)
