"""An LLM plays Craftax (Classic or full) from the canonical text observation.

Each step, every env that is playing an episode renders its observation to the canonical text
(``utils.text_obs``), gets a user message (recent history + the text; ``online_rl_llm.prompts``)
under a system prompt with the rules, the action list and optional few-shot examples, and the
model answers all envs in one batched ``generate`` call (transformers on CPU/GPU or vLLM on a
GPU; ``utils.llm``). Replies become actions through ``online_rl_llm.action_parsing``: replies
naming no action are asked again (``--retries``, batched) and then fall back to NOOP, counted per
episode. All envs step together; an env whose episode ends starts a new one (the factory's
optimistic reset) while fewer than ``--num-episodes`` have started, then idles. Every started
episode is played to its end (or ``--max-steps``), so short episodes are not over-represented.

    python -m online_rl_llm.llm_play --model Qwen/Qwen2.5-7B-Instruct --backend vllm \\
        --env Craftax-Classic-Symbolic-v1 --num-envs 16 --num-episodes 16 --history 8
    python -m online_rl_llm.llm_play --preset debug --model runs/tiny_llm --render

Run folder ``runs/online_rl_llm/llm_play/<env>/<run-name>/``: ``config.yaml``,
``system_prompt.txt`` (stored once), ``episodes.jsonl`` (one finished episode a line: return,
length, achievements, parse counters), ``metrics.jsonl`` (the same as metrics, ``step`` = LLM
decisions so far), ``transcript.jsonl`` (per step and env: the user message, raw replies, parsed
action, how it was reached, reward), ``summary.json`` and with ``--render`` ``episode.gif`` (env
0's first episode). Re-running the same folder keeps its finished episodes and plays the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from online_rl_llm.action_parsing import ActionParser, Decision, ParseCounters, decision_counters, resolve_actions
from online_rl_llm.prompts import (
    History,
    HistoryEntry,
    action_names,
    facing_of,
    load_few_shot,
    retry_message,
    system_prompt,
    user_message,
)
from utils.errors import UserError, exit_on_user_error
from utils.io import atomic_write_json, atomic_write_text, read_jsonl
from utils.media import first_env_renderer, write_gif

AREA, NAME = "online_rl_llm", "llm_play"


@dataclasses.dataclass
class LLMPlayConfig:
    """An LLM plays Craftax from the text observation; writes episodes, a transcript and a summary."""

    env: str = "Craftax-Classic-Symbolic-v1"
    """Craftax-Classic-Symbolic-v1 or Craftax-Symbolic-v1 (text observations need symbolic envs)."""
    preset: tuple[str, ...] = ()
    """Presets from configs/online_rl_llm/llm_play.yaml, applied left to right before other flags."""
    run_dir: str | None = None
    """Run folder; default runs/online_rl_llm/llm_play/<env>/<run-name>. Re-running it resumes."""
    run_name: str | None = None
    """Name of the run folder; default '<model folder name>-<presets>-s<seed>'."""
    seed: int = 0
    """Seed of the worlds (and of sampling when --temperature > 0)."""
    model: str = ""
    """Local model folder or Hugging Face hub id (required)."""
    backend: str = "transformers"
    """'transformers' (CPU or GPU), 'vllm' or 'sglang' (GPU only)."""
    thinking: bool = False
    """Qwen3-style chat templates: let the model open a <think> block before answering (off: it
    answers directly, which is what the action parser and --max-new-tokens expect)."""
    device: str = "auto"
    """Transformers device: auto, cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """Compute dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16."""
    batch_size: int = 16
    """Prompts per transformers generate call (vLLM schedules its own batches)."""
    max_length: int = 8192
    """Longest prompt in tokens; longer is an error (shorten --history / --few-shot-count)."""
    num_envs: int = 4
    """Envs played together; each step asks the model once for every playing env."""
    num_episodes: int = 4
    """Episodes to finish in total."""
    max_steps: int = 10_000
    """Cap on one episode's length; a capped episode is recorded with truncated=true."""
    max_new_tokens: int = 128
    """Tokens the model may write per reply (reasoning plus the Action line)."""
    temperature: float = 0.0
    """Sampling temperature; 0 = greedy."""
    history: int = 8
    """Past steps of the episode shown in each prompt (facing line, action, reward); 0 = none."""
    few_shot: str | None = None
    """Recorded session folder (steps.jsonl, tools/play.py --record), a folder of sessions, or a JSONL of
    {text, action_name, reasoning}; shipped: online_rl_llm/few_shot/classic or .../full (PPO agent play)."""
    few_shot_count: int = 3
    """Few-shot examples put into the system prompt (see online_rl_llm/prompts.py for the choice)."""
    retries: int = 1
    """Times to ask again when a reply names no action, before falling back to NOOP."""
    allow_numbers: bool = True
    """Also accept action indices ('Action: 5') in replies."""
    transcript: bool = True
    """Write transcript.jsonl (user message, replies, action, reward per step and env)."""
    render: bool = False
    """Save episode.gif: env 0's first episode of this invocation."""
    render_fps: int = 8
    """Frames per second of the GIF."""
    render_max_frames: int = 500
    """Stop adding GIF frames after this many."""
    reset_ratio: int = 16
    """Optimistic resets: generate num_envs / reset_ratio fresh worlds per step (utils.envs)."""
    torch_threads: int = 0
    """CPU threads for torch (0: torch's default)."""
    progress: bool = True
    """Show a progress bar over finished episodes."""

    def validate(self) -> "LLMPlayConfig":
        if not self.model:
            raise UserError("no model given: pass --model with a local model folder or a hub id")
        for name in ("num_envs", "num_episodes", "max_steps", "max_new_tokens", "render_fps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("history", "retries", "few_shot_count", "torch_threads"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must not be negative")
        if self.temperature < 0:
            raise UserError(f"--temperature must not be negative, got {self.temperature}")
        action_names(self.env)  # raises a UserError for envs without a text observation
        return self


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def make_player_backend(cfg, system: str):
    """The generation backend with ``system`` as its system prompt (chat template when present)."""
    from utils.llm import LLMSpec, make_backend

    if getattr(cfg, "torch_threads", 0):
        import torch

        torch.set_num_threads(cfg.torch_threads)
    spec = LLMSpec(model=cfg.model, system_prompt=system, backend=cfg.backend,
                   batch_size=cfg.batch_size, max_length=cfg.max_length, dtype=cfg.dtype,
                   thinking=getattr(cfg, "thinking", False),
                   device=cfg.device)
    return make_backend(spec, hidden_states=False)


