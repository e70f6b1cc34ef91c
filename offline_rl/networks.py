"""PyTorch policy (and value) networks for offline RL, built from a self-describing spec.

The spec is derived from the dataset's manifest (observation shape, action count) and the config
(sizes, whether LLM features are concatenated), and is stored in every checkpoint, so evaluation
rebuilds exactly the trained network without the training config or the dataset.

* Flat (symbolic) observations go through an MLP; image observations ``[H, W, C]`` through the
  Craftax-baseline CNN (three 5x5 conv + 3x3 max-pool stages, then a dense embedding), the same
  shapes as ``utils.networks.ConvTorso`` on the JAX side.
* LLM features are z-normalised by buffers inside the network (mean/std of the training set),
  so the statistics travel with the weights and evaluation cannot use different ones.
* Actor and critic have separate torsos, as in the Craftax baselines: a shared torso lets the
  value loss (returns of tens) swamp the policy's gradients.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from utils.errors import UserError

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """Everything needed to rebuild a network; stored in checkpoints as a plain dict."""

    obs_shape: tuple[int, ...]
    num_actions: int
    feature_dim: int = 0  # width of the concatenated LLM features (0: none)
    width: int = 256
    depth: int = 2
    activation: str = "relu"
    critic: bool = False  # also build a value head (AWR, IQL)
    q_heads: int = 0  # Q(s, .) networks over all actions, each with a frozen target copy (IQL: 2)

    @property
    def pixels(self) -> bool:
        return len(self.obs_shape) == 3

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "obs_shape": list(self.obs_shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NetworkSpec":
        return cls(**{**data, "obs_shape": tuple(data["obs_shape"])})


class FeatureNorm(nn.Module):
    """``(x - mean) / std`` with the training set's statistics held as (saved) buffers."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def _mlp(in_dim: int, width: int, depth: int, activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(in_dim, width), _ACTIVATIONS[activation]()]
        in_dim = width
    return nn.Sequential(*layers)


class Torso(nn.Module):
    """Observation (+ normalised features) -> ``width`` units."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        self.pixels = spec.pixels
        if self.pixels:
            height, width, in_channels = spec.obs_shape
            stages: list[nn.Module] = []
            channels = in_channels
            for _ in range(3):
                stages += [nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(),
                           nn.MaxPool2d(3, 3, ceil_mode=True)]
                channels = 32
            self.conv = nn.Sequential(*stages, nn.Flatten())
            with torch.no_grad():
                flat = self.conv(torch.zeros(1, in_channels, height, width)).shape[1]
            self.embed = nn.Sequential(nn.Linear(flat, spec.width), nn.ReLU())
            self.mlp = _mlp(spec.width + spec.feature_dim, spec.width, spec.depth, spec.activation)
        else:
            obs_dim = int(np.prod(spec.obs_shape))
            self.mlp = _mlp(obs_dim + spec.feature_dim, spec.width, spec.depth, spec.activation)

    def forward(self, obs: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        if self.pixels:
            x = self.embed(self.conv(obs.permute(0, 3, 1, 2)))  # NHWC (as stored) -> NCHW
        else:
            x = obs.reshape(obs.shape[0], -1)
        if features is not None:
            x = torch.cat([x, features], dim=-1)
        return self.mlp(x)


class QNetwork(nn.Module):
    """``Q(s, .)``: its own torso and one output per action (discrete actions need no action input)."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        self.torso = Torso(spec)
        self.head = nn.Linear(spec.width, spec.num_actions)

    def forward(self, obs: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        return self.head(self.torso(obs, features))


class PolicyNetwork(nn.Module):
    """``forward(obs, features) -> (logits [B, A], value [B] or None)``."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        self.spec = spec
        self.feature_norm = FeatureNorm(spec.feature_dim) if spec.feature_dim else None
        self.actor = Torso(spec)
        self.logits = nn.Linear(spec.width, spec.num_actions)
        nn.init.orthogonal_(self.logits.weight, gain=0.01)  # start near the uniform policy
        nn.init.zeros_(self.logits.bias)
        if spec.critic:
            self.critic = Torso(spec)
            self.value = nn.Linear(spec.width, 1)
        if spec.q_heads:
            self.q = nn.ModuleList(QNetwork(spec) for _ in range(spec.q_heads))
            # Polyak-averaged copies: modules (not a separate object) so checkpoints and resume carry them.
            self.q_target = copy.deepcopy(self.q).requires_grad_(False)

    def _features(self, features: torch.Tensor | None) -> torch.Tensor | None:
        if self.feature_norm is None:
            return None
        if features is None:
            raise ValueError("this network was trained with LLM features; pass them")
        return self.feature_norm(features)

    def forward(self, obs: torch.Tensor, features: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self._features(features)
        logits = self.logits(self.actor(obs, feats))
        value = self.value(self.critic(obs, feats)).squeeze(-1) if self.spec.critic else None
        return logits, value

    def q_values(self, obs: torch.Tensor, features: torch.Tensor | None = None, target: bool = False
                 ) -> list[torch.Tensor]:
        """``[B, A]`` action values of every Q network (of the target copies with ``target``)."""
        feats = self._features(features)
        return [q(obs, feats) for q in (self.q_target if target else self.q)]

    def value_only(self, obs: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """The critic alone (for recomputing lambda-return targets over a whole dataset)."""
        return self.value(self.critic(obs, self._features(features))).squeeze(-1)


def build_network(spec: NetworkSpec, seed: int) -> PolicyNetwork:
    """A freshly initialised network; ``seed`` makes the initialisation reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PolicyNetwork(spec)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when torch sees a GPU, else cpu; a GPU asked for but missing is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but torch sees no GPU; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from exc
