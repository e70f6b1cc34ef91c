"""What an LLM player reads: the system prompt (rules, actions, few-shot examples) and each turn's
user message (recent history + the canonical text of the current observation).

Why this split: everything that is the same for a whole run (rules, action list, examples) goes
into the system prompt, so a transcript stores it once (``system_prompt.txt``) and each step only
stores its short user message; the backend applies the tokenizer's chat template to
``[system, user]`` when the model has one, else joins them as plain text (``utils.llm``).

History (``--history K``): the last K steps of the current episode, one line each, oldest first:
the "Facing" part of the text the model saw then (what was in front of it), the action played,
the reward, achievements unlocked, and whether the action was a fallback NOOP. Whole previous
observations would multiply the prompt length by K for little gain; the facing line is what tells
the model whether its last moves and DOs had an effect. History is cleared when an episode ends.

Few-shot examples come from recorded sessions (``tools/play.py --record``: a folder with
``steps.jsonl`` rows holding ``text_before``, ``action_name``, ``reasoning``, ``reward``,
``achievements``; or a folder of such session folders) or from a plain JSONL of
``{"text", "action_name", "reasoning"}`` rows. ``--few-shot-count N`` keeps N steps, preferring
ones with written reasoning, then ones that earned a reward or an achievement, shown in the order
they were played. A session whose ``session.json`` says ``"player": "agent"`` (``tools.record_agent``:
a trained policy's play, like the set shipped in ``online_rl_llm/few_shot/``) is introduced to the
model as agent play, never as human play; other sessions are human play.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from utils.envs import is_classic
from utils.errors import UserError
from utils.text_obs import TEXT_ENV_NAMES

__all__ = ["action_names", "system_prompt", "user_message", "retry_message", "FewShotExample",
           "load_few_shot", "HistoryEntry", "History", "format_history", "facing_of",
           "read_jsonl_rows", "render_header"]


def action_names(env_name: str) -> tuple[str, ...]:
    """The env's action names in index order, from craftax's own Action enum (17 / 43)."""
    if env_name not in TEXT_ENV_NAMES:
        raise UserError(f"an LLM plays from the text observation, which exists for "
                        f"{', '.join(TEXT_ENV_NAMES)}; {env_name!r} is not one of them")
    if is_classic(env_name):
        from craftax.craftax_classic.constants import Action
    else:
        from craftax.craftax.constants import Action
    return tuple(a.name for a in Action)


# What each action does, in words for the model (the game logic in craftax/*/game_logic.py).
ACTION_HELP = {
    "NOOP": "do nothing this step",
    "LEFT": "face left (west) and move one tile if it is free (grass, sand, path)",
    "RIGHT": "face right (east) and move one tile if it is free",
    "UP": "face up (north) and move one tile if it is free",
    "DOWN": "face down (south) and move one tile if it is free",
    "DO": "act on the facing tile: collect wood/stone/coal/iron/diamond (with the right pickaxe), "
          "drink water, eat a cow or ripe plant, attack a mob, collect a sapling from grass",
    "SLEEP": "sleep to restore energy (you wake up when energy is full; mobs can attack you)",
    "PLACE_STONE": "place 1 stone on the facing tile (also works on water and lava)",
    "PLACE_TABLE": "place a crafting table on the facing tile (costs 2 wood)",
    "PLACE_FURNACE": "place a furnace on the facing tile (costs 1 stone)",
    "PLACE_PLANT": "plant a sapling on the facing grass tile (eat it later when ripe)",
    "MAKE_WOOD_PICKAXE": "craft a wood pickaxe (1 wood; needs a table nearby)",
    "MAKE_STONE_PICKAXE": "craft a stone pickaxe (1 wood, 1 stone; table nearby)",
    "MAKE_IRON_PICKAXE": "craft an iron pickaxe (1 wood, 1 stone, 1 iron, 1 coal; table and furnace nearby)",
    "MAKE_WOOD_SWORD": "craft a wood sword (1 wood; table nearby)",
    "MAKE_STONE_SWORD": "craft a stone sword (1 wood, 1 stone; table nearby)",
    "MAKE_IRON_SWORD": "craft an iron sword (1 wood, 1 stone, 1 iron, 1 coal; table and furnace nearby)",
    "REST": "rest to recover health faster (stops when health is full or you are attacked)",
    "DESCEND": "go down the ladder you stand on (open once enough monsters on the floor are killed)",
    "ASCEND": "go up the ladder you stand on",
    "MAKE_DIAMOND_PICKAXE": "craft a diamond pickaxe (1 wood, 3 diamonds; table nearby)",
    "MAKE_DIAMOND_SWORD": "craft a diamond sword (1 wood, 2 diamonds; table nearby)",
    "MAKE_IRON_ARMOUR": "craft one piece of iron armour (3 iron, 3 coal; table and furnace nearby)",
    "MAKE_DIAMOND_ARMOUR": "craft one piece of diamond armour (3 diamonds; table nearby)",
    "SHOOT_ARROW": "shoot an arrow in the facing direction (needs a bow and arrows)",
    "MAKE_ARROW": "craft 2 arrows (1 wood, 1 stone; table nearby)",
    "CAST_FIREBALL": "cast a fireball in the facing direction (learned spell, 2 mana)",
    "CAST_ICEBALL": "cast an iceball in the facing direction (learned spell, 2 mana)",
    "PLACE_TORCH": "place a torch on the facing tile to light the area",
    "DRINK_POTION_RED": "drink a red potion (each colour has a random good or bad effect)",
    "DRINK_POTION_GREEN": "drink a green potion",
    "DRINK_POTION_BLUE": "drink a blue potion",
    "DRINK_POTION_PINK": "drink a pink potion",
    "DRINK_POTION_CYAN": "drink a cyan potion",
    "DRINK_POTION_YELLOW": "drink a yellow potion",
    "READ_BOOK": "read a book to learn a spell",
    "ENCHANT_SWORD": "enchant your sword at the facing enchantment table (9 mana and a ruby or sapphire)",
    "ENCHANT_ARMOUR": "enchant armour at the facing enchantment table (9 mana and a ruby or sapphire)",
    "MAKE_TORCH": "craft 4 torches (1 wood, 1 coal; table nearby)",
    "LEVEL_UP_DEXTERITY": "spend 1 XP on dexterity (slower food/drink/energy loss, better bow)",
    "LEVEL_UP_STRENGTH": "spend 1 XP on strength (more health and melee damage)",
    "LEVEL_UP_INTELLIGENCE": "spend 1 XP on intelligence (more mana, stronger spells)",
    "ENCHANT_BOW": "enchant your bow at the facing enchantment table (9 mana and a ruby or sapphire)",
}

_COMMON_RULES = """\
You are playing Craftax, a 2D survival and crafting game seen from above, one action per step.
The goal is to unlock as many achievements as possible in one life: each achievement gives reward \
the first time you get it in an episode{weights}; gaining health gives a little reward and losing \
health costs a little. The episode ends when your health reaches 0.

