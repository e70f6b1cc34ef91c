"""Try prompts on one saved game state: print the text and the full prompt, ask the model, show
its raw reply and the action the parser reads from it; repeat with edits or questions.

Where the state comes from (one of):

* ``--seed N [--actions "RIGHT RIGHT DO"]``: a fresh world of that seed, then the actions
  replayed (names or indices, spaces or commas); the same seed and actions give the same state
  (step keys are ``fold_in(key, t)``). The replayed steps feed ``--history``.
* ``--transcript RUN/transcript.jsonl --episode E --episode-step T``: the exact user message a
  model saw during ``llm_play`` (history included), under that run's ``system_prompt.txt``.
* ``--session RECORDING --step T``: a step of a recorded human session (``tools/play.py
  --record``, ``steps.jsonl``); its earlier steps feed ``--history``.

Each line typed (or piped) is one turn:

* empty line: ask with the current prompt;
* ``/append TEXT``: add TEXT to the user message for all later turns; ``/reset``: undo edits;
* ``/show``: print the full prompt as the model sees it (chat template applied);
* ``/temperature X``, ``/tokens N``: change sampling;  ``/quit`` (or end of input): stop;
* anything else: a one-off question, appended to the user message for this turn only.

``--once "QUESTION"`` asks once (``--once ""``: the unchanged prompt) and exits, for scripts and
tests.

    python -m online_rl_llm.query --model Qwen/Qwen2.5-0.5B-Instruct --seed 3 --actions "LEFT LEFT DO"
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from online_rl_llm.action_parsing import ActionParser
from online_rl_llm.prompts import (
    History,
    HistoryEntry,
    action_names,
    facing_of,
    load_few_shot,
    read_jsonl_rows,
    system_prompt,
    user_message,
)
from utils.errors import UserError, exit_on_user_error


@dataclasses.dataclass
class QueryConfig:
    """Ask an LLM about one game state interactively (or once with --once)."""

    model: str = ""
    """Local model folder or Hugging Face hub id (required)."""
    env: str = "Craftax-Classic-Symbolic-v1"
    """Env of --seed/--actions (a transcript or session brings its own text)."""
    seed: int = 0
    """World seed for a fresh state."""
    actions: str = ""
    """Actions to replay from the fresh world (names or indices, separated by spaces or commas)."""
    transcript: str | None = None
    """A transcript.jsonl of llm_play: take the state (and its exact prompt) from there."""
    episode: int | None = None
    """Episode id in --transcript (default: the first one in the file)."""
    episode_step: int = 0
    """Step of that episode in --transcript."""
    session: str | None = None
    """A recorded session folder (steps.jsonl) or its steps.jsonl: take the state from there."""
    step: int = 0
    """Step of --session."""
    history: int = 8
    """Past steps shown in the prompt (for --seed/--actions and --session)."""
    few_shot: str | None = None
    """Few-shot examples for the system prompt, as in llm_play."""
    few_shot_count: int = 3
    """How many few-shot examples."""
    allow_numbers: bool = True
    """Also accept action indices ('Action: 5') in replies."""
    once: str | None = None
    """Ask once with this question ('' = the unchanged prompt), print, and exit."""
    backend: str = "transformers"
    """'transformers' (CPU or GPU), 'vllm' or 'sglang' (GPU only)."""
    thinking: bool = False
    """Qwen3-style chat templates: let the model open a <think> block before answering (off: it
    answers directly, which is what the action parser and --max-new-tokens expect)."""
    device: str = "auto"
    """Transformers device: auto, cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """Compute dtype: auto, float32, bfloat16 or float16."""
    batch_size: int = 1
    """Prompts per generate call (one here)."""
    max_length: int = 8192
    """Longest prompt in tokens."""
    max_new_tokens: int = 128
    """Tokens the model may write per reply."""
    temperature: float = 0.0
    """Sampling temperature; 0 = greedy."""
    torch_threads: int = 0
    """CPU threads for torch (0: torch's default)."""


@dataclasses.dataclass
class LoadedState:
    """What a query starts from: the env, the observation text and the prompt parts."""

    env: str
    text: str
    user: str
    system: str
    source: str


# ----------------------------------------------------------------------------------------------
# Loading a state
# ----------------------------------------------------------------------------------------------


