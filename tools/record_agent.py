"""Record a trained agent's play in the format ``tools.play --record`` writes, labelled as agent play.

    python -m tools.record_agent --run runs/online_rl/ppo/Craftax-Classic-Symbolic-v1/cpu-s0 --out DIR
    python -m tools.record_agent --run RUN --out DIR --episodes 3 --max-steps 120 --no-frames

Why: ``online_rl_llm.llm_play --few-shot`` reads recorded sessions. A human session needs a person at
the keyboard; a trained policy fills the same format in seconds, so there are always examples to
start from (the repository ships a small set made with this tool: ``online_rl_llm/few_shot/``).

Each episode is one session folder, ``DIR/episode-NNN/``, written through ``tools.play.Recorder`` so the
two formats cannot drift apart: ``steps.jsonl`` (the same keys; ``reasoning`` is null, a policy writes
none), ``frames/`` (unless ``--no-frames``: the few-shot reader only reads ``steps.jsonl``) and
``session.json``, which says who played: ``"player": "agent"``, an ``agent`` block (the run, its
area/algo, the checkpoint's update, the seed index, the return the run logged at that update and its
final evaluation's return when it finished) and an ``episode`` block. Episode i is played in a fresh
world of seed ``--seed + i``; actions are sampled from the policy, as the algorithms' own evaluation
does. The episode is played to its end (at most ``--max-episode-steps``) so its return is the policy's
return, but only its first ``--max-steps`` steps are recorded: a whole Classic episode is hundreds of
steps of text, and examples need only a few.
``DIR/agent_play.json`` sums the episodes up.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tools.play import STEP_KEYS, Recorder
from utils.errors import UserError, exit_on_user_error
from utils.io import atomic_write_json


@dataclasses.dataclass
class RecordAgentConfig:
    """Play a trained run's policy and record it as tools.play sessions marked as agent play."""

    run: str
    """Run folder or checkpoint file of a trained agent (anything tools.render --run takes)."""
    out: str
    """Folder to write episode-NNN/ session folders into (must not hold recordings yet)."""
    algo: str | None = None
    """area/algo of the run when it cannot be detected (e.g. online_rl/ppo)."""
    run_label: str | None = None
    """How session.json names the run (default: --run as given); e.g. the original folder of a copy."""
    seed_index: int = 0
    """Which of the run's trained seeds plays."""
    seed: int = 0
    """World seed of the first episode (episode i uses seed + i); also seeds the action sampling."""
    episodes: int = 3
    """Episodes to record, one session folder each."""
    max_steps: int = 200
    """Steps recorded per episode (its first ones); keeps the files small."""
    max_episode_steps: int = 10_000
    """Steps an episode is played at most, recorded or not; its return is the policy's return."""
    frames: bool = True
    """Write frames/NNNNNN.png as tools.play does (the LLM few-shot reader does not need them)."""
    device: str = "cpu"
    """Torch device for offline-RL policies and for LLM features (as in tools.render)."""
    llm_model: str | None = None
    """Policies on LLM features: load the LLM from here instead of the one recorded (as in tools.render)."""


def logged_return(run_dir: Path, update: int | None, seed_index: int) -> float | None:
    """The training return the run logged at ``update`` (``episode/return`` of its metrics row), so a
    recording says how good the policy was on many episodes, not only on the few it recorded."""
    metrics = run_dir / "metrics.jsonl"
    if update is None or not metrics.is_file():
        return None
    found = None
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written by a run still training
        if row.get("perf/update") == update:
            found = row.get("episode/return")
    if isinstance(found, list):
        found = found[seed_index] if seed_index < len(found) else None
    return float(found) if isinstance(found, (int, float)) else None


