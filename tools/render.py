"""Render agents, saved datasets and text observations to pictures.

    python -m tools.render --run runs/online_rl/ppo/Craftax-Classic-Symbolic-v1/default-s0 --out ppo.gif
    python -m tools.render --run runs/offline_rl/bc/Craftax-Classic-Symbolic-v1/default-s0 --out bc.mp4
    python -m tools.render --run runs/world_models/dreamer_v3/Craftax-Classic-Symbolic-v1/xs-s0 --out dv3.gif
    python -m tools.render --run runs/online_rl_llm/ppo_llm/Craftax-Classic-Symbolic-v1/debug-s0 --out llm.gif
    python -m tools.render --dataset data/classic-ppo --stream 3 --episode 1 --out episode.gif
    python -m tools.render --text obs.txt --out obs.png          # or --text - to read stdin

``--run`` takes any run folder or checkpoint file with a registered agent loader
(:mod:`tools.agents`: online_rl ppo, ppo_icm, ppo_e3b, ppo_rnd and ppo_rnn, world_models
dreamer_v1-v3, offline_rl awr/bc, online_rl_llm ppo_llm with its LLM's features live) and plays ``--episodes`` episodes with its policy, writing one
frame per state (an episode of T steps gives T + 1 frames) with a caption of the step, the return
so far, the last action and the achievements unlocked so far.

``--dataset`` takes a trajectory dataset (or a labelled one) and draws one env stream's rows in
order across shards, from the start of the stream or of its ``--episode``-th episode. Each row's
observation is drawn as :func:`tools.frames.obs_picture` explains: pixels as they are, Classic
symbolic as craftax's tiles decoded from the map, Tetris as the board, full Craftax symbolic as
its canonical text. Datasets do not store achievements, so the caption has the action, reward and
return.

``--text`` turns a text observation (e.g. the canonical text, or a ``text_before`` of a play
recording) into a PNG.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tools.frames import obs_picture, save_png, text_image, with_caption, write_video
from utils.errors import UserError, exit_on_user_error

CAPTION_LINES = 4


@dataclasses.dataclass
class RenderConfig:
    """Render a trained agent (--run), a saved dataset (--dataset) or a text observation (--text)."""

    out: str
    """Output file: .gif or .mp4 for --run and --dataset, .png for --text."""
    run: str | None = None
    """Run folder or checkpoint file of a trained agent (online_rl, online_rl_llm, offline_rl, world_models)."""
    dataset: str | None = None
    """Trajectory dataset folder (manifest.json + shards), labelled or not."""
    text: str | None = None
    """Text file to draw ('-' reads stdin)."""
    algo: str | None = None
    """With --run: area/algo of the run when it cannot be detected (e.g. online_rl/ppo)."""
    seed_index: int = 0
    """With --run: which of the run's trained seeds plays."""
    seed: int = 0
    """With --run: seed of the worlds and of the action sampling."""
    episodes: int = 1
    """With --run: episodes to play, one after another in the same video."""
    max_steps: int = 1000
    """Steps per episode (--run) or rows (--dataset) at most."""
    stream: int = 0
    """With --dataset: which env stream to follow."""
    episode: int | None = None
    """With --dataset: start at this episode of the stream (0 = its first); default its first row."""
    fps: int = 10
    """Frames per second of the video."""
    device: str = "cpu"
    """Torch device for offline-RL policies and for the LLM features of offline-RL and ppo_llm policies."""
    llm_model: str | None = None
    """Policies on LLM features (offline RL, ppo_llm): load the LLM from here instead of the one recorded."""
    progress: bool = True
    """Show a progress bar over steps."""


# ----------------------------------------------------------------------------------------------
# Agents
# ----------------------------------------------------------------------------------------------