def seed_sampling(seed: int) -> None:
    """Sampled replies (temperature > 0) repeat with the seed (transformers samples with torch)."""
    import torch

    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Bookkeeping of the episodes being played
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Slot:
    """The episode one env is playing."""

    episode: int
    history: History
    counters: ParseCounters = dataclasses.field(default_factory=ParseCounters)
    length: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)


class RunFiles:
    """episodes.jsonl, metrics.jsonl and transcript.jsonl of a run folder, resumable."""

    def __init__(self, run_dir: Path, cfg: LLMPlayConfig, resumed: bool, achievement_names):
        from utils.logger import MetricsLogger

        self.run_dir = run_dir
        self.episodes_path = run_dir / "episodes.jsonl"
        self.transcript_path = run_dir / "transcript.jsonl"
        self.achievement_names = tuple(achievement_names)
        if not resumed:
            for path in (self.episodes_path, self.transcript_path):
                path.unlink(missing_ok=True)
        self.episodes = read_jsonl(self.episodes_path) if self.episodes_path.exists() else []
        self.steps = max((row["steps_total"] for row in self.episodes), default=0)
        finished = {row["episode"] for row in self.episodes}
        # ids never repeat, not even those of episodes an interrupted run left unfinished
        self.next_episode = self._next_episode_id(finished)
        if self.transcript_path.exists():  # drop steps of episodes an interrupted run left unfinished
            kept = [row for row in read_jsonl(self.transcript_path) if row["episode"] in finished]
            atomic_write_text(self.transcript_path, "".join(json.dumps(r) + "\n" for r in kept))
        atomic_write_text(self.episodes_path, "".join(json.dumps(r) + "\n" for r in self.episodes))
        self._episodes_file = open(self.episodes_path, "a")
        self._transcript = open(self.transcript_path, "a") if cfg.transcript else None
        self.logger = MetricsLogger(run_dir, resume_step=self.steps if resumed else None)

    def _next_episode_id(self, finished: set[int]) -> int:
        seen = set(finished)
        if self.transcript_path.exists():
            seen |= {row["episode"] for row in read_jsonl(self.transcript_path)}
        return max(seen, default=-1) + 1

    def new_episode_id(self) -> int:
        self.next_episode += 1
        return self.next_episode - 1

    def step_row(self, row: dict) -> None:
        if self._transcript is not None:
            self._transcript.write(json.dumps(row) + "\n")
            self._transcript.flush()  # readable while the run goes on (tail -f)

    def episode_row(self, row: dict) -> None:
        self.episodes.append(row)
        self._episodes_file.write(json.dumps(row) + "\n")
        self._episodes_file.flush()
        metrics = {"episode/return": row["return"], "episode/length": row["length"],
                   "llm/parse_rate": row["parse"]["parse_rate"],
                   "llm/fallback_rate": row["parse"]["fallback_rate"]}
        unlocked = set(row["achievements"])
        metrics.update({f"achievements/{a}": 100.0 * (a in unlocked) for a in self.achievement_names})
        self.logger.log(row["steps_total"], metrics)

    def close(self) -> None:
        self._episodes_file.close()
        if self._transcript is not None:
            self._transcript.close()
        self.logger.close()


