"""The world model: encoder, RSSM, decoder, reward and continue heads, and its loss.

Its named settings (:class:`~world_models.common.config.WorldModelConfig`) and the papers' values:

| setting | V1 | V2 | V3 |
|---|---|---|---|
| ``latent`` | gaussian | categorical (32x32) | categorical, ``unimix`` 1% |
| ``symlog_inputs`` (symbolic encoder) | no | no | yes |
| ``recon`` | gaussian (1/2 squared error) | gaussian | symlog_mse (squared error on symlog(obs) for vectors) |
| ``reward_head`` | gaussian (1/2 squared error) | gaussian | symlog_twohot, 255 bins |
| ``kl`` | free_nats on the batch mean | balanced 0.8, scaled | free_bits per step, dyn 0.5 + rep 0.1 |

Observations arrive as stored in replay (uint8 pixels, low-precision floats for symbolic vectors);
:meth:`WorldModel.preprocess` turns them into the float inputs every network sees, for training
and for acting alike.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from world_models.common import dists
from world_models.common.config import WorldModelConfig
from world_models.common.dists import symexp, symlog
from world_models.common.networks import CNNDecoder, CNNEncoder, Head, MLPDecoder, MLPEncoder, is_pixels
from world_models.common.rssm import RSSM, RSSMState, features, init_params, initial_state, observe


class WorldModel:
    """Static description (modules and shapes); parameters travel separately as a dict."""

    def __init__(self, cfg: WorldModelConfig, obs_shape: tuple[int, ...], num_actions: int):
        self.cfg = cfg
        self.obs_shape = tuple(obs_shape)
        self.pixels = is_pixels(obs_shape)
        self.num_actions = num_actions
        self.spec = cfg.latent_spec
        self.symlog_obs = cfg.recon == "symlog_mse" and not self.pixels
        style = dict(act=cfg.act, norm=cfg.norm)
        if self.pixels:
            self.encoder = CNNEncoder(cfg.cnn_depth, cfg.cnn_stages, **style)
            self.decoder = CNNDecoder(self.obs_shape, cfg.cnn_depth, cfg.cnn_stages, **style)
        else:
            self.encoder = MLPEncoder(cfg.units, cfg.layers, symlog_inputs=cfg.symlog_inputs, **style)
            self.decoder = MLPDecoder(math.prod(self.obs_shape), cfg.units, cfg.layers, **style)
        self.rssm = RSSM(self.spec, cfg.deter, cfg.hidden, dyn_inputs=cfg.dyn_inputs, **style)
        self.reward_out = dists.ScalarHead.make(cfg.reward_head, cfg.bins)
        self.reward_head = Head(self.reward_out.size, cfg.units, cfg.layers, out_scale=self.reward_out.out_scale,
                                **style)
        self.cont_head = Head(1, cfg.units, cfg.layers, **style)
        self.feat_size = cfg.deter + self.spec.sample_size

    # -- parameters and inputs ------------------------------------------------------------------------
    def init(self, key: jax.Array) -> dict:
        keys = jax.random.split(key, 5)
        obs = jnp.zeros((1,) + self.obs_shape)
        embed = self.encoder.init(keys[0], obs)
        embed_size = self.encoder.apply(embed, obs).shape[-1]
        feat = jnp.zeros((1, self.feat_size))
        return {
            "encoder": embed,
            "rssm": init_params(self.rssm, keys[1], self.num_actions, embed_size),
            "decoder": self.decoder.init(keys[2], feat),
            "reward": self.reward_head.init(keys[3], feat),
            "cont": self.cont_head.init(keys[4], feat),
        }

    def preprocess(self, obs: jax.Array) -> jax.Array:
        """Stored observation -> network input: uint8 pixels to [0, 1], any vector to float32."""
        if obs.dtype == jnp.uint8:
            return obs.astype(jnp.float32) / 255.0
        return obs.astype(jnp.float32)

    def initial_state(self, batch_shape: tuple[int, ...]) -> RSSMState:
        return initial_state(self.spec, self.cfg.deter, batch_shape)

    def embed(self, params: dict, obs: jax.Array) -> jax.Array:
        return self.encoder.apply(params["encoder"], self.preprocess(obs))

    # -- heads ----------------------------------------------------------------------------------------
    def reward(self, params: dict, feat: jax.Array) -> jax.Array:
        return self.reward_out.mean(self.reward_head.apply(params["reward"], feat))

    def cont(self, params: dict, feat: jax.Array) -> jax.Array:
        """Probability that the episode goes on after this state."""
        return jax.nn.sigmoid(self.cont_head.apply(params["cont"], feat)[..., 0])

    def decode(self, params: dict, feat: jax.Array) -> jax.Array:
        """Predicted observation in the env's own units (pixels in [0, 1])."""
        out = self.decoder.apply(params["decoder"], feat)
        if self.pixels:
            return out
        out = out.reshape(out.shape[:-1] + self.obs_shape)
        return symexp(out) if self.symlog_obs else out

    # -- the loss -------------------------------------------------------------------------------------
    def loss(self, params: dict, batch: dict, key: jax.Array,
             start: tuple[RSSMState, jax.Array] | None = None) -> tuple[jax.Array, tuple[RSSMState, dict]]:
        """World-model loss on a time-major batch ``[T, B]`` of replay rows.

        ``start`` is ``(latent [B], previous action one-hot [B, A])`` to observe the first row from
        (replay context: the stored latent of the row before the chunk); without it, zeros.
        Returns ``(loss, (posterior states [T, B], metrics))``; the posteriors seed imagination.
        """
        cfg = self.cfg
        obs = self.preprocess(batch["obs"])
        is_first = batch["is_first"]
        actions = jax.nn.one_hot(batch["action"], self.num_actions)
        if start is None:
            start = self.initial_state(is_first.shape[1:]), jnp.zeros_like(actions[0])
        state, first_prev_action = start
        prev_action = jnp.concatenate([first_prev_action[None].astype(actions.dtype), actions[:-1]], 0)
        embed = self.encoder.apply(params["encoder"], obs)
        _, post, prior = observe(self.rssm, params["rssm"], embed, prev_action, is_first, state, key)
        feat = features(post)

        recon = self.decoder.apply(params["decoder"], feat)
        if self.pixels:  # [T, B, H, W, C]
            target, obs_axes = obs, tuple(range(2, obs.ndim))
        else:  # the decoder's flat output [T, B, D]
            target, obs_axes = (symlog(obs) if self.symlog_obs else obs).reshape(recon.shape), (2,)
        recon_scale = 1.0 if cfg.recon == "symlog_mse" else 0.5
        recon_loss = ((recon - target) ** 2).sum(obs_axes) * recon_scale

        reward_out = self.reward_head.apply(params["reward"], feat)
        reward_loss = self.reward_out.loss(reward_out, batch["reward"])
        reward_pred = self.reward_out.mean(reward_out)
        cont_target = 1.0 - batch["is_terminal"].astype(jnp.float32)
        cont_loss = dists.bernoulli_nll(self.cont_head.apply(params["cont"], feat)[..., 0], cont_target)

        metrics = {}
        if cfg.kl == "free_nats":
            kl_loss, kl = dists.kl_free_nats(self.spec, post.stats, prior, cfg.free_nats)
        elif cfg.kl == "balanced":
            kl_loss, kl = dists.kl_balanced(self.spec, post.stats, prior, cfg.kl_balance, cfg.free_nats)
            kl_loss = cfg.kl_scale * kl_loss
        else:
            kl_loss, parts = dists.kl_free_bits(self.spec, post.stats, prior, cfg.free_nats, cfg.dyn_scale,
                                                cfg.rep_scale)
            kl = parts.pop("kl")
            metrics.update({f"loss/{k}": v for k, v in parts.items()})

        total = recon_loss.mean() + reward_loss.mean() + cont_loss.mean() + kl_loss
        metrics.update({
            "loss/model": total,
            "loss/recon": recon_loss.mean(),
            "loss/reward": reward_loss.mean(),
            "loss/cont": cont_loss.mean(),
            "loss/kl": kl.mean(),
            "loss/kl_term": kl_loss,
            "loss/prior_entropy": self.spec.entropy(prior).mean(),
            "loss/post_entropy": self.spec.entropy(post.stats).mean(),
            "loss/reward_error": jnp.abs(reward_pred - batch["reward"]).mean(),
        })
        baseline = (((target - target.mean((0, 1))) ** 2).sum(obs_axes) * recon_scale).mean()
        metrics.update(self.diagnostics(batch["reward"], reward_pred, baseline, post, batch.get("unlock"),
                                        batch.get("unlock_first")))
        return total, (post, metrics)

    def diagnostics(self, reward: jax.Array, reward_pred: jax.Array, recon_baseline: jax.Array,
                    post: RSSMState, unlock: jax.Array | None = None, unlock_first: jax.Array | None = None) -> dict:
        """What tells a model that predicts nothing useful from one that does (logged every chunk):

        * ``diag/reward_pred_{pos,zero,neg}``: the reward head's mean prediction on posterior steps
          whose real reward is > 0.5, == 0 and < 0 (NaN where the batch has none). A head that
          misses the rare +1s predicts ~0 on the first group.
        * ``diag/reward_pred_{first,repeat}`` (with the rows' achievement events ``unlock``, the id of
          an achievement the step did (-1: none), and ``unlock_first``, whether it unlocked one for the
          first time in its episode): the head's mean prediction on first unlocks (Craftax pays +1)
          and on repeats (the same deed again, paid 0). The symbolic observation shows no achievement
          flags, so a model without memory of the episode cannot tell the two apart and predicts
          about the same on both; one that remembers predicts ~1 on the first and ~0 on the second.
        * ``diag/recon_mean_baseline``: the reconstruction loss of predicting the batch's mean
          observation (``recon_baseline``), next to ``loss/recon``: a decoder above it has learned
          less than the mean.
        * ``diag/post_used_classes`` (categorical latents): classes that are some step's most likely
          class, per latent, averaged over latents (out of ``classes``); 1 means a collapsed latent.
        """
        sg = jax.lax.stop_gradient
        reward_pred = sg(reward_pred)

        def masked_mean(mask):
            return (reward_pred * mask).sum() / mask.sum()

        metrics = {
            "diag/reward_pred_pos": masked_mean(reward > 0.5),
            "diag/reward_pred_zero": masked_mean(reward == 0),
            "diag/reward_pred_neg": masked_mean(reward < 0),
            "diag/recon_mean_baseline": sg(recon_baseline),
        }
        if unlock is not None:
            event = unlock >= 0
            metrics["diag/reward_pred_first"] = masked_mean(event & unlock_first)
            metrics["diag/reward_pred_repeat"] = masked_mean(event & ~unlock_first)
        if self.spec.discrete:
            top = jax.nn.one_hot(jnp.argmax(post.stats, -1), self.spec.classes)  # [T, B, stoch, classes]
            metrics["diag/post_used_classes"] = (top.sum((0, 1)) > 0).sum(-1).mean()
        return metrics
