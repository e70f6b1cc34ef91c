"""The named settings that make Dreamer V1, V2 or V3, as the small frozen configs each module receives.

Every difference between the three papers is a named field here (``latent``, ``reward_head``,
``kl``, ``actor_grad``, ...), never a version number, so any mix of them runs (V3 with a Gaussian
latent, V2 with return normalisation) and ablations are single flags. The presets ``v1``, ``v2``
and ``v3`` in ``configs/world_models/dreamer.yaml`` set them to each paper's values;
``world_models.dreamer.DreamerConfig`` documents them for ``--help`` and builds these configs with
:meth:`AgentConfig.from_fields`. Each module reads only its own config: :class:`WorldModelConfig`
(``world_model.py``), :class:`ActorCriticConfig` (``behavior.py``) and :class:`AgentConfig`
(``agent.py``: optimisers and the slow critic, plus the other two).

A value outside a setting's choices is a :class:`utils.errors.UserError` naming the flag.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from utils.errors import UserError
from world_models.common.dists import LatentSpec

#: The choices of each named setting (the first paper that used each is in DreamerConfig's docs).
CHOICES = {
    "latent": ("gaussian", "categorical"),
    "recon": ("gaussian", "symlog_mse"),
    "reward_head": ("gaussian", "symlog_twohot", "symexp_twohot"),
    "critic_head": ("gaussian", "symlog_twohot", "symexp_twohot"),
    "kl": ("free_nats", "balanced", "free_bits"),
    "actor_grad": ("dynamics", "reinforce", "mix"),
    "slow_critic": ("none", "copy", "ema"),
    "return_norm": ("none", "percentile"),
    "imag_cont": ("prob", "mode"),
    "dyn_inputs": ("joint", "split"),
    "act": ("silu", "elu", "relu"),
}


def check_choices(config: Any) -> None:
    """A UserError for the first named setting of ``config`` outside its choices."""
    for field in dataclasses.fields(config):
        choices = CHOICES.get(field.name)
        value = getattr(config, field.name)
        if choices is not None and value not in choices:
            flag = "--" + field.name.replace("_", "-")
            raise UserError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def pick(cls, source: Any):
    """An instance of the config dataclass ``cls`` with each field read from ``source`` by name."""
    return cls(**{f.name: getattr(source, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class WorldModelConfig:
    """Encoder, RSSM, decoder, reward and continue heads, and the world-model loss."""

    latent: str
    stoch: int
    classes: int
    unimix: float
    min_std: float
    deter: int
    hidden: int
    dyn_inputs: str
    units: int
    layers: int
    act: str
    norm: bool
    cnn_depth: int
    cnn_stages: int
    symlog_inputs: bool
    recon: str
    reward_head: str
    bins: int
    kl: str
    free_nats: float
    kl_balance: float
    kl_scale: float
    dyn_scale: float
    rep_scale: float

    def __post_init__(self):
        check_choices(self)

    @property
    def latent_spec(self) -> LatentSpec:
        if self.latent == "gaussian":
            return LatentSpec(discrete=False, stoch=self.stoch, min_std=self.min_std)
        return LatentSpec(discrete=True, stoch=self.stoch, classes=self.classes, unimix=self.unimix)


@dataclasses.dataclass(frozen=True)
class ActorCriticConfig:
    """The actor and critic heads, imagination and their losses."""

    units: int
    layers: int
    act: str
    norm: bool
    unimix: float
    actor_init_scale: float
    critic_head: str
    bins: int
    actor_grad: str
    actor_grad_mix: float
    imag_horizon: int
    gamma: float
    lam: float
    actor_entropy: float
    slow_critic_returns: bool
    slow_critic_reg: float
    return_norm: str
    retnorm_decay: float
    replay_value_scale: float
    imag_cont: str

    def __post_init__(self):
        check_choices(self)
        if not 0.0 <= self.actor_grad_mix <= 1.0:
            raise UserError(f"--actor-grad-mix must be in [0, 1], got {self.actor_grad_mix}")

    @property
    def value_gradients(self) -> bool:
        """Whether the actor learns by backpropagating returns through the imagined dynamics."""
        return self.actor_grad in ("dynamics", "mix")


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """Optimisers, the slow critic's update and how replayed chunks start (``replay_context``), plus the
    world model's and actor-critic's configs."""

    wm: WorldModelConfig
    ac: ActorCriticConfig
    model_lr: float
    model_eps: float
    model_grad_clip: float
    actor_lr: float
    critic_lr: float
    ac_eps: float
    ac_grad_clip: float
    slow_critic: str
    target_update_every: int
    slow_critic_rate: float
    imag_starts: int
    replay_context: bool

    def __post_init__(self):
        check_choices(self)
        if self.slow_critic == "none" and (self.ac.slow_critic_returns or self.ac.slow_critic_reg):
            raise UserError("--slow-critic none leaves the slow critic at its initial weights; "
                            "--slow-critic-returns and --slow-critic-reg need --slow-critic copy or ema")
        if self.imag_starts < 0:
            raise UserError(f"--imag-starts must be >= 0 (0: every replayed state), got {self.imag_starts}")

    @classmethod
    def from_fields(cls, source: Any) -> "AgentConfig":
        """Every field read by name from ``source`` (a ``DreamerConfig`` or anything with the fields)."""
        nested = {"wm": pick(WorldModelConfig, source), "ac": pick(ActorCriticConfig, source)}
        flat = {f.name: getattr(source, f.name) for f in dataclasses.fields(cls) if f.name not in nested}
        return cls(**nested, **flat)