# ----------------------------------------------------------------------------------------------
# GIF of env 0
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# The play loop
# ----------------------------------------------------------------------------------------------


def _unlocked(before: np.ndarray, after: np.ndarray, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(name for name, b, a in zip(names, before, after) if a > 0.5 and b <= 0.5)


@functools.lru_cache(maxsize=4)
def compiled_env(env_name: str, num_envs: int, reset_ratio: int):
    """``(env, reset, reset_rows, step)``, built and jitted once per process and shape.

    ``reset_rows(key, obs, state, rows)`` gives fresh worlds to the envs in ``rows`` (episodes cut
    by --max-steps) and leaves the others alone; it reuses the compiled ``reset`` (world
    generation compiles slowly, full Craftax most) and compiles only the cheap selection."""
    import jax
    import jax.numpy as jnp

    from utils import envs

    env = envs.make(env_name, num_envs, reset_ratio=reset_ratio)

    @jax.jit
    def select(rows, fresh, current):
        def pick(new, old):
            return jnp.where(rows.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)

        return jax.tree.map(pick, fresh, current)

    reset = jax.jit(env.reset)

    def reset_rows(key, obs, state, rows):
        return select(jnp.asarray(rows), reset(key), (obs, state))

    return env, reset, reset_rows, jax.jit(env.step)


class PlayLoop:
    """Steps every env together, asking the model for each env that is playing an episode."""

    def __init__(self, cfg: LLMPlayConfig, backend, files: RunFiles, names: tuple[str, ...],
                 to_start: int):
        import jax

        self.cfg, self.backend, self.files, self.names = cfg, backend, files, names
        self.env, self._reset, self._reset_rows, self._step = compiled_env(
            cfg.env, cfg.num_envs, cfg.reset_ratio)
        self.parser = ActionParser(names, allow_numbers=cfg.allow_numbers)
        self.timing = {"seconds": 0.0, "llm_seconds": 0.0, "env_seconds": 0.0, "decisions": 0,
                       "loop_steps": 0, "generate_calls": 0}
        self.to_start, self.started = to_start, 0
        self.slots: list[Slot | None] = [None] * cfg.num_envs
        for i in range(min(cfg.num_envs, to_start)):
            self.slots[i] = self._new_slot()
        # achievements of each env's current episode after its last step (to see what a step unlocked)
        self.previous = np.zeros((cfg.num_envs, len(self.env.achievement_names)), dtype=np.float32)
        self.key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), len(files.episodes))
        self.key, reset_key = jax.random.split(self.key)
        self.obs, self.state = self._reset(reset_key)
        self.frame = first_env_renderer(self.env) if cfg.render else None
        self.frames: list[np.ndarray] = []
        self.gif_episode = self.slots[0].episode if self.slots[0] is not None else None

    def _new_slot(self) -> Slot:
        self.started += 1
        return Slot(self.files.new_episode_id(), History(self.cfg.history))

    def _generate(self, prompts: list[str]) -> list[str]:
        self.timing["generate_calls"] += 1
        return self.backend.generate(prompts, max_new_tokens=self.cfg.max_new_tokens,
                                     temperature=self.cfg.temperature)

    def _retry(self, prompt: str, reply: str) -> str:
        return retry_message(prompt, reply, self.names)

    def run(self, bar=None) -> None:
        from utils.text_obs import render_texts

        start = time.perf_counter()
        while any(slot is not None for slot in self.slots):
            active = [i for i, slot in enumerate(self.slots) if slot is not None]
            self._add_frame()
            texts = render_texts(np.asarray(self.obs)[active], self.cfg.env)
            users = [user_message(text, self.slots[i].history.lines(), self.slots[i].length)
                     for i, text in zip(active, texts)]
            tick = time.perf_counter()
            decisions = resolve_actions(users, self._generate, self.parser, self._retry,
                                        self.cfg.retries)
            self.timing["llm_seconds"] += time.perf_counter() - tick
            outcome = self._step_envs(active, decisions)
            finished = self._record(active, texts, users, decisions, outcome)
            self.timing["seconds"] = time.perf_counter() - start
            if self.timing["loop_steps"] == 1:  # holds the env's (and renderer's) compilation
                self.timing["first_step_seconds"] = self.timing["seconds"]
                self.timing["first_step_decisions"] = self.timing["decisions"]
            if bar is not None:
                bar.update(finished)
                totals = _sum_counters(self.files.episodes, self.slots)
                bar.set_postfix(steps=self.timing["decisions"],
                                sps=f"{self.timing['decisions'] / self.timing['seconds']:.2f}",
                                parsed=f"{totals.as_dict()['parse_rate']:.0%}", refresh=False)

    def _add_frame(self) -> None:
        first = self.slots[0]
        if (self.frame is not None and first is not None and first.episode == self.gif_episode
                and len(self.frames) < self.cfg.render_max_frames):
            self.frames.append(self.frame(self.state))

    def _step_envs(self, active: list[int], decisions: list[Decision]) -> dict[str, np.ndarray]:
        """Step all envs (idle ones play NOOP); returns this step's per-env outcome as numpy."""
        import jax
        import jax.numpy as jnp

        tick = time.perf_counter()
        actions = np.full(self.cfg.num_envs, self.parser.noop_index, dtype=np.int32)
        actions[active] = [d.action for d in decisions]
        self.key, step_key = jax.random.split(self.key)
        self.obs, self.state, reward, done, info = self._step(step_key, self.state,
                                                              jnp.asarray(actions))
        outcome = {"reward": np.asarray(reward), "done": np.asarray(done),
                   "achieved": np.asarray(info["achievements"]),
                   "return": np.asarray(info["episode_return"]),
                   "length": np.asarray(info["episode_length"])}
        self.timing["env_seconds"] += time.perf_counter() - tick
        self.timing["loop_steps"] += 1
        self.timing["decisions"] += len(active)
        self.files.steps += len(active)
        return outcome

    def _record(self, active, texts, users, decisions, outcome) -> int:
        """Transcript rows, histories and counters; finished episodes are written and their envs
        start the next episode (or idle). Returns how many episodes finished."""
        import jax

        names = self.env.achievement_names
        reward, done, achieved = outcome["reward"], outcome["done"], outcome["achieved"]
        truncated = np.zeros(self.cfg.num_envs, dtype=bool)
        finished = 0
        for i, text, user, decision in zip(active, texts, users, decisions):
            slot = self.slots[i]
            unlocked = _unlocked(self.previous[i], achieved[i], names)
            slot.counters.add(decision_counters(decision))
            slot.history.add(HistoryEntry(facing_of(text), decision.action_name, float(reward[i]),
                                          unlocked, decision.outcome == "fell_back"))
            slot.length += 1
            truncated[i] = not done[i] and slot.length >= self.cfg.max_steps
            self.files.step_row(_transcript_row(self.timing["loop_steps"] - 1, i, slot, text, user,
                                                decision, float(reward[i]), bool(done[i]),
                                                bool(truncated[i]), unlocked))
            if done[i] or truncated[i]:
                self.files.episode_row(_episode_row(
                    slot, i, float(outcome["return"][i]), int(outcome["length"][i]), achieved[i],
                    names, bool(truncated[i]), self.files.steps))
                finished += 1
                self.slots[i] = self._new_slot() if self.started < self.to_start else None
        self.previous = np.where((done | truncated)[:, None], 0.0, achieved)
        # Cut episodes need a fresh world only where a new episode starts; idle envs may run on.
        restart = truncated & np.array([slot is not None for slot in self.slots])
        if restart.any():
            self.key, cut_key = jax.random.split(self.key)
            self.obs, self.state = self._reset_rows(cut_key, self.obs, self.state, restart)
        return finished