How the game works:
- You always face one of the four directions; LEFT/RIGHT/UP/DOWN turn you that way and move you \
one tile if the tile is free. DO and PLACE_* act on the tile you face (the "Facing" line says \
which tile and what is on it), so face a target before acting on it.
- "Nearby" in crafting means one of the 8 tiles around you.
- Food, drink and energy go down over time; when one reaches 0 you lose health. Eat cows (DO \
several times), drink water (face water and DO), sleep when energy is low. Health recovers \
while they are not 0.
- Zombies (and skeletons in caves) attack you; fight them with DO, ideally with a sword. \
Darkness at night brings more zombies: block yourself in with stone before sleeping.
- Tech tree: wood (DO on trees) -> crafting table (PLACE_TABLE) -> wood pickaxe and sword -> \
stone (needs a wood pickaxe) -> stone pickaxe and sword, furnace -> coal and iron (iron needs a \
stone pickaxe) -> iron pickaxe and sword (table and furnace nearby) -> diamond (needs an iron \
pickaxe).
"""

_FULL_RULES = """\
- Full Craftax has 9 floors: the overworld, then dungeon, gnomish mines, sewers, vaults, troll \
mines, fire realm, ice realm and graveyard. Stand on a ladder and DESCEND / ASCEND; a floor's \
ladder down opens once you have killed enough of its monsters (the "Floor" line says so). Each \
new floor gives 1 XP to spend with LEVEL_UP_*.
- Deeper floors need light (torches), better gear (armour, diamond tools, enchantments at \
enchantment tables with rubies or sapphires), and mana for spells learned from books.
"""

_OBSERVATION_HELP = """\
Each turn you get a text observation: the tiles around you as (row, col) offsets from you \
(row<0 is up/north, col<0 is left/west), your inventory and your vitals. Moving UP goes from \
(0,0) to (-1,0); the tile you face is the one at the offset shown in the "Facing" line.
"""

_ANSWER_FORMAT = ('Answer with a short reasoning (at most two sentences), then a final line '
                  '"Action: NAME" with exactly one action name from the list.')


def _action_list(names: Sequence[str]) -> str:
    return "\n".join(f"- {name}: {ACTION_HELP.get(name, name.lower().replace('_', ' '))}"
                     for name in names)


def system_prompt(env_name: str, few_shot: Sequence["FewShotExample"] = ()) -> str:
    """Rules, observation format, action list and answer format for ``env_name``; then examples."""
    names = action_names(env_name)
    classic = is_classic(env_name)
    weights = "" if classic else " (harder achievements are worth more)"
    parts = [_COMMON_RULES.format(weights=weights)]
    if not classic:
        parts.append(_FULL_RULES)
    parts.append(_OBSERVATION_HELP)
    parts.append(f"Actions ({len(names)}):\n{_action_list(names)}\n")
    parts.append(_ANSWER_FORMAT)
    if few_shot:
        shown = "\n\n".join(example.render(i + 1) for i, example in enumerate(few_shot))
        parts.append(f"\n\n{_examples_heading({e.player for e in few_shot})}\n\n{shown}")
    return "\n".join(parts).strip() + "\n"


# ----------------------------------------------------------------------------------------------
# Few-shot examples
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FewShotExample:
    """One recorded decision: the observation text, the action taken, and why (when written)."""

    text: str
    action_name: str
    reasoning: str | None = None
    rewarded: bool = False
    player: str = "human"  # or "agent": said in the system prompt

    def render(self, number: int) -> str:
        lines = [f"Example {number}", "Observation:", self.text.strip()]
        if self.reasoning:
            lines.append(f"Reasoning: {self.reasoning.strip()}")
        lines.append(f"Action: {self.action_name}")
        return "\n".join(lines)


def _examples_heading(players: set[str]) -> str:
    """Says who played the examples: a policy's moves shown as a person's would mislead the model."""
    if players == {"human"}:
        return "Examples from recorded human play:"
    if players == {"agent"}:
        return "Examples from recorded agent play (a trained reinforcement-learning policy, not a person):"
    return "Examples from recorded play (human and agent: a trained reinforcement-learning policy):"


def session_player(steps_file: Path) -> str:
    """``"agent"`` when the session's ``session.json`` says so (``tools.record_agent``), else ``"human"``."""
    session = steps_file.parent / "session.json"
    if steps_file.name != "steps.jsonl" or not session.is_file():
        return "human"
    try:
        player = json.loads(session.read_text()).get("player")
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"{session} is not a JSON object; fix it or remove it") from None
    return "agent" if player == "agent" else "human"