def agent_frames(agent, *, seed: int = 0, episodes: int = 1, max_steps: int = 1000,
                 progress: bool = False) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Play ``episodes`` episodes; returns the captioned frames and, per episode, its outcome."""
    from tools.keymaps import action_names
    from tools.session import GameSession

    if episodes < 1 or max_steps < 1:
        raise UserError("--episodes and --max-steps must be at least 1")
    session = GameSession(agent.env_name, seed)
    names = action_names(agent.env_name)
    bar = _progress(progress, episodes * max_steps)
    frames, outcomes = [], []
    for episode in range(episodes):
        agent.reset()
        caption = lambda last: [
            f"{agent.description}  episode {episode + 1}/{episodes}  step {session.episode_length}",
            f"return {session.episode_return:.2f}   {last}",
            f"achievements ({len(session.achieved_names())}): {', '.join(session.achieved_names()) or 'none'}",
        ]
        frames.append(with_caption(session.frame(), caption("start"), num_lines=CAPTION_LINES))
        while not session.done and session.episode_length < max_steps:
            result = session.step(agent.act(session.obs))
            last = f"action {names[result.action]}  reward {result.reward:+.2f}"
            frames.append(with_caption(session.frame(), caption(last), num_lines=CAPTION_LINES))
            if bar is not None:
                bar.update(1)
        outcomes.append({"return": session.episode_return, "length": session.episode_length,
                         "finished": session.done, "achievements": session.achieved_names()})
        if bar is not None:
            bar.update(max_steps - session.episode_length)
        session.reset()
    if bar is not None:
        bar.close()
    return frames, outcomes


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


def stream_rows(directory: str | Path, stream: int, episode: int | None, max_steps: int):
    """Yield (row dict, dataset) for one stream's rows in order, starting at its ``episode``-th
    episode when given. A shard is decoded once, and only while rows are still needed."""
    from utils.trajectories import TrajectoryDataset

    dataset = TrajectoryDataset(directory)
    if not 0 <= stream < dataset.num_streams:
        raise UserError(f"--stream {stream}: {directory} has streams 0..{dataset.num_streams - 1}")
    keys = ["obs", "action", "reward", "done", "t", "episode_id"]
    yielded, episodes_seen, last_id = 0, -1, None
    for i in range(dataset.num_shards):
        shard = dataset.load_shard(i, keys)
        steps = len(shard["t"]) // dataset.num_streams
        rows = slice(stream * steps, (stream + 1) * steps)  # env-major: one stream is contiguous
        for j in range(rows.start, rows.stop):
            episode_id = int(shard["episode_id"][j])
            if episode_id != last_id:
                episodes_seen, last_id = episodes_seen + 1, episode_id
            if episode is not None and episodes_seen < episode:
                continue
            yield {k: shard[k][j] for k in keys}, dataset
            yielded += 1
            if yielded >= max_steps:
                return
    if yielded == 0:
        raise UserError(f"{directory}: stream {stream} has only {episodes_seen + 1} episode(s); "
                        f"--episode {episode} is past its end")


def dataset_frames(directory: str | Path, *, stream: int = 0, episode: int | None = None,
                   max_steps: int = 1000) -> list[np.ndarray]:
    from tools.keymaps import action_names

    frames, ret, names = [], 0.0, None
    for row, dataset in stream_rows(directory, stream, episode, max_steps):
        env_name = dataset.manifest["env_name"]
        names = names or action_names(env_name)
        ret += float(row["reward"])
        lines = [f"{Path(directory).name}  stream {stream}  t {int(row['t'])}  episode id {int(row['episode_id'])}",
                 f"action {names[int(row['action'])]}  reward {float(row['reward']):+.2f}  return {ret:.2f}"
                 + ("  (episode ends)" if row["done"] else "")]
        frames.append(with_caption(obs_picture(row["obs"], env_name), lines, num_lines=CAPTION_LINES))
        if row["done"]:
            ret = 0.0
    return frames


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def run(cfg: RenderConfig) -> dict[str, Any]:
    sources = [name for name in ("run", "dataset", "text") if getattr(cfg, name)]
    if len(sources) != 1:
        raise UserError("pass exactly one of --run RUN, --dataset DIR or --text FILE")
    out = Path(cfg.out)
    if cfg.text:
        if out.suffix.lower() != ".png":
            raise UserError(f"--out {out}: a text observation is drawn as a .png")
        text = sys.stdin.read() if cfg.text == "-" else _read_text(cfg.text)
        save_png(out, text_image(text))
        return {"out": str(out)}
    if cfg.run:
        from tools.agents import LoadOptions, load_agent

        agent = load_agent(cfg.run, LoadOptions(cfg.seed_index, cfg.seed, cfg.device, cfg.llm_model), cfg.algo)
        frames, outcomes = agent_frames(agent, seed=cfg.seed, episodes=cfg.episodes, max_steps=cfg.max_steps,
                                        progress=cfg.progress)
        write_video(out, frames, cfg.fps)
        return {"out": str(out), "frames": len(frames), "episodes": outcomes}
    frames = dataset_frames(cfg.dataset, stream=cfg.stream, episode=cfg.episode, max_steps=cfg.max_steps)
    write_video(out, frames, cfg.fps)
    return {"out": str(out), "frames": len(frames)}


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--text {path}: cannot read it ({exc})") from None


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", dynamic_ncols=True, desc="render")


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    from utils.config import cli
    from utils.io import check_output_path
    from utils.jax_setup import enable_compilation_cache

    cfg = cli(RenderConfig, argv)
    check_output_path(cfg.out, "--out", "file")
    enable_compilation_cache()
    result = run(cfg)
    for i, episode in enumerate(result.get("episodes", [])):
        print(f"episode {i + 1}: return {episode['return']:.2f}, length {episode['length']}"
              f"{'' if episode['finished'] else ' (cut at --max-steps)'}, "
              f"achievements: {', '.join(episode['achievements']) or 'none'}")
    print(f"wrote {result['out']}" + (f" ({result['frames']} frames)" if "frames" in result else ""))
    return result


if __name__ == "__main__":
    main()
