"""tools.record_agent writes tools.play's session format, marked as agent play, and the shipped few-shot
set (online_rl_llm/few_shot/) loads through llm_play's few-shot reader as agent play."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from online_rl_llm.prompts import load_few_shot, system_prompt
from tools.play import STEP_KEYS
from utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "online_rl_llm" / "few_shot"
CLASSIC, FULL = "Craftax-Classic-Symbolic-v1", "Craftax-Symbolic-v1"
SESSION_KEYS = {"env", "seed", "started", "keymap", "action_names", "ended", "steps", "episodes_finished"}


def _steps(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "steps.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory) -> Path:
    """A PPO run of one debug update: a checkpoint and the metrics row of its update."""
    from online_rl.ppo import PPOConfig, train
    from utils.config import apply_presets, load_presets

    folder = tmp_path_factory.mktemp("ppo") / "run"
    cfg = apply_presets(PPOConfig(), ["debug"], load_presets("online_rl", "ppo"), "debug")
    train(dataclasses.replace(cfg, run_dir=str(folder), progress=False, total_steps=128, eval_every=0))
    return folder


@pytest.mark.slow  # a minute or two on a shared 2-core CPU: a PPO debug update, then the policy through the loader
def test_record_agent_writes_the_play_format_as_agent_play(debug_run, tmp_path):
    from tools.record_agent import RecordAgentConfig, main, record
    from tools.stats import recording_stats

    out = tmp_path / "rec"
    summary = main(["--run", str(debug_run), "--out", str(out), "--episodes", "2", "--max-steps", "4",
                    "--max-episode-steps", "6", "--run-label", "runs/x/debug"])
    assert [e["folder"] for e in summary["episodes"]] == ["episode-000", "episode-001"]
    for index, episode in enumerate(summary["episodes"]):
        folder = out / episode["folder"]
        steps = _steps(folder)
        assert len(steps) == 4 and all(tuple(row) == STEP_KEYS for row in steps), "tools.play's exact keys"
        assert [row["step"] for row in steps] == [0, 1, 2, 3] and all(row["reasoning"] is None for row in steps)
        assert all(row["text_before"].startswith("Craftax-Classic observation.") for row in steps)
        assert steps[1]["text_before"] == steps[0]["text_after"]
        assert len(list((folder / "frames").iterdir())) == 5, "N recorded actions give N + 1 frames"
        session = json.loads((folder / "session.json").read_text())
        assert SESSION_KEYS <= set(session) and session["env"] == CLASSIC and session["seed"] == index
        assert session["player"] == "agent" and session["steps"] == 4
        agent = session["agent"]
        assert agent["run"] == "runs/x/debug" and agent["algo"] == "online_rl/ppo"
        assert agent["checkpoint_update"] == 1, "one update of 128 env steps"
        [row] = [json.loads(line) for line in (debug_run / "metrics.jsonl").read_text().splitlines()]
        assert agent["training_return"] == row["episode/return"][0], "the return logged at that update"
        # played on past the recorded steps (no Classic episode ends in 6 steps), to its cap
        assert session["episode"]["length"] == 6 and session["episode"]["truncated"]
        assert session["episode"]["recorded_steps"] == 4
        stats = recording_stats(folder)  # tools.stats reads it as it reads a human recording
        assert stats["transitions"] == 4 and stats["episodes"] == {"complete": 0, "partial": 1}

    examples = load_few_shot(out, CLASSIC, 3)  # llm_play's reader, on the folder of sessions
    assert len(examples) == 3 and {e.player for e in examples} == {"agent"}
    prompt = system_prompt(CLASSIC, examples)
    assert "recorded agent play" in prompt and "human play" not in prompt

    with pytest.raises(UserError, match="already holds recordings"):
        record(RecordAgentConfig(run=str(debug_run), out=str(out)))


@pytest.mark.slow
def test_record_agent_without_frames(debug_run, tmp_path):
    from tools.record_agent import RecordAgentConfig, record

    summary = record(RecordAgentConfig(run=str(debug_run), out=str(tmp_path / "rec"), episodes=1, max_steps=3,
                                       max_episode_steps=3, frames=False))
    folder = tmp_path / "rec" / "episode-000"
    assert not (folder / "frames").exists() and len(_steps(folder)) == 3
    assert summary["episodes"][0]["truncated"] is False and summary["episodes"][0]["finished"] is False
    assert json.loads((tmp_path / "rec" / "agent_play.json").read_text())["player"] == "agent"


def test_human_sessions_stay_human_and_mixed_sets_say_both(tmp_path):
    text = "Craftax-Classic observation. Map: ...\nFacing: right (east); at (0,1): tree."
    for name, player in (("human", None), ("agent", "agent")):
        folder = tmp_path / name
        folder.mkdir()
        row = {"step": 0, "action": 5, "action_name": "DO", "reasoning": None, "text_before": f"{text} {name}",
               "text_after": text, "reward": 1.0, "done": False, "achievements": ["collect_wood"]}
        (folder / "steps.jsonl").write_text(json.dumps(row) + "\n")
        (folder / "session.json").write_text(json.dumps({"env": CLASSIC, **({"player": player} if player else {})}))
    assert "recorded human play" in system_prompt(CLASSIC, load_few_shot(tmp_path / "human", CLASSIC, 3))
    both = system_prompt(CLASSIC, load_few_shot(tmp_path, CLASSIC, 3))
    assert "human and agent" in both


@pytest.mark.parametrize("env, game", [(CLASSIC, "classic"), (FULL, "full")])
def test_shipped_few_shot_set_is_agent_play_that_llm_play_reads(env, game):
    folder = SHIPPED / game
    sessions = sorted(folder.glob("*/session.json"))
    assert len(sessions) >= 2, f"{folder} ships a few episodes"
    for path in sessions:
        session = json.loads(path.read_text())
        assert session["env"] == env and session["player"] == "agent"
        agent = session["agent"]
        assert agent["algo"] == "online_rl/ppo" and agent["run"] and isinstance(agent["checkpoint_update"], int)
        assert isinstance(session["episode"]["return"], float) and session["steps"] == len(_steps(path.parent))
        assert all(tuple(row) == STEP_KEYS for row in _steps(path.parent))
    examples = load_few_shot(folder, env, 3)
    assert len(examples) == 3 and {e.player for e in examples} == {"agent"}
    assert "recorded agent play" in system_prompt(env, examples)
    with pytest.raises(UserError, match="another game"):
        load_few_shot(folder, FULL if env == CLASSIC else CLASSIC, 3)


def test_shipped_few_shot_set_stays_small():
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size < 2_000_000, f"online_rl_llm/few_shot/ holds {size} bytes; record fewer or shorter episodes"
