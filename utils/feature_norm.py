"""The one rule for z-normalising LLM hidden states, shared by offline and online RL.

Offline RL computes the mean and std of a labelled dataset once (``offline_rl.data.feature_stats``);
PPO with live features keeps running statistics (``utils.running_stats.RunningMeanStd``) because
there is no dataset up front. Both then divide by :func:`usable_std`, so a hidden-state dimension
that never varied is divided by 1, not blown up by a tiny divisor when it moves at test time.
Works on numpy arrays (offline, PyTorch side) and JAX arrays (online, inside compiled code).
"""

from __future__ import annotations

from typing import Any

import numpy as np

STD_FLOOR = 1e-6
"""A std at or below this counts as constant and is replaced by 1."""


def usable_std(std: Any) -> Any:
    """``std`` with constant dimensions (std <= STD_FLOOR) set to 1; numpy in, numpy out."""
    if isinstance(std, np.ndarray):
        return np.where(std > STD_FLOOR, std, 1.0).astype(std.dtype)
    import jax.numpy as jnp

    return jnp.where(std > STD_FLOOR, std, 1.0)


def z_normalise(x: Any, mean: Any, std: Any) -> Any:
    """``(x - mean) / usable_std(std)``."""
    return (x - mean) / usable_std(std)
