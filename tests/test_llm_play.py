"""LLM play: action parsing, retry/fallback counting, prompts, the play loop and query.py.

The play loop runs on Craftax-Classic with a scripted backend (replies chosen by the test, so the
parsed actions and counters are known) and once end to end with the tiny random model (tests/
tiny_llm.py) to check the real generate path, the files and the GIF.
"""

from __future__ import annotations

import dataclasses
import io
import json
import types
from pathlib import Path

import pytest

from online_rl_llm.action_parsing import ActionParser, ParseCounters, count, decision_counters, resolve_actions
from online_rl_llm.prompts import (
    History,
    HistoryEntry,
    action_names,
    load_few_shot,
    retry_message,
    system_prompt,
    user_message,
)
from utils.errors import UserError
from utils.io import read_jsonl

CLASSIC = "Craftax-Classic-Symbolic-v1"
FULL = "Craftax-Symbolic-v1"
CLASSIC_NAMES = action_names(CLASSIC)


@pytest.fixture(autouse=True)
def one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# Action parsing
# ----------------------------------------------------------------------------------------------

PARSE_CASES = [
    # (reply, expected action name or None)
    ("The tree is one tile to my left, so I should walk there.\nAction: MOVE_LEFT", "LEFT"),
    ("I am facing the tree.\n\nAction: DO", "DO"),
    ("LEFT would reach the water, but RIGHT leads to the tree. I choose RIGHT", "RIGHT"),
    ("Action: LEFT\nOn second thought, the cow is above me.\nAction: UP", "UP"),
    ("i think we should place table now", "PLACE_TABLE"),
    ("I have 2 wood. Action: PLACE TABLE", "PLACE_TABLE"),
    ("Action: place_table", "PLACE_TABLE"),
    ("**Action:** **MAKE_WOOD_PICKAXE**", "MAKE_WOOD_PICKAXE"),
    ('Action: "do"', "DO"),
    ("Action: `Make Wood Sword`", "MAKE_WOOD_SWORD"),
    ("action 5", "DO"),
    ("Action: 5.", "DO"),
    ("Action: 2.5 tiles away is the tree", None),  # a decimal is no action index
    ("Action: 7 (place stone)", "PLACE_STONE"),
    ("I will just look around for a while.", None),
    ("", None),
    ("Action: 99", None),  # out of range: not an action
    ("The zombie is down there and I'm done here. NOOP", "NOOP"),  # DO is not inside down/done
    ("Going DOWN is blocked, so do nothing: Action: no-op", "NOOP"),
    ("Going down is blocked. DOWN? No: DO", "DO"),
    ("Action: LEFT because the tree is up", "LEFT"),  # the word right after the marker counts
    ("I'll do it. UP", "UP"),  # an upper-case name beats a later-looking lower-case English word
    ("The best action is SLEEP since energy is 1.", "SLEEP"),
    ("Action: Move towards the tree on the left", "LEFT"),
    ("NOOPDO", None),  # glued names are no whole word
]


@pytest.mark.parametrize("reply,expected", PARSE_CASES)
def test_parser_reads_real_looking_replies(reply, expected):
    found = ActionParser(CLASSIC_NAMES).parse(reply)
    assert (found.name if found else None) == expected, reply
    if found:
        assert CLASSIC_NAMES[found.index] == found.name


def test_parser_numbers_can_be_turned_off_and_rules_are_reported():
    parser = ActionParser(CLASSIC_NAMES, allow_numbers=False)
    assert parser.parse("Action: 5") is None
    assert parser("Action: 5 (DO)") == CLASSIC_NAMES.index("DO")  # the name still counts
    rules = ActionParser(CLASSIC_NAMES)
    assert rules.parse("Action: 5").rule == "number"
    assert rules.parse("Action: DO").rule == "marker"
    assert rules.parse("go LEFT now").rule == "upper"
    assert rules.parse("go left now").rule == "mention"


