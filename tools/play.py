"""Play any registered env yourself in a pygame window, and optionally record the session.

    python -m tools.play                                       # Craftax-Classic-Symbolic-v1
    python -m tools.play --env Craftax-Symbolic-v1 --record runs/play/full-1
    python -m tools.play --env Tetris-Direct-Standard-v0
    python -m tools.play --record DIR --reason                 # type a reasoning on stdin per action
    SDL_VIDEODRIVER=dummy python -m tools.play --script "w,w,space,say:wood is up,space" --record DIR

The key map is printed at start and shown beside the game. ``return`` opens a prompt in the window
to type a reasoning for the next action (``return`` again closes it; ``escape`` drops it);
``escape`` quits. An episode that ends starts a new one; the recording goes on.

A recording (``--record DIR``) is a folder with:

* ``session.json``: env, seed, started (ISO time), keymap, action names, and when closed the
  number of steps and episodes;
* ``steps.jsonl``: one JSON object per action with exactly the keys ``step`` (0, 1, ... over the
  whole session), ``action`` (int), ``action_name`` (e.g. ``PLACE_TABLE``), ``reasoning`` (str or
  null), ``text_before`` / ``text_after`` (the canonical text of ``utils.text_obs`` before and
  after the action; null for Tetris, which has no text renderer), ``reward``, ``done`` and
  ``achievements`` (names unlocked by this step);
* ``frames/NNNNNN.png``: frame N is the screen the player saw when choosing action N; one extra
  frame after the last action shows where the session ended.

``--script`` drives the same event loop with synthetic key events instead of a keyboard (tests,
demos): comma-separated pygame key names, ``say:TEXT`` types TEXT into the reasoning prompt; the
session quits when the script ends.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from tools.frames import save_png, side_by_side, text_image
from tools.keymaps import QUIT_KEY, REASON_KEY, KeyInterpreter, KeyMap, keymap_for
from utils.errors import UserError, exit_on_user_error
from utils.io import atomic_write_json

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

STEP_KEYS = ("step", "action", "action_name", "reasoning", "text_before", "text_after", "reward", "done",
             "achievements")


@dataclasses.dataclass
class PlayConfig:
    """Play an env with the keyboard (key map printed and shown); optionally record the session."""

    env: str = "Craftax-Classic-Symbolic-v1"
    """Environment name (see utils.envs.ENV_NAMES)."""
    seed: int = 0
    """Seed of the worlds (each new episode continues the same random stream)."""
    record: str | None = None
    """Folder to record the session to (steps.jsonl, frames/, session.json); must not hold one yet."""
    reason: bool = False
    """Ask for a reasoning on stdin before every action (empty input: none)."""
    script: str | None = None
    """Comma-separated key names to play instead of the keyboard (say:TEXT types a reasoning)."""
    max_steps: int | None = None
    """Stop after this many actions."""
    scale: int = 0
    """Zoom of the game picture in the window; 0 picks one that makes it about 600 px tall."""


# ----------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------


class Recorder:
    """Writes a session folder as the game goes: each step's line is flushed when it happens.

    ``tools.record_agent`` writes agent play through this same class, so human and agent sessions
    share one format; it adds ``info`` (who played: ``player``, the run, ...) to ``session.json`` and
    may skip the frames (``frames=False``), which the LLM few-shot reader never looks at."""

    def __init__(self, directory: str | Path, env_name: str, seed: int, keymap: KeyMap,
                 info: dict | None = None, frames: bool = True):
        self.directory = Path(directory)
        if (self.directory / "steps.jsonl").exists():
            raise UserError(f"{self.directory} already holds a recording; pass a new --record folder")
        self.directory.mkdir(parents=True, exist_ok=True)
        if frames:
            (self.directory / "frames").mkdir(exist_ok=True)
        self.session = {
            "env": env_name,
            "seed": seed,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "keymap": keymap.to_json(),
            "action_names": list(keymap.action_names),
            **(info or {}),
        }
        atomic_write_json(self.directory / "session.json", self.session)
        self._steps = open(self.directory / "steps.jsonl", "a")
        self.count, self.episodes = 0, 0

    def frame(self, index: int, image: np.ndarray) -> None:
        save_png(self.directory / "frames" / f"{index:06d}.png", image)

    def step(self, record: dict) -> None:
        assert tuple(record) == STEP_KEYS, "steps.jsonl lines have a fixed set of keys"
        self._steps.write(json.dumps(record) + "\n")
        self._steps.flush()
        self.count += 1
        self.episodes += bool(record["done"])

    def close(self, info: dict | None = None) -> None:
        """Finish ``session.json``; ``info`` adds what is only known at the end (an agent's returns)."""
        self._steps.close()
        ended = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        atomic_write_json(self.directory / "session.json",
                          {**self.session, "ended": ended, "steps": self.count,
                           "episodes_finished": self.episodes, **(info or {})})


# ----------------------------------------------------------------------------------------------
# Key events: the keyboard, or a script posted into the same pygame queue
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class KeyEvent:
    """What the loop reacts to: a key press (``key`` is pygame's name), typed text, or quit."""

    kind: str  # "key", "text" or "quit"
    value: str = ""


class PygameEvents:
    """Blocks on pygame's event queue and returns the events that matter."""

    def next(self) -> KeyEvent:
        import pygame

        while True:
            event = as_key_event(pygame.event.wait())
            if event is not None:
                return event


def as_key_event(event) -> KeyEvent | None:
    import pygame

    if event.type == pygame.QUIT:
        return KeyEvent("quit")
    if event.type == pygame.KEYDOWN:
        return KeyEvent("key", pygame.key.name(event.key))
    if event.type == pygame.TEXTINPUT:
        return KeyEvent("text", event.text)
    return None


class ScriptedEvents(PygameEvents):
    """Posts a script's key presses into pygame's queue, token by token, then a quit event.

    The events go through pygame's real queue and the same conversion as the keyboard's; they are
    read back without blocking, so a script can never wait for a key that will not come.
    """

    def __init__(self, script: str):
        import pygame

        self.tokens = [t.strip() for t in script.split(",") if t.strip()]
        self._ready: list[KeyEvent] = []
        for token in self.tokens:
            if not token.startswith("say:"):
                try:
                    pygame.key.key_code(token)
                except ValueError:
                    raise UserError(f"--script: unknown key name {token!r} "
                                    "(use pygame key names: w, space, left, return, ...)") from None

    def next(self) -> KeyEvent:
        import pygame

        while not self._ready:
            posted = self._events(self.tokens.pop(0)) if self.tokens else [pygame.event.Event(pygame.QUIT)]
            for event in posted:
                pygame.event.post(event)
            self._ready += [e for e in map(as_key_event, pygame.event.get()) if e is not None]
        return self._ready.pop(0)

    @staticmethod
    def _events(token: str) -> list:
        import pygame

        press = lambda name: pygame.event.Event(pygame.KEYDOWN, key=pygame.key.key_code(name), mod=0,
                                                unicode="", scancode=0)
        if token.startswith("say:"):
            return [press(REASON_KEY), pygame.event.Event(pygame.TEXTINPUT, text=token[4:]), press(REASON_KEY)]
        return [press(token)]


# ----------------------------------------------------------------------------------------------
# The window
# ----------------------------------------------------------------------------------------------


class Window:
    """Shows a composed RGB image; resizes itself when the image's size changes."""

    def __init__(self, title: str):
        try:
            import pygame
        except ImportError:
            raise UserError("playing needs pygame: pip install -e '.[tools]'") from None
        pygame.display.init()  # display and keyboard only: no audio device needed
        pygame.display.set_caption(title)
        self._size = None
        self._screen = None

    def show(self, image: np.ndarray) -> None:
        import pygame

        size = (image.shape[1], image.shape[0])
        if size != self._size:
            try:
                self._screen = pygame.display.set_mode(size)
            except pygame.error as exc:
                raise UserError(f"cannot open a window ({exc}); on a machine without a display set "
                                "SDL_VIDEODRIVER=dummy and play with --script") from None
            self._size = size
        self._screen.blit(pygame.surfarray.make_surface(np.ascontiguousarray(image.swapaxes(0, 1))), (0, 0))
        pygame.display.flip()

    @staticmethod
    def close() -> None:
        import pygame

        pygame.quit()


def with_placement_target(frame: np.ndarray, piece: int, target: tuple[int, int]) -> np.ndarray:
    """Outline, at the top of the board, where Tetris placement mode would drop the current piece
    (rotation and leftmost column clamped as the env clamps them); the env drops it from there."""
    from utils.envs.tetris_pieces import BOARD_W, SHAPE_MIN_COL, SHAPE_MIN_ROW, SHAPE_WIDTH, SHAPES
    from utils.envs.tetris_render import CELL_PX

    rot, col = target
    left = min(max(col, 0), BOARD_W - int(SHAPE_WIDTH[piece, rot]))
    frame = frame.copy()
    for r, c in SHAPES[piece, rot]:
        row, column = (r - SHAPE_MIN_ROW[piece, rot]) * CELL_PX, (c - SHAPE_MIN_COL[piece, rot] + left) * CELL_PX
        cell = frame[row:row + CELL_PX, column:column + CELL_PX]
        cell[[0, -1], :] = cell[:, [0, -1]] = 255  # a white outline, the cell's content still visible
    return frame


def compose(frame: np.ndarray, scale: int, status: list[str], keymap_lines: list[str]) -> np.ndarray:
    """The game picture zoomed by ``scale`` with the status and the key map beside it."""
    big = np.repeat(np.repeat(frame, scale, 0), scale, 1)
    panel = text_image("\n".join(status + ["", "Keys:"] + keymap_lines), width_chars=64, font_size=13)
    return side_by_side(big, panel)


# ----------------------------------------------------------------------------------------------
# The game loop
# ----------------------------------------------------------------------------------------------


def play(cfg: PlayConfig, events: PygameEvents | None = None,
         ask_reason: Callable[[str], str] = input) -> dict:
    """Run one play session until quit (or ``max_steps``); returns counts and the record folder."""
    from tools.session import GameSession
    from utils import envs

    if cfg.env not in envs.ENV_NAMES:
        raise envs.UnknownEnvError(f"unknown env {cfg.env!r}; valid names: {', '.join(envs.ENV_NAMES)}")
    keymap = keymap_for(cfg.env)
    keymap_lines = keymap.describe()
    print(f"{cfg.env}: keys\n" + "\n".join(keymap_lines), flush=True)
    window = Window(f"tools.play: {cfg.env}")
    recorder = None
    steps = 0
    try:
        events = events or (ScriptedEvents(cfg.script) if cfg.script else PygameEvents())
        session = GameSession(cfg.env, cfg.seed)
        keys = KeyInterpreter(keymap)
        recorder = Recorder(cfg.record, cfg.env, cfg.seed, keymap) if cfg.record else None
        frame = session.frame()
        scale = cfg.scale or max(1, 600 // frame.shape[0])
        typing: str | None = None  # the reasoning being typed, while the prompt is open
        reasoning: str | None = None  # typed reasoning waiting for the next action
        last_unlocked: list[str] = []
        while cfg.max_steps is None or steps < cfg.max_steps:
            status = _status(session, steps, keys.status(), last_unlocked, typing, reasoning)
            shown = (with_placement_target(frame, int(session.state.piece), keys.target)
                     if keymap.placement else frame)
            window.show(compose(shown, scale, status, keymap_lines))
            event = events.next()
            if event.kind == "quit":
                break
            if typing is not None:  # the prompt takes every key until return or escape
                if event.kind == "text":
                    typing += event.value
                elif event.value == "backspace":
                    typing = typing[:-1]
                elif event.value in (REASON_KEY, "enter"):
                    reasoning, typing = (typing.strip() or None), None
                elif event.value == QUIT_KEY:
                    typing = None
                continue
            if event.kind != "key":
                continue
            if event.value == QUIT_KEY:
                break
            if event.value == REASON_KEY:
                typing = ""
                continue
            action = keys.action_for(event.value)
            if action is None:
                continue
            if cfg.reason and reasoning is None:
                reasoning = ask_reason(f"reasoning for {keymap.action_names[action]}> ").strip() or None
            if recorder is not None:
                recorder.frame(steps, frame)
            result = session.step(action)
            if recorder is not None:
                recorder.step(dict(zip(STEP_KEYS, (
                    steps, action, keymap.action_names[action], reasoning, result.text_before,
                    result.text_after, result.reward, result.done, result.unlocked))))
            steps, reasoning, last_unlocked = steps + 1, None, result.unlocked
            frame = session.frame()  # after a done: the terminal frame, kept if the session stops here
            for name in result.unlocked:
                print(f"step {steps}: achievement {name}", flush=True)
            if result.done:
                print(f"episode {session.episode} over: return {result.episode_return:.2f} in "
                      f"{result.episode_length} steps", flush=True)
                if cfg.max_steps is not None and steps >= cfg.max_steps:
                    break
                session.reset()
                frame = session.frame()
        if recorder is not None:
            recorder.frame(steps, frame)
    finally:
        if recorder is not None:
            recorder.close()
        window.close()
    return {"steps": steps, "record": str(recorder.directory) if recorder else None}


def _status(session, steps: int, target: str, last_unlocked: list[str], typing: str | None,
            reasoning: str | None) -> list[str]:
    achieved = session.achieved_names()
    lines = [session.env_name, f"step {steps}   episode {session.episode}   "
             f"return {session.episode_return:.2f}   length {session.episode_length}",
             f"achievements ({len(achieved)}): {', '.join(achieved) or 'none'}"]
    if last_unlocked:
        lines.append(f"just unlocked: {', '.join(last_unlocked)}")
    if target:
        lines.append(target)
    if typing is not None:
        lines.append(f"reasoning> {typing}_")
    elif reasoning:
        lines.append(f"reasoning for the next action: {reasoning}")
    return lines


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    from utils.config import cli
    from utils.jax_setup import enable_compilation_cache

    cfg = cli(PlayConfig, argv)  # checks --env, --record and the numbers
    enable_compilation_cache()
    if cfg.script and "SDL_VIDEODRIVER" not in os.environ and not os.environ.get("DISPLAY"):
        os.environ["SDL_VIDEODRIVER"] = "dummy"  # a scripted session needs no screen
    result = play(cfg)
    if result["record"]:
        print(f"recorded {result['steps']} steps to {result['record']}")
    return result


if __name__ == "__main__":
    main()