def evaluation_return(run_dir: Path, seed_index: int) -> float | None:
    """``eval/return`` of the run's ``summary.json`` (written when the run finished), when it has one."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return None
    found = (json.loads(summary.read_text()).get("eval") or {}).get("eval/return")
    if isinstance(found, list):
        found = found[seed_index] if seed_index < len(found) else None
    return float(found) if isinstance(found, (int, float)) else None


def record(cfg: RecordAgentConfig) -> dict[str, Any]:
    """Record ``cfg.episodes`` episodes of the run's policy; returns what ``agent_play.json`` holds."""
    from tools.agents import LoadOptions, identify, load_agent
    from tools.keymaps import keymap_for
    from tools.session import GameSession

    out = Path(cfg.out)
    if out.is_file():
        raise UserError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and (any(out.glob("*/steps.jsonl")) or (out / "steps.jsonl").exists()):
        raise UserError(f"--out {out} already holds recordings; pass a new folder")
    run = Path(cfg.run)
    agent = load_agent(run, LoadOptions(seed_index=cfg.seed_index, sample_seed=cfg.seed, device=cfg.device,
                                        llm_model=cfg.llm_model), cfg.algo)
    algo = cfg.algo or "/".join(identify(run))
    keymap = keymap_for(agent.env_name)
    agent_info = {"run": cfg.run_label or cfg.run, "algo": algo, "checkpoint_update": agent.step,
                  "seed_index": cfg.seed_index, "description": agent.description,
                  "training_return": logged_return(run, agent.step, cfg.seed_index) if run.is_dir() else None,
                  "evaluation_return": evaluation_return(run, cfg.seed_index) if run.is_dir() else None,
                  "actions": "sampled from the policy"}
    info = {"player": "agent", "agent": agent_info}
    episodes = []
    for index in range(cfg.episodes):
        seed = cfg.seed + index
        session = GameSession(agent.env_name, seed, frames=cfg.frames)
        recorder = Recorder(out / f"episode-{index:03d}", agent.env_name, seed, keymap, info, cfg.frames)
        agent.reset()
        recorded = {"steps": 0, "return": 0.0, "achievements": []}
        episode = None
        try:
            while not session.done and session.episode_length < cfg.max_episode_steps:
                keep = session.episode_length < cfg.max_steps
                if keep and cfg.frames:
                    recorder.frame(recorded["steps"], session.frame())
                result = session.step(agent.act(session.obs))
                if not keep:
                    continue
                recorder.step(dict(zip(STEP_KEYS, (
                    recorded["steps"], result.action, keymap.action_names[result.action], None,
                    result.text_before, result.text_after, result.reward, result.done, result.unlocked))))
                recorded["steps"] += 1
                recorded["return"] += result.reward
                recorded["achievements"] += result.unlocked
                if cfg.frames and (session.done or session.episode_length == cfg.max_steps):
                    recorder.frame(recorded["steps"], session.frame())  # where the recording ends
            episode = {"return": session.episode_return, "length": session.episode_length,
                       "finished": session.done, "achievements": session.achieved_names(),
                       "recorded_steps": recorded["steps"], "recorded_return": recorded["return"],
                       "recorded_achievements": recorded["achievements"],
                       "truncated": recorded["steps"] < session.episode_length}
        finally:
            recorder.close({"episode": episode} if episode is not None else None)
        episodes.append({"folder": recorder.directory.name, "seed": seed, **episode})
        print(f"episode {index}: return {episode['return']:.2f} in {episode['length']} steps"
              f"{'' if episode['finished'] else ' (not finished)'}; recorded {recorded['steps']} steps, "
              f"achievements {', '.join(recorded['achievements']) or 'none'}", flush=True)
    returns = [e["return"] for e in episodes]
    summary = {"player": "agent", "env": agent.env_name, "agent": agent_info,
               "return_mean": sum(returns) / len(returns), "episodes": episodes}
    atomic_write_json(out / "agent_play.json", summary)
    return summary


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    from utils.config import cli
    from utils.jax_setup import enable_compilation_cache

    cfg = cli(RecordAgentConfig, argv)
    enable_compilation_cache()
    summary = record(cfg)
    print(f"{len(summary['episodes'])} episodes of {summary['agent']['description']}: mean return "
          f"{summary['return_mean']:.2f}; recorded to {cfg.out}")
    return summary


if __name__ == "__main__":
    main()