def parse_action_list(spec: str, names: tuple[str, ...]) -> list[int]:
    """'RIGHT, right 5 place_table' -> indices; unknown names are a UserError."""
    parser = ActionParser(names)
    out = []
    for token in spec.replace(",", " ").split():
        if token.isdigit() and int(token) < len(names):
            out.append(int(token))
            continue
        found = parser.parse(token)
        if found is None or found.rule not in ("upper", "mention"):
            raise UserError(f"--actions has {token!r}, which is not an action; use names like "
                            f"{', '.join(names[:6])} or indices 0..{len(names) - 1}")
        out.append(found.index)
    return out


def state_from_actions(env_name: str, seed: int, actions: list[int], history: History) -> str:
    """Replay ``actions`` from the seed's fresh world; returns the final text, fills ``history``."""
    import jax

    from utils import envs
    from utils.text_obs import render_text

    names = action_names(env_name)
    env = envs.make(env_name, 1, reset_ratio=1)
    reset_key, step_base = jax.random.split(jax.random.PRNGKey(seed))
    obs, state = jax.jit(env.reset)(reset_key)
    step = jax.jit(env.step)
    previous = np.zeros(len(env.achievement_names))
    for t, action in enumerate(actions):
        text = render_text(np.asarray(obs)[0], env_name)
        obs, state, reward, done, info = step(jax.random.fold_in(step_base, t), state,
                                              jax.numpy.asarray([action], dtype=jax.numpy.int32))
        if bool(np.asarray(done)[0]):
            raise UserError(f"the episode ended at action {t + 1} of {len(actions)}; replay fewer actions")
        achieved = np.asarray(info["achievements"])[0]
        unlocked = tuple(n for n, b, a in zip(env.achievement_names, previous, achieved) if a > b)
        previous = achieved
        history.add(HistoryEntry(facing_of(text), names[action], float(np.asarray(reward)[0]), unlocked))
    return render_text(np.asarray(obs)[0], env_name)


def _jsonl_rows(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl_rows(path)]


def state_from_transcript(path: Path, episode: int | None, episode_step: int) -> tuple[dict, str | None]:
    """(the transcript row, the run's system prompt or None) of one step."""
    if not path.is_file():
        raise UserError(f"transcript {path} does not exist; pass RUN/transcript.jsonl of llm_play")
    rows = _jsonl_rows(path)
    if not rows:
        raise UserError(f"transcript {path} is empty")
    if episode is None:
        episode = rows[0]["episode"]
    for row in rows:
        if row["episode"] == episode and row["episode_step"] == episode_step:
            system_file = path.parent / "system_prompt.txt"
            return row, system_file.read_text() if system_file.exists() else None
    raise UserError(f"transcript {path} has no step {episode_step} of episode {episode}")


def state_from_session(path: Path, step: int, history: History) -> str:
    """Text of one recorded step; the earlier steps of the session fill ``history``."""
    file = path / "steps.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no recorded session at {path}: pass a folder with steps.jsonl "
                        "(tools/play.py --record) or the steps.jsonl itself")
    rows = _jsonl_rows(file)
    for row in rows:
        if row.get("step") == step:
            return row["text_before"]
        history.add(HistoryEntry(facing_of(row["text_before"]), row["action_name"],
                                 float(row.get("reward") or 0.0), tuple(row.get("achievements") or ()),
                                 False))
        if row.get("done"):  # a session goes on across episodes; history does not
            history.clear()
    raise UserError(f"session {file} has no step {step} (it has {len(rows)} steps)")


def env_of_text(text: str) -> str:
    from utils.text_obs import CLASSIC_ENV, FULL_ENV

    return CLASSIC_ENV if text.startswith("Craftax-Classic observation.") else FULL_ENV


def load_state(cfg: QueryConfig) -> LoadedState:
    """The state ``cfg`` names, with the user message and system prompt llm_play would use."""
    if cfg.transcript and cfg.session:
        raise UserError("pass either --transcript or --session, not both")
    history = History(cfg.history)
    if cfg.transcript:
        row, system = state_from_transcript(Path(cfg.transcript), cfg.episode, cfg.episode_step)
        env = env_of_text(row["text"])
        source = f"{cfg.transcript} episode {row['episode']} step {row['episode_step']}"
        return LoadedState(env, row["text"], row["prompt"], system or _system(cfg, env), source)
    if cfg.session:
        text = state_from_session(Path(cfg.session), cfg.step, history)
        env, source = env_of_text(text), f"{cfg.session} step {cfg.step}"
        step = cfg.step
    else:
        env = cfg.env
        actions = parse_action_list(cfg.actions, action_names(env))
        text = state_from_actions(env, cfg.seed, actions, history)
        source, step = f"{env} seed {cfg.seed} after {len(actions)} actions", len(actions)
    return LoadedState(env, text, user_message(text, history.lines(), step), _system(cfg, env), source)


