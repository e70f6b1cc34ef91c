"""PPO with Random Network Distillation: ``online_rl.ppo --bonus rnd`` under its older name.

A thin entry point only (the bonus is :mod:`online_rl.bonuses.rnd`, the training loop
:mod:`online_rl.ppo`), kept so that ``python -m online_rl.ppo_rnd`` and run folders that name
``online_rl.ppo_rnd.PPORNDConfig`` keep working; it is not an algorithm file of its own.

    python -m online_rl.ppo_rnd --preset debug      # same as: python -m online_rl.ppo --bonus rnd --preset debug
"""

from __future__ import annotations

import dataclasses

from online_rl.common import run_main
from online_rl.ppo import ALGO, AREA, PPOConfig, make_train, sweep, train  # noqa: F401  (make_train: tools.agents)
from utils.errors import exit_on_user_error


@dataclasses.dataclass
class PPORNDConfig(PPOConfig):
    """PPO-RND: PPO's config with ``bonus`` defaulting to rnd (presets: configs/online_rl/ppo.yaml)."""

    bonus: str = "rnd"


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    return run_main(PPORNDConfig, AREA, ALGO, train, argv, sweep)


if __name__ == "__main__":
    main()
