"""GAE against a plain Python loop over the textbook recursion."""

import numpy as np

from utils.returns import gae


def loop_gae(rewards, values, dones, last_value, gamma, lam):
    T, N = rewards.shape
    advantages = np.zeros((T, N))
    for n in range(N):
        next_advantage, next_value = 0.0, last_value[n]
        for t in reversed(range(T)):
            keep = 1.0 - dones[t, n]
            delta = rewards[t, n] + gamma * next_value * keep - values[t, n]
            next_advantage = delta + gamma * lam * keep * next_advantage
            advantages[t, n] = next_advantage
            next_value = values[t, n]
    return advantages, advantages + values


def test_gae_matches_plain_loop():
    rng = np.random.default_rng(0)
    T, N = 37, 5
    rewards = rng.normal(size=(T, N)).astype(np.float32)
    values = rng.normal(size=(T, N)).astype(np.float32)
    dones = rng.random((T, N)) < 0.15
    last_value = rng.normal(size=N).astype(np.float32)
    advantages, targets = gae(rewards, values, dones, last_value, 0.99, 0.8)
    want_adv, want_targets = loop_gae(rewards, values, dones.astype(np.float64), last_value, 0.99, 0.8)
    np.testing.assert_allclose(advantages, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets, want_targets, rtol=1e-5, atol=1e-5)


def test_gae_does_not_bootstrap_across_episode_end():
    rewards = np.array([[1.0], [0.0]], np.float32)
    values = np.array([[0.0], [5.0]], np.float32)
    dones = np.array([[True], [False]])
    advantages, _ = gae(rewards, values, dones, np.array([7.0], np.float32), 1.0, 1.0)
    assert float(advantages[0, 0]) == 1.0  # the 5.0 of the next episode must not leak back