def _session_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / "steps.jsonl").is_file():
        return [path / "steps.jsonl"]
    if path.is_dir():
        found = sorted(path.glob("*/steps.jsonl"))
        if found:
            return found
    raise UserError(f"no few-shot examples at {path}: pass a recorded session folder (with "
                    "steps.jsonl, from tools/play.py --record), a folder of such sessions, or a "
                    'JSONL file of {"text", "action_name", "reasoning"} rows')


def read_jsonl_rows(file: Path) -> Iterable[tuple[int, dict]]:
    with open(file) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{file}:{number} is not valid JSON ({exc.msg}); fix or remove "
                                "that line") from None
            if not isinstance(row, dict):
                raise UserError(f"{file}:{number} is not a JSON object")
            yield number, row


def _example_from_row(row: dict, where: str, names: tuple[str, ...]) -> FewShotExample:
    text = row.get("text_before", row.get("text"))
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where} has no observation text ('text_before' or 'text')")
    name = row.get("action_name")
    if name is None and isinstance(row.get("action"), int) and 0 <= row["action"] < len(names):
        name = names[row["action"]]
    if not isinstance(name, str) or name.upper() not in names:
        raise UserError(f"{where} has action {name!r}, which is not an action of this env "
                        f"({len(names)} actions: {', '.join(names[:6])}, ...)")
    reasoning = row.get("reasoning")
    rewarded = bool(row.get("achievements")) or float(row.get("reward") or 0.0) > 0
    return FewShotExample(text, name.upper(), reasoning if isinstance(reasoning, str) else None,
                          rewarded)


