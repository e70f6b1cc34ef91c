"""Advantage-Weighted Regression (Peng et al., 2019) on saved trajectories, in PyTorch.

The critic regresses a return target; the actor maximises the data's log-probabilities weighted by
``exp(A / beta)`` with ``A = target - V(s)``, clipped at ``--max-weight``. Targets are either Monte
Carlo returns (``--returns mc``: computed once, per episode across shard boundaries, bootstrapped
from the stored critic value only where a stream's data stops) or TD(lambda) returns of the
critic being trained (``--returns lambda``: recomputed over the whole dataset at every epoch).
Advantages are (by default) normalised per batch before the temperature, so ``--beta`` means the
same thing whatever the reward scale.

    python -m offline_rl.awr --dataset DATA --preset debug
    python -m offline_rl.awr --dataset DATA --preset cpu --features hidden_state
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np
import torch

from offline_rl.data import DataSpec, critic_values
from offline_rl.networks import PolicyNetwork
from offline_rl.trainer import OfflineAlgorithm, OfflineConfig, policy_stats, run_cli
from utils.errors import UserError, exit_on_user_error
from utils.trajectories import TrajectoryDataset

ALGO = "awr"


@dataclasses.dataclass
class AWRConfig(OfflineConfig):
    """Advantage-weighted regression: value regression plus exp(A / beta)-weighted behaviour cloning."""

    actor_lr: float = 3e-4
    """Adam learning rate of the actor."""
    critic_lr: float = 3e-4
    """Adam learning rate of the critic."""
    beta: float = 1.0
    """Temperature: weight = exp(A / beta). Smaller is greedier (closer to picking the best actions)."""
    max_weight: float = 20.0
    """Clip weights at this value, so a few large advantages cannot dominate a batch."""
    normalize_advantages: bool = True
    """Normalise advantages per batch (zero mean, unit std) before dividing by beta."""
    gamma: float = 0.99
    """Discount factor of the return targets."""
    returns: Literal["mc", "lambda"] = "mc"
    """Critic target: mc (Monte Carlo, per episode across shards) or lambda (TD(lambda) with the critic, per epoch)."""
    gae_lambda: float = 0.95
    """Lambda of the TD(lambda) targets (--returns lambda)."""
    value_batch_size: int = 4096
    """Rows per forward pass when recomputing the critic over the dataset (--returns lambda)."""


def awr_weights(advantages: torch.Tensor, beta: float, max_weight: float, normalize: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min(exp(A' / beta), max_weight), clipped)`` with A' the (optionally) normalised advantages.

    Normalisation uses the batch's population std; the exponent is capped before ``exp`` so huge
    advantages cannot overflow to inf.
    """
    if beta <= 0 or max_weight <= 0:
        raise UserError(f"--beta and --max-weight must be positive, got {beta} and {max_weight}")
    a = advantages.float()
    if normalize:
        a = (a - a.mean()) / (a.std(unbiased=False) + 1e-8)
    exponent = a / beta
    cap = math.log(max_weight)
    return torch.exp(torch.clamp(exponent, max=cap)), exponent > cap


def explained_variance(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - Var(target - prediction) / Var(target): 1 is perfect, 0 is no better than the mean."""
    variance = target.var(unbiased=False)
    return 1.0 - (target - prediction).var(unbiased=False) / variance.clamp_min(1e-8)


class AWR(OfflineAlgorithm):
    name = ALGO
    critic = True

    def __init__(self, cfg: AWRConfig):
        super().__init__(cfg)
        if cfg.returns not in ("mc", "lambda"):
            raise UserError(f"--returns must be mc or lambda, got {cfg.returns!r}")
        if not 0.0 <= cfg.gae_lambda <= 1.0 or not 0.0 <= cfg.gamma <= 1.0:
            raise UserError("--gamma and --gae-lambda must lie in [0, 1]")
        awr_weights(torch.zeros(1), cfg.beta, cfg.max_weight, False)  # reject bad values before training
        self.exact_resume = cfg.returns == "mc"
        self._returns: np.ndarray | None = None

    def prepare(self, dataset: TrajectoryDataset, spec: DataSpec) -> dict[str, Any]:
        if self.cfg.returns != "mc":
            return {"returns": "lambda"}
        self._returns, bootstrapped = dataset.compute_returns(self.cfg.gamma, return_bootstrapped=True)
        return {"returns": "mc", "return_mean": float(self._returns.mean()),
                "bootstrapped_fraction": float(bootstrapped.mean())}

    def epoch_rows(self, dataset: TrajectoryDataset, spec: DataSpec, models: list[PolicyNetwork]):
        if self._returns is not None:
            return {"return": self._returns}, None
        targets = {}
        for i, model in enumerate(models):
            values = critic_values(dataset, _value_fn(model), self.cfg.value_batch_size, spec.keys[:1] + spec.keys[2:])
            targets[f"return/{i}"] = dataset.compute_returns(self.cfg.gamma, values=values, lam=self.cfg.gae_lambda)
        return targets, None

    def make_optimizer(self, model: PolicyNetwork) -> torch.optim.Optimizer:
        actor = [*model.actor.parameters(), *model.logits.parameters()]
        critic = [*model.critic.parameters(), *model.value.parameters()]
        return torch.optim.Adam([{"params": actor, "lr": self.cfg.actor_lr},
                                 {"params": critic, "lr": self.cfg.critic_lr}])

    def update(self, model: PolicyNetwork, batch: dict[str, torch.Tensor]):
        cfg = self.cfg
        logits, value = model(batch["obs"], batch.get("hidden_state"))
        target = batch["return"].float()
        critic_loss = 0.5 * (value - target).pow(2).mean()
        weights, clipped = awr_weights((target - value).detach(), cfg.beta, cfg.max_weight,
                                       cfg.normalize_advantages)
        log_prob, stats = policy_stats(logits, batch["action"])
        actor_loss = -(weights * log_prob).mean()
        metrics = {
            "loss/actor": actor_loss.detach(), "loss/critic": critic_loss.detach(),
            "loss/weight_mean": weights.mean(), "loss/weight_clipped_fraction": clipped.float().mean(),
            "loss/explained_variance": explained_variance(value.detach(), target),
            "loss/advantage_mean": (target - value).detach().mean(), **stats,
        }
        return actor_loss + critic_loss, metrics


def _value_fn(model: PolicyNetwork):
    device = next(model.parameters()).device

    @torch.no_grad()
    def values(batch: dict[str, torch.Tensor]) -> np.ndarray:
        feats = batch.get("hidden_state")
        out = model.value_only(batch["obs"].to(device), feats.to(device) if feats is not None else None)
        return out.float().cpu().numpy()

    return values


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    return run_cli(AWRConfig, AWR, ALGO, argv)


if __name__ == "__main__":
    main()
