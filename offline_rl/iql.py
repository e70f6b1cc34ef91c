"""Implicit Q-learning (Kostrikov et al., 2021) for discrete actions on saved trajectories, in PyTorch.

IQL never asks a Q network about an action the data did not take, which is what makes plain
off-policy Q-learning fall apart offline. Three losses, one update:

* **value**: V(s) regresses ``min_i Q_target_i(s, a)`` with the expectile loss
  ``|tau - 1(u < 0)| u^2``, ``u = Q - V``; ``--expectile`` 0.5 is the mean (SARSA-like), towards 1
  it approaches the best action the data supports;
* **Q**: each of two Q networks regresses the one-step target ``r + gamma (1 - done) V(s')``
  (V of the next observation, no max over actions); target copies follow by Polyak averaging
  (``--target-tau``) after every step;
* **policy**: advantage-weighted behaviour cloning, ``exp(beta (Q_target(s, a) - V(s)))`` clipped at
  ``--max-weight`` times the data's negative log-likelihood (no advantage normalisation, as in IQL).

The conventions are CORL's single-file IQL and d3rlpy's (expectile 0.7, beta 3, weight clip 100,
Polyak 0.005, twin Q with the minimum of the targets, three Adam optimisers at 3e-4); the
differences are the discrete actions (Q(s, .) heads indexed by the data's action, a categorical
policy), no cosine learning-rate schedule for the actor, and next observations taken from the
next row of the same stream (:class:`offline_rl.data.TransitionDataset`).

    python -m offline_rl.iql --dataset DATA --preset debug
    python -m offline_rl.iql --dataset DATA --preset cpu --expectile 0.8 --beta 10
"""

from __future__ import annotations

import dataclasses
import math

import torch

from offline_rl.networks import PolicyNetwork
from offline_rl.trainer import OfflineAlgorithm, OfflineConfig, policy_stats, run_cli
from utils.errors import UserError, exit_on_user_error

ALGO = "iql"


@dataclasses.dataclass
class IQLConfig(OfflineConfig):
    """Implicit Q-learning: expectile value regression, one-step Q-learning, advantage-weighted policy."""

    actor_lr: float = 3e-4
    """Adam learning rate of the policy."""
    value_lr: float = 3e-4
    """Adam learning rate of V."""
    q_lr: float = 3e-4
    """Adam learning rate of the Q networks."""
    gamma: float = 0.99
    """Discount factor of the one-step Q target."""
    expectile: float = 0.7
    """Expectile tau of the value loss, in [0.5, 1): 0.5 fits the data's mean action value, larger fits its best."""
    beta: float = 3.0
    """Inverse temperature of the policy weights exp(beta * A); larger is greedier."""
    max_weight: float = 100.0
    """Clip the policy weights at this value (CORL's EXP_ADV_MAX)."""
    target_tau: float = 0.005
    """Polyak rate of the target Q networks after every update."""
    reward_scale: float = 1.0
    """Multiply rewards by this before the Q target (keeps Q in a range the networks learn well)."""


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """Mean of ``|expectile - 1(diff < 0)| * diff^2`` (``diff = target - prediction``), the asymmetric
    L2 loss whose minimiser is the ``expectile`` expectile of the target."""
    weight = torch.abs(expectile - (diff < 0).float())
    return (weight * diff.pow(2)).mean()


def advantage_weights(advantages: torch.Tensor, beta: float, max_weight: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min(exp(beta * A), max_weight), clipped)``; the exponent is capped before ``exp`` so a large
    advantage cannot overflow (the result equals clamping after it)."""
    exponent = beta * advantages.float()
    cap = math.log(max_weight)
    return torch.exp(torch.clamp(exponent, max=cap)), exponent > cap


class IQL(OfflineAlgorithm):
    name = ALGO
    critic = True
    q_heads = 2
    transitions = True

    def __init__(self, cfg: IQLConfig):
        super().__init__(cfg)
        if not 0.5 <= cfg.expectile < 1.0:
            raise UserError(f"--expectile must be in [0.5, 1), got {cfg.expectile}")
        if cfg.beta <= 0 or cfg.max_weight <= 0:
            raise UserError(f"--beta and --max-weight must be positive, got {cfg.beta} and {cfg.max_weight}")
        if not 0.0 < cfg.target_tau <= 1.0 or not 0.0 <= cfg.gamma <= 1.0:
            raise UserError("--target-tau must be in (0, 1] and --gamma in [0, 1]")

    def make_optimizer(self, model: PolicyNetwork) -> torch.optim.Optimizer:
        cfg = self.cfg
        return torch.optim.Adam([
            {"params": [*model.actor.parameters(), *model.logits.parameters()], "lr": cfg.actor_lr},
            {"params": [*model.critic.parameters(), *model.value.parameters()], "lr": cfg.value_lr},
            {"params": list(model.q.parameters()), "lr": cfg.q_lr},  # the targets are never optimised
        ])

    def update(self, model: PolicyNetwork, batch: dict[str, torch.Tensor]):
        cfg = self.cfg
        obs, feats, action = batch["obs"], batch.get("hidden_state"), batch["action"]
        reward = batch["reward"].float() * cfg.reward_scale
        not_done = 1.0 - batch["done"].float()
        valid = batch["next_valid"].float()
        with torch.no_grad():
            target_qs = model.q_values(obs, feats, target=True)
            target_q = torch.minimum(*[q.gather(1, action[:, None]).squeeze(1) for q in target_qs])
            next_v = model.value_only(batch["next_obs"], batch.get("next_hidden_state"))
            td_target = reward + cfg.gamma * not_done * next_v

        logits, value = model(obs, feats)
        advantage = target_q - value
        value_loss = expectile_loss(advantage, cfg.expectile)

        qs = [q.gather(1, action[:, None]).squeeze(1) for q in model.q_values(obs, feats)]
        count = valid.sum().clamp_min(1.0)
        q_loss = sum(((q - td_target).pow(2) * valid).sum() / count for q in qs) / len(qs)

        weights, clipped = advantage_weights(advantage.detach(), cfg.beta, cfg.max_weight)
        log_prob, stats = policy_stats(logits, action)
        actor_loss = -(weights * log_prob).mean()
        metrics = {
            "loss/actor": actor_loss.detach(), "loss/value": value_loss.detach(), "loss/q": q_loss.detach(),
            "loss/q_mean": qs[0].detach().mean(), "loss/value_mean": value.detach().mean(),
            "loss/advantage_mean": advantage.detach().mean(), "loss/weight_mean": weights.mean(),
            "loss/weight_clipped_fraction": clipped.float().mean(), "loss/next_valid_fraction": valid.mean(),
            **stats,
        }
        return actor_loss + value_loss + q_loss, metrics

    def after_step(self, model: PolicyNetwork) -> None:
        with torch.no_grad():
            torch._foreach_lerp_(list(model.q_target.parameters()), list(model.q.parameters()),
                                 self.cfg.target_tau)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    return run_cli(IQLConfig, IQL, ALGO, argv)


if __name__ == "__main__":
    main()
