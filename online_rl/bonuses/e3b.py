"""E3B (Henaff et al., 2022): an elliptical episodic bonus over ICM-trained embeddings.

The bonus of an embedding z is ``z^T C^-1 z`` with C = lambda I + the sum of z z^T over the episode so
far: large for directions the episode has not visited. The embedding comes from ICM's encoder,
trained by the inverse model only (the Craftax baselines run E3B as ICM with its own reward at 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from online_rl.bonuses import BonusBatch
from online_rl.bonuses.icm import ICM, ICMState, ICMTrainer, make_icm_trainer


def e3b_initial(num_envs: int, size: int, lam: float) -> jax.Array:
    return jnp.broadcast_to(jnp.eye(size) / lam, (num_envs, size, size))


def e3b_step(inverse_cov: jax.Array, z: jax.Array, done: jax.Array, lam: float) -> tuple[jax.Array, jax.Array]:
    """E3B for one step of every env: bonus ``z^T C^-1 z`` of the current embedding, then the
    Sherman-Morrison update of ``C^-1`` with it; envs whose episode just ended restart at I / lambda,
    so the bonus measures novelty within the episode only."""
    u = jnp.einsum("nij,nj->ni", inverse_cov, z)
    bonus = jnp.einsum("ni,ni->n", z, u)
    updated = inverse_cov - jnp.einsum("ni,nj->nij", u, u) / (1.0 + bonus)[:, None, None]
    fresh = jnp.eye(z.shape[-1]) / lam
    return bonus, jnp.where(done[:, None, None], fresh, updated)


@struct.dataclass
class E3BState:
    icm: ICMState
    inverse_cov: jax.Array  # [N, D, D] each env's C^-1 for its current episode


class E3BBonus(struct.PyTreeNode):
    """Bonus: E3B of each step's embedding; episodic, since C restarts with every episode."""

    trainer: ICMTrainer
    num_envs: int = struct.field(pytree_node=False)
    lam: float = struct.field(pytree_node=False)
    name: str = struct.field(pytree_node=False, default="e3b")
    value_outputs: int = struct.field(pytree_node=False, default=2)
    episodic: bool = struct.field(pytree_node=False, default=True)

    def init(self, key: jax.Array, obs: jax.Array) -> E3BState:
        return E3BState(self.trainer.init(key, obs),
                        e3b_initial(self.num_envs, self.trainer.icm.latent_size, self.lam))

    def rewards(self, state: E3BState, batch: BonusBatch):
        z = self.trainer.icm.apply(state.icm.params, batch.obs, method=ICM.encode)

        def step(cov, inputs):
            bonus, cov = e3b_step(cov, *inputs, self.lam)
            return cov, bonus

        cov, bonus = jax.lax.scan(step, state.inverse_cov, (z, batch.done))
        return bonus, state.replace(inverse_cov=cov), {"explore/e3b_bonus": bonus.mean()}

    def learn(self, state: E3BState, key: jax.Array, batch: BonusBatch, num_minibatches: int):
        icm, key, logs = self.trainer.learn(state.icm, key, batch, num_minibatches)
        return state.replace(icm=icm), key, logs


def make_e3b_bonus(cfg, env) -> E3BBonus:
    return E3BBonus(make_icm_trainer(cfg, env), cfg.num_envs, cfg.e3b_lambda)
