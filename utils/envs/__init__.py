"""The one environment factory: ``make(name, num_envs)`` for every env the project trains on.

Every area builds its envs here so that optimistic resets, episode statistics and achievement
reporting behave the same for PPO, Dreamer, offline evaluation and the tools.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from utils.envs.vec_env import VecEnv, VecEnvState
from utils.errors import UserError

__all__ = ["ENV_NAMES", "VecEnv", "VecEnvState", "UnknownEnvError", "make", "register"]

DEFAULT_RESET_RATIO = 16


class UnknownEnvError(UserError):
    """Raised for a name that is not registered; the message lists the valid ones."""


class EnvFamily(NamedTuple):
    """How to build a base env and read its per-episode outcomes."""

    build: Callable[..., Any]
    achievement_names: Callable[[Any], tuple[str, ...]]
    achievements: Callable[[Any], Callable[[Any], Any]]
    episode_metrics: Callable[[Any], Callable[[Any], dict]] | None = None


_REGISTRY: dict[str, EnvFamily] = {}


def register(name: str, family: EnvFamily) -> None:
    """Make ``name`` available to ``make`` (used for Craftax here and for envs added later)."""
    _REGISTRY[name] = family


def env_names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def make(name: str, num_envs: int, *, reset_ratio: int = DEFAULT_RESET_RATIO, **options) -> VecEnv:
    """Build ``num_envs`` batched copies of env ``name`` with optimistic resets.

    ``options`` go to the env's constructor (e.g. Tetris action and reward modes).
    """
    family = _REGISTRY.get(name)
    if family is None:
        raise UnknownEnvError(f"unknown env {name!r}; valid names: {', '.join(env_names())}")
    base_env = family.build(**options)
    return VecEnv(
        base_env,
        name=name,
        num_envs=num_envs,
        reset_ratio=reset_ratio,
        achievement_names=family.achievement_names(base_env),
        achievements_fn=family.achievements(base_env),
        episode_metrics_fn=family.episode_metrics(base_env) if family.episode_metrics else None,
    )


def is_classic(name: str) -> bool:
    return name.startswith("Craftax-Classic")


def _register_craftax() -> None:
    def build_for(env_name):
        def build():
            from craftax.craftax_env import make_craftax_env_from_name

            from utils.textures import constants_module_for, ensure_texture_cache

            if "Pixels" in env_name:
                ensure_texture_cache(constants_module_for(env_name))
            return make_craftax_env_from_name(env_name, auto_reset=False)

        return build

    def achievement_names_for(env_name):
        def names(_base_env):
            if is_classic(env_name):
                from craftax.craftax_classic.constants import Achievement
            else:
                from craftax.craftax.constants import Achievement
            return tuple(a.name.lower() for a in Achievement)

        return names

    def achievements(_base_env):
        return lambda state: state.achievements

    for env_name in (
        "Craftax-Symbolic-v1",
        "Craftax-Pixels-v1",
        "Craftax-Classic-Symbolic-v1",
        "Craftax-Classic-Pixels-v1",
    ):
        metrics = None if is_classic(env_name) else (lambda _base_env: floor_metrics)
        register(env_name, EnvFamily(build_for(env_name), achievement_names_for(env_name), achievements, metrics))


# Full Craftax's floors in the order the ladders connect them (craftax.constants.LEVEL_ACHIEVEMENT_MAP).
FLOOR_NAMES = ("overworld", "dungeon", "gnomish_mines", "sewers", "vaults", "troll_mines",
               "fire_realm", "ice_realm", "graveyard")


def floor_metrics(state) -> dict:
    """Per-episode floor progress on full Craftax: ``floors/reached_<k>_<name>`` (0 or 1) and
    ``floors/deepest`` (index of the deepest floor reached).

    Read from the "enter floor k" achievements, which are set the first time the player arrives on a
    floor; floors are only reachable one ladder at a time, so the deepest one set is the deepest visited.
    """
    import jax.numpy as jnp
    from craftax.craftax.constants import LEVEL_ACHIEVEMENT_MAP

    reached = state.achievements[LEVEL_ACHIEVEMENT_MAP[1:]].astype(jnp.float32)  # floors 1..8
    depth = jnp.arange(1, len(FLOOR_NAMES), dtype=jnp.float32)
    metrics = {f"floors/reached_{k}_{name}": reached[k - 1] for k, name in enumerate(FLOOR_NAMES) if k}
    metrics["floors/deepest"] = jnp.max(reached * depth)
    return metrics


def _register_tetris() -> None:
    """``Tetris-<Direct|Placement>-<Standard|Survival|LinesOnly>-v0``: the action and reward modes in the name."""

    def build_for(action_mode, reward_mode):
        def build(**options):
            from utils.envs.tetris import TetrisEnv

            return TetrisEnv(action_mode=action_mode, reward_mode=reward_mode, **options)

        return build

    for action_mode, action_label in (("direct", "Direct"), ("placement", "Placement")):
        for reward_mode, reward_label in (("standard", "Standard"), ("survival", "Survival"),
                                          ("lines_only", "LinesOnly")):
            register(
                f"Tetris-{action_label}-{reward_label}-v0",
                EnvFamily(
                    build_for(action_mode, reward_mode),
                    achievement_names=lambda base: tuple(base.achievement_names),
                    achievements=lambda base: base.achievements,
                    episode_metrics=lambda base: base.episode_metrics,
                ),
            )


_register_craftax()
_register_tetris()
ENV_NAMES = env_names()