def play(cfg: LLMPlayConfig, backend=None) -> dict[str, Any]:
    """Play until ``cfg.num_episodes`` episodes are finished; returns the summary (also written)."""
    from utils.run_dir import open_run_dir, resolve_run_dir

    cfg.validate()
    names = action_names(cfg.env)
    examples = load_few_shot(cfg.few_shot, cfg.env, cfg.few_shot_count) if cfg.few_shot else []
    system = system_prompt(cfg.env, examples)
    if not cfg.run_name and not cfg.run_dir:
        presets = "-".join(cfg.preset) if cfg.preset else "default"
        cfg = dataclasses.replace(cfg, run_name=f"{Path(cfg.model.rstrip('/')).name}-{presets}-s{cfg.seed}")
    run_dir = resolve_run_dir(cfg, AREA, NAME)
    resumed = open_run_dir(cfg, run_dir)
    atomic_write_text(run_dir / "system_prompt.txt", system)

    achievement_names = compiled_env(cfg.env, cfg.num_envs, cfg.reset_ratio)[0].achievement_names
    files = RunFiles(run_dir, cfg, resumed, achievement_names)
    done_before = len(files.episodes)
    if done_before >= cfg.num_episodes:  # a finished run: nothing to play
        files.close()
        summary_path = run_dir / "summary.json"
        if summary_path.exists():
            return json.loads(summary_path.read_text())
        return write_summary(cfg, run_dir, files.episodes, {}, achievement_names)

    if backend is None:
        backend = make_player_backend(cfg, system)
    seed_sampling(cfg.seed + done_before)
    loop = PlayLoop(cfg, backend, files, names, cfg.num_episodes - done_before)
    bar = _progress_bar(cfg.progress, cfg.num_episodes, done_before)
    try:
        loop.run(bar)
    finally:
        if bar is not None:
            bar.close()
        files.close()
    gif = run_dir / "episode.gif" if loop.frames else None
    if gif is not None:
        write_gif(gif, loop.frames, cfg.render_fps)
    return write_summary(cfg, run_dir, files.episodes, loop.timing, achievement_names, gif=gif)