def test_parser_on_full_craftax_prefers_the_longest_name():
    names = action_names(FULL)
    parser = ActionParser(names)
    assert len(names) == 43 and len(CLASSIC_NAMES) == 17
    assert parser("I have XP: LEVEL_UP_STRENGTH") == names.index("LEVEL_UP_STRENGTH")
    assert parser("level up dexterity please") == names.index("LEVEL_UP_DEXTERITY")
    assert parser("Action: drink potion red") == names.index("DRINK_POTION_RED")
    assert parser("ascend the ladder, then DESCEND") == names.index("DESCEND")


# ----------------------------------------------------------------------------------------------
# Retry and fallback
# ----------------------------------------------------------------------------------------------


class ScriptedReplies:
    """generate() that answers prompts from a per-prompt script, recording every call."""

    def __init__(self, script):
        self.script = script  # prompt prefix -> list of replies, used in order
        self.calls = []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        out = []
        for prompt in prompts:
            key = next(k for k in self.script if prompt.startswith(k))
            out.append(self.script[key].pop(0))
        return out


def test_retry_only_asks_failed_prompts_again_and_counts_outcomes():
    generate = ScriptedReplies({"a": ["Action: DO"], "b": ["hmm", "Action: UP"],
                                "c": ["no idea", "still none"]})
    parser = ActionParser(CLASSIC_NAMES)
    decisions = resolve_actions(["a", "b", "c"], generate, parser,
                                lambda p, r: retry_message(p, r, CLASSIC_NAMES), max_retries=1)
    assert [d.action_name for d in decisions] == ["DO", "UP", "NOOP"]
    assert [d.outcome for d in decisions] == ["parsed", "parsed_on_retry", "fell_back"]
    assert len(generate.calls) == 2 and len(generate.calls[1]) == 2  # one batched retry of b and c
    assert "Your previous answer was:\nhmm" in generate.calls[1][0]
    assert "NOOP, LEFT, RIGHT" in generate.calls[1][0]
    counters = count(decisions)
    assert counters == ParseCounters(decisions=3, parsed=1, retried=2, parsed_on_retry=1, fell_back=1)
    assert counters.as_dict()["parse_rate"] == pytest.approx(2 / 3)
    assert counters.as_dict()["fallback_rate"] == pytest.approx(1 / 3)


def test_zero_retries_falls_back_at_once_and_more_retries_keep_asking():
    parser = ActionParser(CLASSIC_NAMES)
    generate = ScriptedReplies({"x": ["...", "...", "LEFT"]})
    [decision] = resolve_actions(["x"], generate, parser, lambda p, r: p, max_retries=0)
    assert decision.outcome == "fell_back" and len(generate.calls) == 1
    [decision] = resolve_actions(["x"], generate, parser, lambda p, r: p, max_retries=3)
    assert decision.outcome == "parsed_on_retry" and decision.outputs == ["...", "LEFT"]
    assert decision_counters(decision).retried == 1


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------


