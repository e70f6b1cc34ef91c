"""One game, one step at a time on the host: what human play and rendering agents both need.

The env comes from the project's factory (``utils.envs.make``) but is stepped unbatched through
its ``base_env`` without automatic resets, so the terminal state of an episode can still be drawn
and described before the next episode starts. Each step reports the reward, the running return,
the achievements unlocked by that very step and, for Craftax, the canonical text of the
observations before and after it (``utils.text_obs``; pixel envs get the text of the symbolic
view craftax renders from the same state). Tetris has no text renderer, so its text is None.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import numpy as np

from utils import envs
from utils.media import state_renderer
from utils.text_obs import CLASSIC_ENV, FULL_ENV, render_text


@dataclasses.dataclass
class StepResult:
    action: int
    reward: float
    done: bool
    episode_return: float  # including this step
    episode_length: int  # including this step
    unlocked: list[str]  # achievements unlocked by this step
    text_before: str | None
    text_after: str | None


class GameSession:
    """A single env: ``reset``, ``step(action)``, ``frame()``, ``text()``; episodes never auto-reset."""

    def __init__(self, env_name: str, seed: int = 0, frames: bool = True):
        import jax

        game = _game(env_name)
        self.env, self.env_name = game.env, env_name
        self._reset, self._step, self._text_obs = game.reset, game.step, game.text_obs
        self._render = game.render if frames else None
        self.achievement_names = self.env.achievement_names
        self.key = jax.random.PRNGKey(seed)
        self.episode = -1
        self.reset()

    def reset(self) -> np.ndarray:
        import jax

        self.key, key = jax.random.split(self.key)
        self.obs, self.state = self._reset(key)
        self.episode += 1
        self.episode_return, self.episode_length = 0.0, 0
        self.achieved = np.zeros(len(self.achievement_names), bool)
        self.done = False
        return np.asarray(self.obs)

    def step(self, action: int) -> StepResult:
        import jax
        import jax.numpy as jnp

        if self.done:
            raise RuntimeError("the episode is over; call reset() first")
        text_before = self.text()
        self.key, key = jax.random.split(self.key)
        self.obs, self.state, reward, done, _ = self._step(key, self.state, jnp.int32(action))
        reward, self.done = float(reward), bool(done)
        achieved = np.asarray(self.state.achievements).astype(bool)
        unlocked = [n for n, new, old in zip(self.achievement_names, achieved, self.achieved) if new and not old]
        self.achieved = achieved
        self.episode_return += reward
        self.episode_length += 1
        return StepResult(int(action), reward, self.done, self.episode_return, self.episode_length,
                          unlocked, text_before, self.text())

    def frame(self) -> np.ndarray:
        if self._render is None:
            raise RuntimeError("this session was opened with frames=False")
        return self._render(self.state)

    def text(self) -> str | None:
        """Canonical text of the current observation, None for envs without a text renderer."""
        return None if self._text_obs is None else self._text_obs(self.obs, self.state)

    def achieved_names(self) -> list[str]:
        return [n for n, got in zip(self.achievement_names, self.achieved) if got]


class _Game(NamedTuple):
    env: Any
    reset: Callable
    step: Callable
    render: Callable
    text_obs: Callable | None


@functools.lru_cache(maxsize=None)
def _game(env_name: str) -> _Game:
    """The compiled pieces of one env, built once per process however many sessions use them."""
    import jax

    env = envs.make(env_name, 1)  # one env: we only borrow its base env, params and names
    base, params = env.base_env, env.params
    return _Game(env, jax.jit(lambda key: base.reset(key, params)),
                 jax.jit(lambda key, state, action: base.step(key, state, action, params)),
                 state_renderer(env), _text_obs_fn(env_name))


def _text_obs_fn(env_name: str):
    """``(obs, state) -> text`` for Craftax envs, None for the others."""
    import jax

    if env_name in (CLASSIC_ENV, FULL_ENV):
        return lambda obs, state: render_text(np.asarray(obs), env_name)
    if env_name == "Craftax-Classic-Pixels-v1":
        from craftax.craftax_classic.renderer import render_craftax_symbolic
        symbolic, text_env = jax.jit(render_craftax_symbolic), CLASSIC_ENV
    elif env_name == "Craftax-Pixels-v1":
        from craftax.craftax.renderer import render_craftax_symbolic
        symbolic, text_env = jax.jit(render_craftax_symbolic), FULL_ENV
    else:
        return None
    return lambda obs, state: render_text(np.asarray(symbolic(state)), text_env)