def _sum_counters(episodes: list[dict], slots: list[Slot | None]) -> ParseCounters:
    total = ParseCounters()
    for row in episodes:
        total.add(ParseCounters(**{k: row["parse"][k] for k in dataclasses.asdict(total)}))
    for slot in slots:
        if slot is not None:
            total.add(slot.counters)
    return total


def _transcript_row(loop_step: int, env_index: int, slot: Slot, text: str, user: str,
                    decision: Decision, reward: float, done: bool, truncated: bool,
                    unlocked: tuple[str, ...]) -> dict:
    return {"step": loop_step, "env": env_index, "episode": slot.episode,
            "episode_step": slot.length - 1, "text": text, "prompt": user,
            "outputs": decision.outputs, "action": decision.action,
            "action_name": decision.action_name, "outcome": decision.outcome,
            "rule": decision.rule, "reward": reward, "done": done, "truncated": truncated,
            "unlocked": list(unlocked)}


def _episode_row(slot: Slot, env_index: int, ep_return: float, ep_length: int, achieved: np.ndarray,
                 achievement_names, truncated: bool, steps_total: int) -> dict:
    return {"episode": slot.episode, "env": env_index, "return": ep_return, "length": ep_length,
            "truncated": truncated,
            "achievements": [n for n, a in zip(achievement_names, achieved) if a > 0.5],
            "parse": slot.counters.as_dict(), "seconds": time.perf_counter() - slot.started,
            "steps_total": steps_total}