def _session(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _classic_text(facing: str = "right (east); at (0,1): tree.") -> str:
    return (f"Craftax-Classic observation. Map: 7 rows x 9 cols centred on you.\nFacing: {facing}\n"
            "Inventory: empty.\nHealth 9, food 9, drink 9, energy 9.")


def _recorded_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append({"step": i, "action": 5, "action_name": "DO",
                     "reasoning": "The tree is right in front of me." if i == 3 else None,
                     "text_before": _classic_text(f"right (east); at (0,1): tree {i}."),
                     "text_after": _classic_text(), "reward": 1.0 if i == 1 else 0.0, "done": False,
                     "achievements": ["collect_wood"] if i == 1 else []})
    return rows


def test_system_prompt_has_rules_every_action_and_few_shot(tmp_path):
    for env, n in ((CLASSIC, 17), (FULL, 43)):
        text = system_prompt(env)
        listed = [line for line in text.splitlines() if line.startswith("- ") and ":" in line
                  and line[2:].split(":")[0] in action_names(env)]
        assert len(listed) == n, env
        assert "Action: NAME" in text and "achievement" in text
    assert "9 floors" in system_prompt(FULL) and "9 floors" not in system_prompt(CLASSIC)

    session = _session(tmp_path / "session", _recorded_rows(5))
    examples = load_few_shot(session, CLASSIC, 2)
    # reasoning first (step 3), then a rewarded step (step 1), shown in the order played
    assert [e.text for e in examples] == [_recorded_rows(5)[i]["text_before"] for i in (1, 3)]
    prompt = system_prompt(CLASSIC, examples)
    assert "Example 2\nObservation:" in prompt and "Reasoning: The tree is right in front of me." in prompt

    plain = tmp_path / "examples.jsonl"
    plain.write_text(json.dumps({"text": _classic_text(), "action_name": "place_table",
                                 "reasoning": None}) + "\n")
    [example] = load_few_shot(plain, CLASSIC, 3)
    assert example.action_name == "PLACE_TABLE" and example.reasoning is None
    sessions = load_few_shot(tmp_path, CLASSIC, 10)  # a folder of session folders
    assert len(sessions) == 5


def test_few_shot_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no few-shot examples"):
        load_few_shot(tmp_path / "missing", CLASSIC, 3)
    bad = _session(tmp_path / "bad", [{"text_before": _classic_text(), "action_name": "JUMP"}])
    with pytest.raises(UserError, match="not an action"):
        load_few_shot(bad, CLASSIC, 3)
    full_text = [{"text": "Craftax observation. Map: ...", "action_name": "DO"}]
    other = _session(tmp_path / "other", full_text)
    with pytest.raises(UserError, match="another game"):
        load_few_shot(other, CLASSIC, 3)
    with pytest.raises(UserError, match="text observation"):
        action_names("Craftax-Classic-Pixels-v1")


def test_history_keeps_the_last_k_steps_in_the_user_message():
    history = History(2)
    for i, name in enumerate(["LEFT", "DO", "UP"]):
        history.add(HistoryEntry(f"left (west); at (0,-1): tree {i}.", name, float(i == 1),
                                 ("collect_wood",) if i == 1 else (), fell_back=name == "UP"))
    lines = history.lines()
    assert len(lines) == 2
    assert lines[0].startswith("- 2 steps ago: facing left (west); at (0,-1): tree 1.")
    assert "You did DO; reward +1.00; unlocked collect_wood" in lines[0]
    assert "1 step ago" in lines[1] and "named no action, so NOOP" in lines[1]
    message = user_message("Craftax-Classic observation. ...", lines, episode_step=3)
    assert message.index("Recent steps") < message.index("Current observation (step 3")
    assert message.rstrip().endswith('"Action: NAME" with exactly one action name from the list.')
    assert "Recent steps" not in user_message("text", History(0).lines())
    history.clear()
    assert history.lines() == []


# ----------------------------------------------------------------------------------------------
# The play loop
# ----------------------------------------------------------------------------------------------


class ScriptedBackend:
    """Backend stand-in: the i-th prompt of a call gets ``replies[i]`` (cycled); retry prompts get
    ``retry_reply`` when given. Records every call's prompts."""

    def __init__(self, replies, retry_reply=None):
        self.replies = list(replies)
        self.retry_reply = retry_reply
        self.prompts_seen = []
        self.prompts = types.SimpleNamespace(prompt=lambda user: f"<system>\n{user}")

    def generate(self, prompts, max_new_tokens=64, temperature=0.0):
        self.prompts_seen.append(list(prompts))
        return [self.retry_reply if self.retry_reply is not None and "previous answer" in prompt
                else self.replies[i % len(self.replies)] for i, prompt in enumerate(prompts)]


def _play_config(tmp_path, name, **changes):
    from online_rl_llm.llm_play import LLMPlayConfig
    from utils.config import apply_presets, load_presets

    cfg = apply_presets(LLMPlayConfig(), ["debug"], load_presets("online_rl_llm", "llm_play"), "test")
    return dataclasses.replace(cfg, model="scripted", run_dir=str(tmp_path / name), progress=False,
                               torch_threads=1, **changes)


def test_play_loop_counts_episodes_steps_and_parse_outcomes(tmp_path):
    from online_rl_llm.llm_play import play

    cfg = _play_config(tmp_path, "scripted", num_episodes=3, max_steps=4, history=2)
    # env 0 answers; env 1 names no action, not even when asked again
    backend = ScriptedBackend(["Thinking... Action: DO", "no idea"], retry_reply="still none")
    summary = play(cfg, backend=backend)
    run = Path(cfg.run_dir)
    episodes = read_jsonl(run / "episodes.jsonl")
    assert summary["episodes"] == 3 == len(episodes)
    assert sorted(row["episode"] for row in episodes) == [0, 1, 2]
    assert all(row["length"] == 4 and row["truncated"] for row in episodes)
    transcript = read_jsonl(run / "transcript.jsonl")
    assert len(transcript) == 12 == summary["parse"]["decisions"]
    for row in transcript:
        first = row["outputs"][0]
        assert row["action_name"] == ("DO" if first.endswith("DO") else "NOOP")
        assert row["outcome"] == ("parsed" if first.endswith("DO") else "fell_back")
        assert row["prompt"].startswith("Recent steps") == (row["episode_step"] > 0)
        assert row["text"] in row["prompt"]
    # episodes 0 and 2 ran on env 0, episode 1 on env 1; each reply that named no action got
    # one retry, batched in its own generate call
    assert {row["episode"]: row["parse"]["fell_back"] for row in episodes} == {0: 0, 1: 4, 2: 0}
    assert summary["parse"] == {"decisions": 12, "parsed": 8, "retried": 4, "parsed_on_retry": 0,
                                "fell_back": 4, "parse_rate": 8 / 12, "fallback_rate": 4 / 12}
    assert summary["timing"]["generate_calls"] == len(backend.prompts_seen) == 4 * 2 + 4
    assert (run / "system_prompt.txt").read_text().startswith("You are playing Craftax")
    metrics = read_jsonl(run / "metrics.jsonl")
    assert len(metrics) == 3 and {"episode/return", "llm/parse_rate",
                                  "achievements/collect_wood"} <= set(metrics[0])
    # the third episode reuses a finished env; the other env idles, so fewer prompts at the end
    assert [len(p) for p in backend.prompts_seen if "previous answer" not in p[0]][-1] == 1


def test_rerunning_a_folder_keeps_finished_episodes_and_plays_the_rest(tmp_path):
    from online_rl_llm.llm_play import play

    cfg = _play_config(tmp_path, "resume", num_episodes=3, max_steps=3)
    play(cfg, backend=ScriptedBackend(["Action: LEFT"]))
    run = Path(cfg.run_dir)
    episodes = read_jsonl(run / "episodes.jsonl")
    dropped = episodes[-1]["episode"]  # pretend the run died before this episode finished
    (run / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in episodes[:-1]))
    backend = ScriptedBackend(["Action: RIGHT"])
    summary = play(cfg, backend=backend)
    episodes = read_jsonl(run / "episodes.jsonl")
    assert summary["episodes"] == 3 and len(backend.prompts_seen) == 3  # one episode, 3 steps
    ids = [row["episode"] for row in episodes]
    assert dropped not in ids and len(set(ids)) == 3
    transcript = read_jsonl(run / "transcript.jsonl")
    assert {row["episode"] for row in transcript} == set(ids)
    assert [r["action_name"] for r in transcript if r["episode"] == ids[-1]] == ["RIGHT"] * 3
    assert len(read_jsonl(run / "metrics.jsonl")) == 3
    assert play(cfg, backend=backend)["episodes"] == 3 and len(backend.prompts_seen) == 3
    with pytest.raises(UserError, match="different config"):
        play(_play_config(tmp_path, "resume", num_episodes=3, max_steps=5), backend=backend)


