"""Behaviour cloning on saved trajectories, in PyTorch: cross-entropy on the data's actions.

``--top-fraction F`` < 1 clones only the best fraction F of the episodes by (undiscounted)
return ("filtered BC"). Only episodes that both start and end inside the data are ranked, since a
fragment's partial return says little about its episode; the filter needs contiguous data
(a dataset saved with ``--save-every 1``).

    python -m offline_rl.bc --dataset DATA --preset debug
    python -m offline_rl.bc --dataset DATA --preset cpu --top-fraction 0.25
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from offline_rl.data import DataSpec, episode_table, top_episode_mask
from offline_rl.networks import PolicyNetwork
from offline_rl.trainer import OfflineAlgorithm, OfflineConfig, policy_stats, run_cli
from utils.errors import UserError, exit_on_user_error
from utils.trajectories import TrajectoryDataset

ALGO = "bc"


@dataclasses.dataclass
class BCConfig(OfflineConfig):
    """Behaviour cloning, optionally of the best episodes only."""

    lr: float = 3e-4
    """Adam learning rate."""
    top_fraction: float = 1.0
    """Clone only this fraction of the complete episodes, the ones with the highest returns (1: all rows)."""


class BC(OfflineAlgorithm):
    name = ALGO

    def __init__(self, cfg: BCConfig):
        super().__init__(cfg)
        if not 0.0 < cfg.top_fraction <= 1.0:
            raise UserError(f"--top-fraction must be in (0, 1], got {cfg.top_fraction}")
        self._mask: np.ndarray | None = None

    def prepare(self, dataset: TrajectoryDataset, spec: DataSpec) -> dict[str, Any]:
        if self.cfg.top_fraction == 1.0:
            return {"top_fraction": 1.0}
        table = episode_table(dataset)
        self._mask = top_episode_mask(table, self.cfg.top_fraction)
        kept = np.unique(table.episode_of_row[self._mask])
        return {"top_fraction": self.cfg.top_fraction, "kept_rows": int(self._mask.sum()),
                "kept_episodes": int(kept.size), "complete_episodes": int(table.complete.sum()),
                "kept_min_return": float(table.returns[kept].min()),
                "complete_mean_return": float(table.returns[table.complete].mean())}

    def epoch_rows(self, dataset: TrajectoryDataset, spec: DataSpec, models: list[PolicyNetwork]):
        return {}, self._mask

    def make_optimizer(self, model: PolicyNetwork) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.cfg.lr)

    def update(self, model: PolicyNetwork, batch: dict[str, torch.Tensor]):
        logits, _ = model(batch["obs"], batch.get("hidden_state"))
        log_prob, stats = policy_stats(logits, batch["action"])
        loss = -log_prob.mean()  # cross-entropy with the data's actions
        return loss, {"loss/actor": loss.detach(), **stats}


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    return run_cli(BCConfig, BC, ALGO, argv)


if __name__ == "__main__":
    main()