def write_summary(cfg: LLMPlayConfig, run_dir: Path, episodes: list[dict], timing: dict,
                  names, gif: Path | None = None) -> dict[str, Any]:
    """summary.json: means over finished episodes, achievement success rates (%), parse totals."""
    returns = np.array([row["return"] for row in episodes], dtype=np.float64)
    lengths = np.array([row["length"] for row in episodes], dtype=np.float64)
    totals = _sum_counters(episodes, [])
    summary: dict[str, Any] = {
        "env": cfg.env, "model": cfg.model, "backend": cfg.backend, "thinking": cfg.thinking,
        "run_dir": str(run_dir),
        "episodes": len(episodes),
        "truncated_episodes": sum(bool(row["truncated"]) for row in episodes),
        "return_mean": float(returns.mean()) if len(returns) else None,
        "return_std": float(returns.std()) if len(returns) else None,
        "length_mean": float(lengths.mean()) if len(lengths) else None,
        "achievements": {n: 100.0 * float(np.mean([n in row["achievements"] for row in episodes]))
                         for n in names} if episodes else {},
        "parse": totals.as_dict(),
    }
    if timing.get("seconds"):
        summary["timing"] = {**timing,
                             "decisions_per_second": timing["decisions"] / timing["seconds"],
                             "llm_fraction": timing["llm_seconds"] / timing["seconds"]}
        after_first = timing["seconds"] - timing.get("first_step_seconds", 0.0)
        if timing["loop_steps"] > 1 and after_first > 0:  # throughput without compilation
            summary["timing"]["decisions_per_second_after_first_step"] = (
                (timing["decisions"] - timing["first_step_decisions"]) / after_first)
    if gif is not None:
        summary["gif"] = str(gif)
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="episode", dynamic_ncols=True, desc="llm play")


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    from utils.config import parse_config
    from utils.jax_setup import enable_compilation_cache

    enable_compilation_cache()
    cfg = parse_config(LLMPlayConfig, AREA, NAME, argv)
    summary = play(cfg)
    parse = summary["parse"]
    print(f"{summary['episodes']} episodes: return {summary['return_mean']}, length "
          f"{summary['length_mean']}, parsed {parse['parse_rate']:.1%}, fell back "
          f"{parse['fallback_rate']:.1%}\nrun folder: {summary['run_dir']}")
    return summary


if __name__ == "__main__":
    main()