def test_llm_play_with_the_tiny_model_writes_every_output(tiny_llm_path, tmp_path):
    from online_rl_llm.llm_play import main

    few_shot = _session(tmp_path / "session", _recorded_rows(3))
    run = tmp_path / "tiny"
    summary = main(["--preset", "debug", "--model", tiny_llm_path, "--run-dir", str(run),
                    "--max-steps", "3", "--num-episodes", "2", "--render", "--few-shot",
                    str(few_shot), "--no-progress", "--torch-threads", "1", "--temperature", "1.0"])
    assert summary["episodes"] == 2 and summary["length_mean"] == 3
    parse = summary["parse"]
    assert parse["decisions"] == 6
    assert parse["parsed"] + parse["parsed_on_retry"] + parse["fell_back"] == 6
    transcript = read_jsonl(run / "transcript.jsonl")
    assert len(transcript) == 6 and all(1 <= len(r["outputs"]) <= 2 for r in transcript)
    assert "Example 1" in (run / "system_prompt.txt").read_text()
    from PIL import Image

    gif = Image.open(run / "episode.gif")
    assert gif.n_frames == 3 and gif.size == (144, 144)
    assert json.loads((run / "summary.json").read_text())["gif"] == str(run / "episode.gif")


def test_llm_play_user_errors(tmp_path, capsys):
    from online_rl_llm.llm_play import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--env", "Craftax-Pixels-v1", "--model", "x", "--run-dir", str(tmp_path / "a")])
    assert exit_info.value.code == 2 and "text observation" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--run-dir", str(tmp_path / "b")])
    assert "no model given" in capsys.readouterr().err


