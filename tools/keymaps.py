"""Action names and keyboard maps for every registered env, without importing pygame.

Action names are the env's own enum names in capitals (``PLACE_TABLE``), the spelling the LLM
prompts and ``online_rl_llm.action_parsing`` use, so a human recording can serve as few-shot
examples as is. Keys are pygame key names (``pygame.key.name``), so a key map can be printed,
stored in ``session.json`` and scripted in tests without a display.

Craftax keys follow craftax's own ``play_craftax*.py``. Tetris in direct mode maps one key to one
action; in placement mode (41 actions: rotation x column, then hold) the arrow keys move a
target that ``space`` places, so some keys only change the target (``TargetMove``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from utils.errors import UserError

CRAFTAX_CLASSIC_KEYS = {
    "q": "NOOP", "w": "UP", "a": "LEFT", "s": "DOWN", "d": "RIGHT", "space": "DO", "tab": "SLEEP",
    "r": "PLACE_STONE", "t": "PLACE_TABLE", "f": "PLACE_FURNACE", "p": "PLACE_PLANT",
    "1": "MAKE_WOOD_PICKAXE", "2": "MAKE_STONE_PICKAXE", "3": "MAKE_IRON_PICKAXE",
    "4": "MAKE_WOOD_SWORD", "5": "MAKE_STONE_SWORD", "6": "MAKE_IRON_SWORD",
}

CRAFTAX_KEYS = {
    "q": "NOOP", "w": "UP", "a": "LEFT", "s": "DOWN", "d": "RIGHT", "space": "DO", "tab": "SLEEP",
    "1": "MAKE_WOOD_PICKAXE", "2": "MAKE_STONE_PICKAXE", "3": "MAKE_IRON_PICKAXE",
    "4": "MAKE_DIAMOND_PICKAXE", "5": "MAKE_WOOD_SWORD", "6": "MAKE_STONE_SWORD",
    "7": "MAKE_IRON_SWORD", "8": "MAKE_DIAMOND_SWORD", "t": "PLACE_TABLE", "r": "PLACE_STONE",
    "f": "PLACE_FURNACE", "p": "PLACE_PLANT", "e": "REST", ",": "ASCEND", ".": "DESCEND",
    "y": "MAKE_IRON_ARMOUR", "u": "MAKE_DIAMOND_ARMOUR", "i": "SHOOT_ARROW", "o": "MAKE_ARROW",
    "g": "CAST_FIREBALL", "h": "CAST_ICEBALL", "j": "PLACE_TORCH", "z": "DRINK_POTION_RED",
    "x": "DRINK_POTION_GREEN", "c": "DRINK_POTION_BLUE", "v": "DRINK_POTION_PINK",
    "b": "DRINK_POTION_CYAN", "n": "DRINK_POTION_YELLOW", "m": "READ_BOOK", "k": "ENCHANT_SWORD",
    "l": "ENCHANT_ARMOUR", "[": "MAKE_TORCH", "]": "LEVEL_UP_DEXTERITY", "-": "LEVEL_UP_STRENGTH",
    "=": "LEVEL_UP_INTELLIGENCE", ";": "ENCHANT_BOW",
}

TETRIS_DIRECT_KEYS = {
    "left": "LEFT", "right": "RIGHT", "up": "ROTATE_CW", "z": "ROTATE_CCW", "down": "SOFT_DROP",
    "space": "HARD_DROP", "c": "HOLD", "q": "NOOP",
}

# Placement mode: keys that move the target, and the two that act.
TETRIS_PLACEMENT_MOVES = {"left": (0, -1), "right": (0, 1), "up": (1, 0), "z": (-1, 0)}
TETRIS_PLACEMENT_KEYS = {"space": "PLACE", "c": "HOLD"}

# Keys the player uses for the session itself, never actions.
REASON_KEY = "return"  # open the reasoning prompt; return again attaches it to the next action
QUIT_KEY = "escape"


@dataclass(frozen=True)
class KeyMap:
    """Which key does what in one env; ``describe()`` is what the player is shown."""

    env_name: str
    action_names: tuple[str, ...]
    keys: dict[str, str]  # key name -> action name (or PLACE for the placement target)
    target_moves: dict[str, tuple[int, int]] = field(default_factory=dict)  # placement mode only
    num_rotations: int = 4
    num_columns: int = 10

    @property
    def placement(self) -> bool:
        return bool(self.target_moves)

    def describe(self) -> list[str]:
        lines = [f"{key:>6}  {action}" for key, action in self.keys.items()]
        for key, (d_rot, d_col) in self.target_moves.items():
            what = "rotate target" if d_rot else "move target column"
            lines.append(f"{key:>6}  {what} {'+' if (d_rot or d_col) > 0 else '-'}1")
        lines.append(f"{REASON_KEY:>6}  type a reasoning for the next action (return again to finish)")
        lines.append(f"{QUIT_KEY:>6}  quit (closes the recording)")
        return lines

    def to_json(self) -> dict:
        data = {"keys": dict(self.keys), "reason_key": REASON_KEY, "quit_key": QUIT_KEY}
        if self.placement:
            data["target_moves"] = {k: list(v) for k, v in self.target_moves.items()}
        return data


def action_names(env_name: str) -> tuple[str, ...]:
    """Action names of a registered env, indexed by action id."""
    if env_name.startswith("Craftax-Classic"):
        from craftax.craftax_classic.constants import Action
        return tuple(a.name for a in Action)
    if env_name.startswith("Craftax-"):
        from craftax.craftax.constants import Action
        return tuple(a.name for a in Action)
    if env_name.startswith("Tetris-Direct"):
        from utils.envs.tetris import Action
        return tuple(a.name for a in Action)
    if env_name.startswith("Tetris-Placement"):
        from utils.envs.tetris import NUM_PLACEMENTS
        from utils.envs.tetris_pieces import BOARD_W
        return tuple(f"PLACE_ROT{i // BOARD_W}_COL{i % BOARD_W}" for i in range(NUM_PLACEMENTS)) + ("HOLD",)
    raise UserError(f"no action names for env {env_name!r}; add them to tools/keymaps.py")


def keymap_for(env_name: str) -> KeyMap:
    names = action_names(env_name)
    if env_name.startswith("Craftax-Classic"):
        return KeyMap(env_name, names, CRAFTAX_CLASSIC_KEYS)
    if env_name.startswith("Craftax-"):
        return KeyMap(env_name, names, CRAFTAX_KEYS)
    if env_name.startswith("Tetris-Direct"):
        return KeyMap(env_name, names, TETRIS_DIRECT_KEYS)
    if env_name.startswith("Tetris-Placement"):
        from utils.envs.tetris_pieces import BOARD_W, NUM_ROTATIONS
        return KeyMap(env_name, names, TETRIS_PLACEMENT_KEYS, TETRIS_PLACEMENT_MOVES,
                      num_rotations=NUM_ROTATIONS, num_columns=BOARD_W)
    raise UserError(f"no key map for env {env_name!r}; add one to tools/keymaps.py")


class KeyInterpreter:
    """Turns key names into actions; keeps the placement target between keys."""

    def __init__(self, keymap: KeyMap):
        self.keymap = keymap
        self._index = {name: i for i, name in enumerate(keymap.action_names)}
        self.target = (0, keymap.num_columns // 2 - 1)  # (rotation, leftmost column)

    def action_for(self, key: str) -> int | None:
        """The action a key takes, or None if it only moves the target or means nothing here."""
        km = self.keymap
        if key in km.target_moves:
            d_rot, d_col = km.target_moves[key]
            rot, col = self.target
            self.target = ((rot + d_rot) % km.num_rotations, min(max(col + d_col, 0), km.num_columns - 1))
            return None
        name = km.keys.get(key)
        if name is None:
            return None
        if name == "PLACE":
            rot, col = self.target
            return rot * km.num_columns + col
        return self._index[name]

    def status(self) -> str:
        if not self.keymap.placement:
            return ""
        rot, col = self.target
        return f"target: rotation {rot}, column {col}"
