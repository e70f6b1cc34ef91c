"""What the world model predicts, shown next to what happened: written into the run folder.

From replay chunks the model observes ``context`` real steps, then predicts ``horizon`` more steps
open loop from the real actions alone. Pixel envs get ``openloop.gif`` (rows: real frame, predicted
frame, error; one column per sequence; a progress bar on top turns from green to red where
the open-loop prediction starts); symbolic envs get
``imagined_rewards.png`` (real and predicted reward per step; pixel envs get it too). Both report the open-loop errors as
``eval/openloop_reward_mae`` and ``eval/openloop_obs_mse``.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from world_models.common import replay as replay_lib
from world_models.common.agent import Agent
from world_models.common.rssm import features, imagine_actions, observe


def make_openloop(agent: Agent, context: int, horizon: int, sequences: int):
    """``openloop(params, replay, key) -> dict of [T, sequences, ...]`` arrays for one seed."""
    wm = agent.wm

    def openloop(params, replay, key):
        sample_key, observe_key, imagine_key = jax.random.split(key, 3)
        batch = replay_lib.sample(replay, sample_key, sequences, context + horizon)
        actions = jax.nn.one_hot(batch["action"], agent.num_actions)
        prev_action = jnp.concatenate([jnp.zeros_like(actions[:1]), actions[:-1]], 0)
        embed = wm.embed(params["wm"], batch["obs"][:context])
        last, post, _ = observe(wm.rssm, params["wm"]["rssm"], embed, prev_action[:context],
                                batch["is_first"][:context], wm.initial_state((sequences,)), observe_key)
        predicted = imagine_actions(wm.rssm, params["wm"]["rssm"], last, prev_action[context:], imagine_key)
        feat = jnp.concatenate([features(post), features(predicted)], 0)
        return {
            "obs": wm.preprocess(batch["obs"]),
            "obs_pred": wm.decode(params["wm"], feat),
            "reward": batch["reward"],
            "reward_pred": wm.reward(params["wm"], feat),
            "is_first": batch["is_first"],
        }

    return openloop


def write_report(result: dict, run_dir: Path, context: int, pixels: bool) -> dict[str, float]:
    """Write the GIF or plot for ``result`` (host arrays) and return the open-loop error metrics."""
    result = {k: np.asarray(v, dtype=np.float32) for k, v in result.items()}
    open_part = slice(context, None)
    obs_axes = tuple(range(2, result["obs"].ndim))
    # Open loop from the actions alone cannot know that a new episode began: steps from a later
    # episode start on are shown but left out of the errors.
    same_episode = np.cumsum(result["is_first"][open_part] > 0, axis=0) == 0
    reward_error = np.abs(result["reward_pred"] - result["reward"])[open_part]
    obs_error = ((result["obs_pred"] - result["obs"]) ** 2)[open_part].mean(obs_axes)
    masked_mean = lambda x: float(x[same_episode].mean()) if same_episode.any() else float("nan")
    metrics = {"eval/openloop_reward_mae": masked_mean(reward_error), "eval/openloop_obs_mse": masked_mean(obs_error)}
    if pixels:
        write_openloop_gif(result, run_dir / "openloop.gif", context)
    write_reward_plot(result, run_dir / "imagined_rewards.png", context)
    return metrics


def write_openloop_gif(result: dict, path: Path, context: int) -> Path:
    import imageio.v2 as imageio

    truth, pred = result["obs"], np.clip(result["obs_pred"], 0.0, 1.0)
    error = np.abs(pred - truth)
    steps = truth.shape[0]
    frames = []
    for t in range(steps):
        columns = []
        for b in range(truth.shape[1]):
            column = np.concatenate([truth[t, b], pred[t, b], error[t, b]], 0)
            # A progress bar on top: green while observing, red once predicting open loop.
            bar = np.zeros((3,) + column.shape[1:], np.float32)
            bar[:, : max(1, round(bar.shape[1] * (t + 1) / steps)), 0 if t >= context else 1] = 1.0
            columns.append(np.concatenate([bar, column], 0))
            columns.append(np.ones((column.shape[0] + 3, 2, 3), np.float32))  # white gap
        frames.append((np.concatenate(columns[:-1], 1) * 255).astype(np.uint8))
    imageio.mimsave(path, frames, duration=0.2, loop=0)
    return path


def write_reward_plot(result: dict, path: Path, context: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sequences = result["reward"].shape[1]
    fig, axes = plt.subplots(sequences, 1, figsize=(7, 1.8 * sequences), sharex=True, squeeze=False)
    steps = np.arange(result["reward"].shape[0])
    for b, ax in enumerate(axes[:, 0]):
        ax.plot(steps, result["reward"][:, b], "k-", label="real reward")
        ax.plot(steps, result["reward_pred"][:, b], "C1--", label="predicted")
        ax.axvline(context - 0.5, color="C3", lw=1)
        for t in np.flatnonzero(result["is_first"][1:, b] > 0) + 1:
            ax.axvline(t - 0.5, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper left", fontsize=8)
    axes[0, 0].set_title(f"rewards: observed for {context} steps, then imagined open loop from the real actions")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