def test_player_prompt_uses_the_chat_template_or_plain_text(tiny_llm_path, tmp_path):
    import shutil

    from online_rl_llm.llm_play import LLMPlayConfig, make_player_backend

    system = system_prompt(CLASSIC)
    cfg = LLMPlayConfig(model=tiny_llm_path, device="cpu")
    chat = make_player_backend(cfg, system).prompts.prompt("USER TURN")
    assert chat.startswith("<|im_start|>system\nYou are playing Craftax")
    assert chat.endswith("<|im_start|>user\nUSER TURN<|im_end|>\n<|im_start|>assistant\n")
    plain_model = tmp_path / "no_template"
    shutil.copytree(tiny_llm_path, plain_model)
    (plain_model / "chat_template.jinja").unlink()
    cfg = dataclasses.replace(cfg, model=str(plain_model))
    plain = make_player_backend(cfg, system).prompts.prompt("USER TURN")
    assert plain == system + "\n\nUSER TURN"


# ----------------------------------------------------------------------------------------------
# vLLM for generation only (CPU check of the GPU path with a stand-in vllm module)
# ----------------------------------------------------------------------------------------------


def test_vllm_generation_backend_starts_only_the_generation_engine(tiny_llm_path, monkeypatch):
    import utils.llm as llm
    import utils.llm.vllm_engine as vllm_engine

    engines = []

    class FakeLLM:
        def __init__(self, **options):
            engines.append(options)

        def generate(self, prompts, sampling, use_tqdm=False):
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text="Action: DO")])
                    for _ in prompts]

        def embed(self, prompts, use_tqdm=False):  # the warm-up's request: not unit-norm rows
            return [types.SimpleNamespace(outputs=types.SimpleNamespace(embedding=[3.0] * 32))
                    for _ in prompts]

    fake = types.SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kw: kw)
    monkeypatch.setattr(vllm_engine, "require_vllm", lambda: fake)
    spec = llm.LLMSpec(model=tiny_llm_path, backend="vllm", system_prompt="rules")
    backend = llm.make_backend(spec, hidden_states=False)
    assert engines == []
    assert backend.generate(["a", "b"], max_new_tokens=5) == ["Action: DO"] * 2
    assert len(engines) == 1 and "runner" not in engines[0]
    monkeypatch.setattr(vllm_engine.VLLMBackend, "_hidden_state_options", lambda self: {"runner": "pooling"})
    llm.make_backend(spec)  # the default still starts the hidden-state engine up front
    assert engines[-1] == {"runner": "pooling"}