def load_few_shot(path: str | Path, env_name: str, count: int) -> list[FewShotExample]:
    """Up to ``count`` examples from recorded sessions or a JSONL file (selection: module doc)."""
    if count <= 0:
        return []
    names = action_names(env_name)
    header = render_header(env_name)
    examples = []
    for file in _session_files(Path(path)):
        player = session_player(file)
        for number, row in read_jsonl_rows(file):
            example = dataclasses.replace(_example_from_row(row, f"{file}:{number}", names), player=player)
            if not example.text.startswith(header):
                raise UserError(f"{file}:{number} is an observation of another game (its text does "
                                f"not start with {header!r}); record examples on {env_name}")
            examples.append(example)
    if not examples:
        raise UserError(f"{path} holds no few-shot examples")
    unique = list({(e.text, e.action_name): e for e in examples}.values())
    ranked = sorted(range(len(unique)),
                    key=lambda i: (not unique[i].reasoning, not unique[i].rewarded, i))
    return [unique[i] for i in sorted(ranked[:count])]


def render_header(env_name: str) -> str:
    """The first words of every canonical text of ``env_name`` (tells Classic and full apart)."""
    return "Craftax-Classic observation." if is_classic(env_name) else "Craftax observation."


# ----------------------------------------------------------------------------------------------
# History and the per-turn message
# ----------------------------------------------------------------------------------------------


def facing_of(text: str) -> str:
    """The content of the text's "Facing:" line ("right (east); at (0,1): tree.")."""
    for line in text.splitlines():
        if line.startswith("Facing: "):
            return line[len("Facing: "):].strip()
    return "?"


@dataclasses.dataclass(frozen=True)
class HistoryEntry:
    """One past step of the current episode, as the history lines show it."""

    facing: str
    action_name: str
    reward: float
    unlocked: tuple[str, ...] = ()
    fell_back: bool = False


class History:
    """The last ``size`` steps of one env's current episode."""

    def __init__(self, size: int):
        self.size = max(0, int(size))
        self.entries: collections.deque[HistoryEntry] = collections.deque(maxlen=self.size or 1)

    def add(self, entry: HistoryEntry) -> None:
        if self.size:
            self.entries.append(entry)

    def clear(self) -> None:
        self.entries.clear()

    def lines(self) -> list[str]:
        return format_history(list(self.entries)) if self.size else []


def format_history(entries: Sequence[HistoryEntry]) -> list[str]:
    lines = []
    for back, entry in zip(range(len(entries), 0, -1), entries):
        ago = "1 step ago" if back == 1 else f"{back} steps ago"
        action = entry.action_name + (" (your answer named no action, so NOOP)" if entry.fell_back else "")
        line = f"- {ago}: facing {entry.facing} You did {action}; reward {entry.reward:+.2f}"
        if entry.unlocked:
            line += f"; unlocked {', '.join(entry.unlocked)}"
        lines.append(line + ".")
    return lines


def user_message(text: str, history_lines: Sequence[str] = (), episode_step: int | None = None) -> str:
    """One turn's message: recent steps (if any), the current observation, the question."""
    parts = []
    if history_lines:
        parts.append("Recent steps (oldest first):\n" + "\n".join(history_lines))
    when = f" (step {episode_step} of this episode)" if episode_step is not None else ""
    parts.append(f"Current observation{when}:\n{text.strip()}")
    parts.append("What is your next action? " + _ANSWER_FORMAT)
    return "\n\n".join(parts)


def retry_message(user: str, reply: str, names: Sequence[str], max_reply_chars: int = 600) -> str:
    """Ask again after a reply that named no action: show the reply and demand the format."""
    shown = reply.strip()
    if len(shown) > max_reply_chars:
        shown = shown[:max_reply_chars] + " ..."
    return (f"{user}\n\nYour previous answer was:\n{shown or '(empty)'}\n\nIt did not name a valid "
            f'action. Answer with exactly one line "Action: NAME", where NAME is one of: '
            f"{', '.join(names)}.")
