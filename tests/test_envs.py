"""The env factory: names, optimistic resets and episode statistics."""

import itertools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from utils import envs

REPO = Path(__file__).resolve().parent.parent


def test_unknown_env_lists_valid_names_in_one_line():
    with pytest.raises(envs.UnknownEnvError) as error:
        envs.make("Craftax-Nope-v1", 4)
    message = str(error.value)
    assert "\n" not in message
    for name in ("Craftax-Symbolic-v1", "Craftax-Pixels-v1", "Craftax-Classic-Symbolic-v1", "Craftax-Classic-Pixels-v1"):
        assert name in message


def expand_braces(pattern: str) -> list[str]:
    """``Tetris-{Direct,Placement}-v0`` -> both names, as a shell would expand it."""
    parts = re.split(r"\{([^}]*)\}", pattern)
    choices = [[part] if i % 2 == 0 else part.split(",") for i, part in enumerate(parts)]
    return ["".join(combination) for combination in itertools.product(*choices)]


@pytest.mark.parametrize("page,start", [("README.md", "Envs:"), ("docs/design.md", "what `register` has added:")])
def test_docs_list_every_registered_env(page, start):
    """The front page and the design contract list exactly ``ENV_NAMES`` (the Survival Tetris rewards,
    which docs/tetris.md recommends for world models, were once missing from both)."""
    text = (REPO / page).read_text()
    paragraph = text[text.index(start):].split("\n\n")[0]
    listed = [name for pattern in re.findall(r"`([\w{},-]+-v\d+)`", paragraph) for name in expand_braces(pattern)]
    assert sorted(listed) == sorted(envs.ENV_NAMES)


def run_random(env, steps, seed=0):
    """Random actions for ``steps`` steps; returns per-step arrays and the final state."""

    @jax.jit
    def rollout(key):
        key, reset_key = jax.random.split(key)
        obs, state = env.reset(reset_key)

        def body(carry, _):
            key, state = carry
            key, action_key, step_key = jax.random.split(key, 3)
            action = jax.random.randint(action_key, (env.num_envs,), 0, env.num_actions)
            obs, state, reward, done, info = env.step(step_key, state, action)
            terminal_now = jax.vmap(lambda s: env.base_env.is_terminal(s, env.params))(state.env_state)
            out = (reward, done, info["episode_return"], info["episode_length"], info["achievements"], terminal_now)
            return (key, state), out

        (_, state), out = jax.lax.scan(body, (key, state), None, length=steps)
        return state, out

    state, (reward, done, ep_return, ep_length, achievements, terminal_now) = rollout(jax.random.PRNGKey(seed))
    return state, np.asarray(reward), np.asarray(done), np.asarray(ep_return), np.asarray(ep_length), \
        np.asarray(achievements), np.asarray(terminal_now)


@pytest.mark.parametrize("name", ["Tetris-Direct-LinesOnly-v0", "Craftax-Classic-Symbolic-v1"])
def test_optimistic_resets_and_episode_statistics(name):
    num_envs, steps = 16, 400 if name.startswith("Craftax") else 300
    env = envs.make(name, num_envs, reset_ratio=4)
    assert env.num_resets == 4
    state, reward, done, ep_return, ep_length, achievements, terminal_now = run_random(env, steps)

    assert done.any(), "random play should finish some episodes"
    assert not terminal_now.any(), "an env was left in a finished state after the step that ended it"

    # Every step is counted once: finished episodes' lengths plus the running ones cover all steps.
    assert ep_length[done].sum() + np.asarray(state.episode_length).sum() == num_envs * steps
    # Returns add up the same way, and the running return restarts at zero after each reset.
    np.testing.assert_allclose(
        ep_return[done].sum() + np.asarray(state.episode_return).sum(), reward.sum(), rtol=1e-4, atol=1e-3
    )
    # Per env, the finished episodes' lengths are the gaps between its done flags.
    for n in range(num_envs):
        ends = np.flatnonzero(done[:, n])
        np.testing.assert_array_equal(ep_length[ends, n], np.diff(np.concatenate([[-1], ends])))
    assert set(np.unique(achievements[done])) <= {0.0, 1.0}


def test_reset_pool_is_shared_round_robin_when_many_envs_finish():
    env = envs.make("Tetris-Placement-LinesOnly-v0", 8, reset_ratio=4)  # pool of 2 fresh boards
    obs, state = env.reset(jax.random.PRNGKey(0))
    done = jnp.ones(8, bool)
    new_obs, _ = env._reset_finished(jax.random.PRNGKey(1), done, obs, state.env_state)
    new_obs = np.asarray(new_obs)
    np.testing.assert_array_equal(new_obs[0::2], np.broadcast_to(new_obs[0], new_obs[0::2].shape))
    np.testing.assert_array_equal(new_obs[1::2], np.broadcast_to(new_obs[1], new_obs[1::2].shape))
    not_done = jnp.zeros(8, bool)
    same_obs, _ = env._reset_finished(jax.random.PRNGKey(1), not_done, obs, state.env_state)
    np.testing.assert_array_equal(np.asarray(same_obs), np.asarray(obs))


def test_env_description():
    env = envs.make("Craftax-Classic-Symbolic-v1", 2)
    assert env.obs_shape == (1345,) and env.num_actions == 17 and not env.is_pixels
    assert len(env.achievement_names) == 22 and "collect_diamond" in env.achievement_names
    assert env.episode_metric_names == ()
    pixels = envs.make("Craftax-Classic-Pixels-v1", 2)
    assert pixels.is_pixels
    assert envs.make("Tetris-Direct-Standard-v0", 2).episode_metric_names == ("length", "lines", "pieces", "score")


def test_reset_state_is_strongly_typed_so_jitted_steps_compile_once():
    """A reset state with weak types would make a jitted step retrace after its first call."""
    env = envs.make("Craftax-Classic-Symbolic-v1", 4)
    obs, state = jax.jit(env.reset)(jax.random.PRNGKey(0))
    assert not [leaf for leaf in jax.tree.leaves((obs, state)) if leaf.weak_type]
    traces = []

    @jax.jit
    def step(key, state):
        traces.append(1)
        return env.step(key, state, jnp.zeros(4, dtype=jnp.int32))

    for i in range(3):
        obs, state, *_ = step(jax.random.PRNGKey(i), state)
    assert len(traces) == 1