def test_thinking_is_off_for_qwen3_style_templates_unless_asked(tmp_path, monkeypatch):
    """Qwen3 templates open a <think> block by default; LLM play answers directly unless
    --thinking (which also changes the prompt's hash)."""
    import utils.llm as llm
    from online_rl_llm.llm_play import LLMPlayConfig, make_player_backend
    from utils.testing.tiny_llm import build_tiny_llm

    model = build_tiny_llm(tmp_path / "qwen3", "qwen3-4b", weights=False)
    tokenizer = llm.load_tokenizer(model)
    spec = llm.LLMSpec(model=model, system_prompt="rules")
    off = llm.PromptBuilder(spec, tokenizer).prompt("USER")
    on = llm.PromptBuilder(spec.replace(thinking=True), tokenizer).prompt("USER")
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n") and "<think>" not in on
    assert spec.template_hash() != spec.replace(thinking=True).template_hash()
    assert llm.LLMSpec.from_manifest(spec.replace(thinking=True).to_manifest()).thinking is True

    made = []
    monkeypatch.setattr(llm, "make_backend", lambda spec, hidden_states=True: made.append(spec))
    cfg = LLMPlayConfig(model=model, device="cpu")
    make_player_backend(cfg, "rules")
    make_player_backend(dataclasses.replace(cfg, thinking=True), "rules")
    assert [s.thinking for s in made] == [False, True]


# ----------------------------------------------------------------------------------------------
# query.py
# ----------------------------------------------------------------------------------------------


def test_query_once_with_the_tiny_model(tiny_llm_path):
    from online_rl_llm.query import QueryConfig, run

    out = io.StringIO()
    cfg = QueryConfig(model=tiny_llm_path, seed=3, actions="LEFT, left 5", history=2,
                      max_new_tokens=4, device="cpu", once="Is there a tree?", torch_threads=1)
    [result] = run(cfg, out=out)
    shown = out.getvalue()
    assert "=== canonical text ===\nCraftax-Classic observation." in shown
    assert "<|im_start|>system\nYou are playing Craftax" in shown  # the chat template is applied
    assert "- 2 steps ago: facing left (west)" in shown and "You did DO" in shown
    assert "--- model output ---" in shown and "--- parsed action ---" in shown
    assert isinstance(result["output"], str) and result["question"] == "Is there a tree?"


def test_query_reads_piped_lines_and_transcript_states(tmp_path):
    from online_rl_llm.llm_play import play
    from online_rl_llm.query import QueryConfig, run

    cfg = _play_config(tmp_path, "for_query", num_episodes=2, max_steps=2, transcript=True)
    play(cfg, backend=ScriptedBackend(["Action: UP"]))
    transcript = Path(cfg.run_dir) / "transcript.jsonl"
    row = [r for r in read_jsonl(transcript) if r["episode_step"] == 1][0]

    backend = ScriptedBackend(["I would go **place table**", "nothing useful"])
    out = io.StringIO()
    lines = io.StringIO("\n/append Be brief.\nWhere is the tree?\n/show\n/tokens x\n/quit\nignored\n")
    results = run(QueryConfig(model="scripted", transcript=str(transcript), episode=row["episode"],
                              episode_step=1), backend=backend, lines=lines, out=out)
    assert [r["action_name"] for r in results] == ["PLACE_TABLE", "PLACE_TABLE"]
    asked = [p[0] for p in backend.prompts_seen]
    assert asked[0] == row["prompt"]  # exactly what the model saw during play
    assert asked[1] == row["prompt"] + "\n\nBe brief.\n\nWhere is the tree?"
    assert "usage: /tokens NUMBER" in out.getvalue()
    with pytest.raises(UserError, match="no step 7"):
        run(QueryConfig(model="scripted", transcript=str(transcript), episode_step=7), backend=backend)
    with pytest.raises(UserError, match="not an action"):
        run(QueryConfig(model="scripted", actions="LEFT JUMP"), backend=backend)


def test_query_from_a_recorded_session(tmp_path):
    from online_rl_llm.query import QueryConfig, run

    session = _session(tmp_path / "rec", _recorded_rows(4))
    backend = ScriptedBackend(["Action: 6"])
    out = io.StringIO()
    [result] = run(QueryConfig(model="scripted", session=str(session), step=2, history=5, once=""),
                   backend=backend, out=out)
    assert result["action_name"] == "SLEEP"
    prompt = backend.prompts_seen[0][0]
    assert prompt.count("You did DO") == 2 and "unlocked collect_wood" in prompt
    assert "tree 2." in prompt.split("Current observation")[1]