def _system(cfg: QueryConfig, env: str) -> str:
    examples = load_few_shot(cfg.few_shot, env, cfg.few_shot_count) if cfg.few_shot else []
    return system_prompt(env, examples)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


class Session:
    """One state, one model: turns of (prompt edit or question) -> (reply, parsed action)."""

    def __init__(self, cfg: QueryConfig, state: LoadedState, backend, out: TextIO = sys.stdout):
        self.cfg, self.state, self.backend, self.out = cfg, state, backend, out
        self.user = state.user
        self.temperature = cfg.temperature
        self.max_new_tokens = cfg.max_new_tokens
        self.parser = ActionParser(action_names(state.env), allow_numbers=cfg.allow_numbers)

    def say(self, *lines: str) -> None:
        print(*lines, sep="\n", file=self.out, flush=True)

    def full_prompt(self, user: str | None = None) -> str:
        return self.backend.prompts.prompt(self.user if user is None else user)

    def ask(self, question: str = "") -> dict[str, Any]:
        user = f"{self.user}\n\n{question.strip()}" if question.strip() else self.user
        reply = self.backend.generate([user], max_new_tokens=self.max_new_tokens,
                                      temperature=self.temperature)[0]
        found = self.parser.parse(reply)
        self.say("--- model output ---", reply, "--- parsed action ---",
                 f"{found.name} (index {found.index}, rule {found.rule})" if found
                 else "none found (llm_play would ask again, then play NOOP)")
        return {"question": question, "output": reply,
                "action": found.index if found else None, "action_name": found.name if found else None}

    def handle(self, line: str) -> dict[str, Any] | None:
        """One input line; returns the turn's result when the model was asked."""
        command, _, argument = line.strip().partition(" ")
        if command == "/show":
            self.say(self.full_prompt())
        elif command == "/append":
            self.user = f"{self.user}\n\n{argument.strip()}"
            self.say("(appended; the user message now ends with it)")
        elif command == "/reset":
            self.user = self.state.user
            self.say("(prompt restored)")
        elif command in ("/temperature", "/tokens"):
            try:
                if command == "/temperature":
                    self.temperature = max(0.0, float(argument))
                else:
                    self.max_new_tokens = max(1, int(argument))
            except ValueError:
                self.say(f"(usage: {command} NUMBER)")
        elif command.startswith("/"):
            self.say("(commands: /show /append TEXT /reset /temperature X /tokens N /quit)")
        else:
            return self.ask(line)
        return None

    def loop(self, lines: TextIO) -> list[dict[str, Any]]:
        results = []
        interactive = lines.isatty()
        while True:
            if interactive:
                print(">>> ", end="", file=self.out, flush=True)
            line = lines.readline()
            if not line or line.strip() == "/quit":
                return results
            result = self.handle(line.rstrip("\n"))
            if result is not None:
                results.append(result)


def run(cfg: QueryConfig, backend=None, lines: TextIO | None = None,
        out: TextIO = sys.stdout) -> list[dict[str, Any]]:
    """Load the state, show it, then answer ``--once`` or every line of ``lines`` (stdin)."""
    from online_rl_llm.llm_play import make_player_backend

    if not cfg.model and backend is None:
        raise UserError("no model given: pass --model with a local model folder or a hub id")
    state = load_state(cfg)
    if backend is None:
        backend = make_player_backend(cfg, state.system)
    session = Session(cfg, state, backend, out)
    session.say(f"=== state: {state.source} ===", "=== canonical text ===", state.text,
                "=== full prompt ===", session.full_prompt(), "=== end of prompt ===")
    if cfg.once is not None:
        return [session.ask(cfg.once)]
    return session.loop(lines if lines is not None else sys.stdin)


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    import tyro

    from utils.jax_setup import enable_compilation_cache

    enable_compilation_cache()
    cfg = tyro.cli(QueryConfig, args=argv, description=QueryConfig.__doc__)
    return run(cfg)


if __name__ == "__main__":
    main()
