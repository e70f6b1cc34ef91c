"""The one renderer from a symbolic Craftax observation to the canonical text.

Offline labelling, live LLM features, the hidden-state server, LLM play and the tools all call
``render_texts``, so a hidden state means the same thing wherever it was computed. The text is a
pure function of the observation vector (no env state, no randomness, no dict-order surprises):
a saved observation and the live one give byte-identical text.

Supported envs: ``Craftax-Classic-Symbolic-v1`` (1345 floats: a 7x9 view with 17 block + 4 mob
channels per tile, then inventory, vitals, direction, light, sleeping) and ``Craftax-Symbolic-v1``
(8268 floats: a 9x11 view with 37 block + 5 item + 40 mob + 1 light channels per tile, then
inventory, potions, vitals and attributes, direction, armour, enchantments and floor status).
``obs_layout(env_name)`` describes the slicing. Pixel envs cannot be rendered to text.

Format (Craftax-Classic: world seed 0 with the player moved to the north edge, a cow and a zombie
added, facing east, some inventory; ``tests/test_text_obs.py`` re-renders this exact state)::

    Craftax-Classic observation. Map: 7 rows x 9 cols centred on you at (0,0); positions are
    (row, col) offsets from you, row<0 = up (north), row>0 = down (south), col<0 = left (west),
    col>0 = right (east).
    Facing: right (east); at (0,1): tree.
    Nearby (nearest first):
    - tree at (-1,0), (0,1), (-1,1), (1,-3), (2,-4)
    - stone at (1,0), (0,2), (1,1), (2,0), (0,3), (1,2), (2,1), (0,4), (2,-2), (2,2), (3,-1), (3,1), (1,4), (2,3), (3,-2), (3,2), (3,3)
    - coal at (2,-1)
    - zombie at (1,-4)
    - cow at (2,-3)
    Ground not listed: grass 17, path 4, sand 1.
    Beyond the map edge: rows -3..-2 (north).
    Inventory: wood 3, sapling 1, wood pickaxe 1.
    Health 7, food 5, drink 9, energy 9.
    Light 0.80; awake.

The header is one line in the text (wrapped here). Full Craftax (world seed 0, player moved to
the up ladder of floor 1; same header, 9 x 11) adds a floor line, items (torches, ladders), a
count of unlit tiles, attributes, learned spells, and potions, armour and enchantments in the
inventory when there are any::

    Craftax observation. Map: 9 rows x 11 cols centred on you at (0,0); positions are ...
    Floor 1 (dungeon); ladder down blocked until 8 monsters are killed on this floor.
    Facing: up (north); at (-1,0): path.
    Nearby (nearest first):
    - ladder up at (0,0)
    - mossy wall at (-1,1), (-1,3), (-1,4), (4,1), (-3,4)
    - wall at (1,1), (-2,1), (-1,2), (1,2), (2,1), (-3,1), (1,3), (3,1), (-3,2), (1,4), (-3,3), (-1,5), (1,5), (-3,5)
    Ground not listed: darkness 16, path 19. Too dark to see: 45 tiles.
    Inventory: empty.
    Health 9, food 9, drink 9, energy 9, mana 9.
    XP 0, dexterity 1, strength 1, intelligence 1.
    Light 0.80; awake. Spells learned: none.

A richer inventory line reads ``Inventory: wood 4, torch 2, arrow 17, book 1, stone pickaxe, iron
sword (fire enchantment), bow (ice enchantment), red potion 1, iron helmet (ice enchantment).``
and fractional health reads ``Health 8.5, ...``.

Rules that make the text short, readable and stable:

- Offsets are (row, col) from the player; the header says so once. Objects with the same name are
  grouped on one line; coordinates within a line and the lines themselves are ordered nearest
  first (Manhattan distance, i.e. steps to walk there, then row, then col, then name).
- Plain ground (grass, sand, path; in full Craftax also fire grass, ice grass and the darkness
  block) is counted, not listed. Tiles under mobs and items still count as their ground.
  Out-of-bounds tiles (Classic shows them; in full Craftax they are always unlit) are summarised
  as the rows/cols beyond the map edge. Unlit full-Craftax tiles are only counted.
- A tile can hold a block, an item and several mobs; each is listed under its own name.
- Mob names follow craftax's own mob tables (Classic: zombie, cow, skeleton, arrow; full: the
  melee, passive and ranged mob types per floor, mob projectiles, and ``your arrow`` etc. for the
  player's projectiles). Full Craftax draws a ladder down as blocked while the floor's ladder is
  closed; so does this text ("blocked ladder down").

Exact decoding of fractional values (the observation stores them scaled; the text undoes it):

- Classic inventory and vitals are ``float16(k) / 10``: printed as ``round(10 * x)``.
- Full Craftax counts (wood ... arrows, potions) are ``sqrt(k) / 10``: ``round((10 * x) ** 2)``;
  books ``round(2 * x)``, pickaxe/sword level ``round(4 * x)`` (1 wood .. 4 diamond), armour level
  ``round(2 * x)`` (1 iron, 2 diamond), enchantments and bow ``round(x)`` (1 fire, 2 ice).
- Vitals and attributes in full Craftax are ``v / 10`` with a float health: printed as ``10 * x``
  rounded to one decimal, without the ``.0`` when whole (``8.5``, ``9``).
- Floor is ``floor / 10``: ``round(10 * x)``. Flags (sleeping, resting, spells, ladder open,
  boss vulnerable) are ``x > 0.5``.
- The light level is printed with two decimals: Python's correctly rounded ``f"{x:.2f}"`` of the
  float32 value. Same float32 in, same text out; storage must keep observations lossless.

``round`` above is numpy's round-half-to-even (``np.rint``); the stored values sit within float16
error of an integer, far from any half.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from utils.errors import UserError

__all__ = ["ObsLayout", "obs_layout", "render_text", "render_texts", "TEXT_ENV_NAMES"]

CLASSIC_ENV = "Craftax-Classic-Symbolic-v1"
FULL_ENV = "Craftax-Symbolic-v1"
TEXT_ENV_NAMES = (CLASSIC_ENV, FULL_ENV)
_PIXEL_TO_SYMBOLIC = {
    "Craftax-Classic-Pixels-v1": CLASSIC_ENV,
    "Craftax-Pixels-v1": FULL_ENV,
}

# Names indexed by craftax's enum values (BlockType, ItemType); tests check them against craftax.
_CLASSIC_BLOCKS = (
    "invalid", "out of bounds", "grass", "water", "stone", "tree", "wood", "path", "coal", "iron",
    "diamond", "crafting table", "furnace", "sand", "lava", "plant", "ripe plant",
)
_FULL_BLOCKS = _CLASSIC_BLOCKS + (
    "wall", "darkness", "mossy wall", "stalagmite", "sapphire", "ruby", "chest", "fountain",
    "fire grass", "ice grass", "gravel", "fire tree", "ice shrub", "fire enchantment table",
    "ice enchantment table", "necromancer", "grave", "grave", "grave", "vulnerable necromancer",
)
_FULL_ITEMS = ("none", "torch", "ladder down", "ladder up", "blocked ladder down")

# Classic mob channels: zombies, cows, skeletons, arrows (craftax_classic renderer order).
_CLASSIC_MOBS = ("zombie", "cow", "skeleton", "arrow")
# Full Craftax mob channels are class * 8 + type_id for the classes melee, passive, ranged, mob
# projectile, player projectile (craftax renderer). Names follow the texture lists in
# craftax/craftax/constants.py; passive types 3..7 do not exist in the game.
_MELEE = ("zombie", "gnome warrior", "orc soldier", "lizard", "knight", "troll", "pigman",
          "frost troll")
_PASSIVE = ("cow", "bat", "snail") + tuple(f"unknown passive mob {i}" for i in range(3, 8))
_RANGED = ("skeleton", "gnome archer", "orc mage", "kobold", "knight archer", "deep thing",
           "fire elemental", "ice elemental")
_PROJECTILES = ("arrow", "dagger", "fireball", "iceball", "arrow", "slimeball", "fireball",
                "iceball")
_FULL_MOBS = _MELEE + _PASSIVE + _RANGED + _PROJECTILES + tuple(f"your {p}" for p in _PROJECTILES)

_CLASSIC_BACKGROUND = frozenset({"grass", "sand", "path"})
_FULL_BACKGROUND = _CLASSIC_BACKGROUND | {"fire grass", "ice grass", "darkness"}

_CLASSIC_INVENTORY = (
    "wood", "stone", "coal", "iron", "diamond", "sapling", "wood pickaxe", "stone pickaxe",
    "iron pickaxe", "wood sword", "stone sword", "iron sword",
)
_FULL_INVENTORY = (
    "wood", "stone", "coal", "iron", "diamond", "sapphire", "ruby", "sapling", "torch", "arrow",
    "book", "pickaxe", "sword", "sword enchantment", "bow enchantment", "bow",
)
_FULL_COUNTED = 10  # wood .. arrow are sqrt-coded counts
_POTIONS = ("red potion", "green potion", "blue potion", "pink potion", "cyan potion",
            "yellow potion")
_CLASSIC_VITALS = ("health", "food", "drink", "energy")
_FULL_VITALS = ("health", "food", "drink", "energy", "mana", "XP", "dexterity", "strength",
                "intelligence")
_ARMOUR = ("helmet", "chestplate", "leggings", "boots")
_FULL_STATUS = ("light", "sleeping", "resting", "learned fireball", "learned iceball", "floor",
                "ladder open", "boss vulnerable")
_MATERIALS = ("", "wood", "stone", "iron", "diamond")
_ARMOUR_MATERIALS = ("", "iron", "diamond")
_ENCHANTMENTS = ("", "fire", "ice")
_FLOORS = ("overworld", "dungeon", "gnomish mines", "sewers", "vaults", "troll mines",
           "fire realm", "ice realm", "graveyard")
_BOSS_FLOOR = 8
_MONSTERS_TO_OPEN_LADDER = 8  # craftax MONSTERS_KILLED_TO_CLEAR_LEVEL
# Direction one-hot is player_direction - 1 with craftax's Action LEFT=1, RIGHT=2, UP=3, DOWN=4.
_DIRECTIONS = (("left (west)", (0, -1)), ("right (east)", (0, 1)), ("up (north)", (-1, 0)),
               ("down (south)", (1, 0)))


@dataclass(frozen=True)
class ObsLayout:
    """How one env's flat symbolic observation is sliced.

    The map is ``view_rows x view_cols`` tiles, row-major, each ``channels`` floats: block one-hot,
    then item one-hot (full only), then mob flags, then (full only) a lit flag. The player is at
    the centre tile. After the map come the named ``tail`` segments in order.
    """

    env_name: str
    title: str
    view_rows: int
    view_cols: int
    block_names: tuple[str, ...]
    item_names: tuple[str, ...]
    mob_names: tuple[str, ...]
    has_light_channel: bool
    background_blocks: frozenset[str]
    inventory_names: tuple[str, ...]
    vital_names: tuple[str, ...]
    tail: tuple[tuple[str, int], ...]

    @property
    def view_shape(self) -> tuple[int, int]:
        return self.view_rows, self.view_cols

    @property
    def centre(self) -> tuple[int, int]:
        return self.view_rows // 2, self.view_cols // 2

    @property
    def channels(self) -> int:
        return (len(self.block_names) + len(self.item_names) + len(self.mob_names)
                + int(self.has_light_channel))

    @property
    def map_size(self) -> int:
        return self.view_rows * self.view_cols * self.channels

    @property
    def obs_dim(self) -> int:
        return self.map_size + sum(size for _, size in self.tail)

    def channel_slice(self, part: str) -> slice:
        """Channels of ``part`` ("blocks", "items", "mobs", "light") within one tile."""
        sizes = {"blocks": len(self.block_names), "items": len(self.item_names),
                 "mobs": len(self.mob_names), "light": int(self.has_light_channel)}
        start = 0
        for name, size in sizes.items():
            if name == part:
                return slice(start, start + size)
            start += size
        raise KeyError(part)

    def tail_slice(self, name: str) -> slice:
        """Where tail segment ``name`` sits in the flat observation."""
        start = self.map_size
        for segment, size in self.tail:
            if segment == name:
                return slice(start, start + size)
            start += size
        raise KeyError(name)

    def offset(self, tile: int) -> tuple[int, int]:
        """(row, col) offset from the player of flat tile index ``tile``."""
        row, col = divmod(tile, self.view_cols)
        return row - self.centre[0], col - self.centre[1]


_LAYOUTS = {
    CLASSIC_ENV: ObsLayout(
        env_name=CLASSIC_ENV, title="Craftax-Classic", view_rows=7, view_cols=9,
        block_names=_CLASSIC_BLOCKS, item_names=(), mob_names=_CLASSIC_MOBS,
        has_light_channel=False, background_blocks=_CLASSIC_BACKGROUND,
        inventory_names=_CLASSIC_INVENTORY, vital_names=_CLASSIC_VITALS,
        tail=(("inventory", 12), ("vitals", 4), ("direction", 4), ("light", 1), ("sleeping", 1)),
    ),
    FULL_ENV: ObsLayout(
        env_name=FULL_ENV, title="Craftax", view_rows=9, view_cols=11,
        block_names=_FULL_BLOCKS, item_names=_FULL_ITEMS, mob_names=_FULL_MOBS,
        has_light_channel=True, background_blocks=_FULL_BACKGROUND,
        inventory_names=_FULL_INVENTORY, vital_names=_FULL_VITALS,
        tail=(("inventory", 16), ("potions", 6), ("vitals", 9), ("direction", 4), ("armour", 4),
              ("armour_enchantments", 4), ("status", 8)),
    ),
}


def obs_layout(env_name: str) -> ObsLayout:
    """The slicing of ``env_name``'s symbolic observation; a clear error for any other env."""
    layout = _LAYOUTS.get(env_name)
    if layout is not None:
        return layout
    if env_name in _PIXEL_TO_SYMBOLIC:
        raise UserError(
            f"text observations need symbolic observations, but {env_name} gives pixels; "
            f"use {_PIXEL_TO_SYMBOLIC[env_name]}"
        )
    raise UserError(
        f"no text renderer for env {env_name!r}; supported: {', '.join(TEXT_ENV_NAMES)}"
    )


# ---------------------------------------------------------------------------------------------
# Precomputed per-layout tables: done once so a batch costs a few numpy passes plus string joins.


@dataclass(frozen=True)
class _Tables:
    order: np.ndarray  # flat tile indices, nearest first
    rank: np.ndarray  # rank[tile] = position of tile in ``order``
    coords: tuple[str, ...]  # "(r,c)" per rank
    background: np.ndarray  # bool per block id
    background_ids: np.ndarray  # block ids counted, not listed, in name order
    block_names: np.ndarray  # object array, for fancy indexing
    mob_names: np.ndarray


@functools.cache
def _tables(env_name: str) -> _Tables:
    layout = _LAYOUTS[env_name]
    tiles = range(layout.view_rows * layout.view_cols)
    order = sorted(tiles, key=lambda t: (abs(layout.offset(t)[0]) + abs(layout.offset(t)[1]),
                                         *layout.offset(t)))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    background = np.array([name in layout.background_blocks for name in layout.block_names])
    background_ids = np.array(sorted(np.flatnonzero(background),
                                     key=lambda b: (layout.block_names[b], b)))
    return _Tables(
        order=np.array(order), rank=rank,
        coords=tuple("({},{})".format(*layout.offset(t)) for t in order),
        background=background, background_ids=background_ids,
        block_names=np.array(layout.block_names, dtype=object),
        mob_names=np.array(layout.mob_names, dtype=object),
    )


def _as_batch(obs: np.ndarray, layout: ObsLayout) -> np.ndarray:
    """Float32 [N, D] view of ``obs``, or a one-line error naming the expected size."""
    batch = np.asarray(obs)
    if batch.ndim != 2:
        raise UserError(f"render_texts expects a batch [N, {layout.obs_dim}] of "
                        f"{layout.env_name} observations, got shape {batch.shape}")
    if batch.shape[1] != layout.obs_dim:
        raise UserError(f"{layout.env_name} observations have {layout.obs_dim} values, "
                        f"got {batch.shape[1]} (shape {batch.shape}); is the env name right?")
    batch = batch.astype(np.float32, copy=False)
    if not np.isfinite(batch).all():
        raise UserError(f"{layout.env_name} observations contain NaN or infinite values")
    return batch


# ---------------------------------------------------------------------------------------------
# The map: what is where.


@dataclass
class _MapBatch:
    """Per-tile decodings of a batch, tiles in nearest-first order (axis 1)."""

    block: np.ndarray  # [N, T] block id
    lit: np.ndarray  # [N, T] bool: tile visible (always true in Classic)
    item: np.ndarray  # [N, T] item id, 0 = none (zeros in Classic)
    mobs: np.ndarray  # [N, T, M] bool


def _decode_map(batch: np.ndarray, layout: ObsLayout, tables: _Tables) -> _MapBatch:
    n = batch.shape[0]
    tiles = batch[:, : layout.map_size].reshape(n, len(tables.order), layout.channels)
    tiles = tiles[:, tables.order]
    blocks = tiles[:, :, layout.channel_slice("blocks")]
    if layout.has_light_channel:
        # Unlit tiles have every channel zeroed by craftax; only the lit flag says so.
        lit = tiles[:, :, layout.channel_slice("light")][:, :, 0] > 0.5
    else:
        lit = np.ones(tiles.shape[:2], dtype=bool)
    lit &= blocks.max(axis=2) > 0.5
    if layout.item_names:
        item = tiles[:, :, layout.channel_slice("items")].argmax(axis=2)
    else:
        item = np.zeros(tiles.shape[:2], dtype=np.int64)
    return _MapBatch(
        block=blocks.argmax(axis=2), lit=lit, item=np.where(lit, item, 0),
        mobs=(tiles[:, :, layout.channel_slice("mobs")] > 0.5) & lit[:, :, None],
    )


def _nearby_groups(
    m: _MapBatch, tables: _Tables, item_names: list[tuple[str, ...]], out_of_bounds: int
) -> list[dict[str, list[int]]]:
    """Per observation: object name -> tile ranks (nearest first), for everything listed."""
    groups: list[dict[str, list[int]]] = [{} for _ in range(m.block.shape[0])]

    def add(n_idx: np.ndarray, t_idx: np.ndarray, names: list[str]) -> None:
        for n, t, name in zip(n_idx.tolist(), t_idx.tolist(), names):
            ranks = groups[n].setdefault(name, [])
            if not ranks or ranks[-1] != t:  # two projectile types can share a name and tile
                ranks.append(t)

    listed = m.lit & ~tables.background[m.block] & (m.block != out_of_bounds)
    n_idx, t_idx = np.nonzero(listed)
    add(n_idx, t_idx, tables.block_names[m.block[n_idx, t_idx]].tolist())
    n_idx, t_idx = np.nonzero(m.item)
    add(n_idx, t_idx, [item_names[n][i] for n, i in zip(n_idx.tolist(),
                                                          m.item[n_idx, t_idx].tolist())])
    n_idx, t_idx, mob = np.nonzero(m.mobs)
    add(n_idx, t_idx, tables.mob_names[mob].tolist())
    return groups


def _format_groups(groups: dict[str, list[int]], coords: tuple[str, ...]) -> list[str]:
    ordered = sorted(groups.items(), key=lambda kv: (kv[1][0], kv[0]))
    return [f"- {name} at {', '.join(coords[t] for t in ranks)}" for name, ranks in ordered]


def _span(values: list[int]) -> str:
    return f"{values[0]}" if len(values) == 1 else f"{values[0]}..{values[-1]}"


def _edge_text(oob: np.ndarray, full_rows: list[int], full_cols: list[int],
               layout: ObsLayout) -> str:
    """Beyond-the-map tiles as row/col bands (the visible world is always a rectangle)."""
    r0, c0 = layout.centre
    bands = np.zeros_like(oob)
    bands[full_rows, :] = True
    bands[:, full_cols] = True
    if not np.array_equal(bands, oob):  # not bands: list tiles (cannot come from craftax)
        tiles = [f"({r - r0},{c - c0})" for r, c in zip(*np.nonzero(oob))]
        return "Beyond the map edge: " + ", ".join(tiles) + "."
    parts = []
    for lines, centre, names in ((full_rows, r0, ("rows", "north", "south")),
                                 (full_cols, c0, ("cols", "west", "east"))):
        for side, keep in ((names[1], lambda x: x < centre), (names[2], lambda x: x > centre)):
            band = [x - centre for x in lines if keep(x)]
            if band:
                parts.append(f"{names[0]} {_span(band)} ({side})")
    return "Beyond the map edge: " + ", ".join(parts) + "."


def _tile_text(mobs: list[str], item: str | None, block: str | None) -> str:
    if block is None:
        return "too dark to see"
    return " on ".join([*mobs, *([item] if item else []), block])


# ---------------------------------------------------------------------------------------------
# Numbers: inventory, vitals, status.


def _amount(value: float) -> str:
    """Tenths-precision value, integers without a decimal point (health 8.5, food 9)."""
    rounded = round(value, 1)
    return str(int(rounded)) if rounded == int(rounded) else f"{rounded:.1f}"


def _counts(names: tuple[str, ...], values: list[int]) -> list[str]:
    return [f"{name} {v}" for name, v in zip(names, values) if v > 0]


def _with_enchantment(thing: str, enchantment: int) -> str:
    name = _ENCHANTMENTS[enchantment] if 0 <= enchantment < len(_ENCHANTMENTS) else "unknown"
    return f"{thing} ({name} enchantment)" if enchantment else thing


def _level_name(table: tuple[str, ...], level: int) -> str:
    return table[level] if 0 <= level < len(table) else f"level {level}"


def _classic_tail(batch: np.ndarray, layout: ObsLayout) -> list[dict]:
    inventory = np.rint(batch[:, layout.tail_slice("inventory")] * 10).astype(int).tolist()
    vitals = np.rint(batch[:, layout.tail_slice("vitals")] * 10).astype(int).tolist()
    light = batch[:, layout.tail_slice("light")][:, 0].tolist()
    sleeping = (batch[:, layout.tail_slice("sleeping")][:, 0] > 0.5).tolist()
    return [
        {
            "inventory": _counts(layout.inventory_names, inventory[n]),
            "vitals": [", ".join(f"{name} {v}" for name, v in zip(layout.vital_names, vitals[n]))],
            "light": light[n], "sleeping": sleeping[n], "resting": False,
        }
        for n in range(batch.shape[0])
    ]


def _full_tail(batch: np.ndarray, layout: ObsLayout) -> list[dict]:
    inv = batch[:, layout.tail_slice("inventory")]
    counts = np.rint(np.square(inv[:, :_FULL_COUNTED] * 10)).astype(int).tolist()
    books = np.rint(inv[:, 10] * 2).astype(int).tolist()
    tools = np.rint(inv[:, 11:13] * 4).astype(int).tolist()  # pickaxe, sword levels
    bow = np.rint(inv[:, 13:16]).astype(int).tolist()  # sword ench, bow ench, bow
    potions = np.rint(np.square(batch[:, layout.tail_slice("potions")] * 10)).astype(int).tolist()
    vitals = (batch[:, layout.tail_slice("vitals")].astype(np.float64) * 10).tolist()
    armour = np.rint(batch[:, layout.tail_slice("armour")] * 2).astype(int).tolist()
    enchant = np.rint(batch[:, layout.tail_slice("armour_enchantments")]).astype(int).tolist()
    status = batch[:, layout.tail_slice("status")]
    flags = (status > 0.5).tolist()
    floors = np.rint(status[:, 5] * 10).astype(int).tolist()
    light = status[:, 0].tolist()
    out = []
    for n in range(batch.shape[0]):
        sword_ench, bow_ench, has_bow = bow[n]
        items = _counts(layout.inventory_names[:_FULL_COUNTED], counts[n])
        items += _counts(("book",), [books[n]])
        if tools[n][0] > 0:
            items.append(f"{_level_name(_MATERIALS, tools[n][0])} pickaxe")
        if tools[n][1] > 0:
            items.append(_with_enchantment(f"{_level_name(_MATERIALS, tools[n][1])} sword",
                                           sword_ench))
        if has_bow > 0:
            items.append(_with_enchantment("bow", bow_ench))
        items += _counts(_POTIONS, potions[n])
        for slot, level, ench in zip(_ARMOUR, armour[n], enchant[n]):
            if level > 0:
                items.append(_with_enchantment(
                    f"{_level_name(_ARMOUR_MATERIALS, level)} {slot}", ench))
        v = [_amount(x) for x in vitals[n]]
        names = layout.vital_names
        learned = [s for s, f in zip(("fireball", "iceball"), flags[n][3:5]) if f]
        out.append({
            "inventory": items,
            "vitals": [", ".join(f"{k} {x}" for k, x in zip(names[:5], v[:5])),
                       ", ".join(f"{k} {x}" for k, x in zip(names[5:], v[5:]))],
            "light": light[n], "sleeping": flags[n][1], "resting": flags[n][2],
            "spells": "Spells learned: " + (", ".join(learned) if learned else "none") + ".",
            "floor": floors[n], "ladder_open": flags[n][6], "boss_vulnerable": flags[n][7],
        })
    return out


def _floor_text(floor: int, ladder_open: bool, boss_vulnerable: bool) -> str:
    name = _FLOORS[floor] if 0 <= floor < len(_FLOORS) else "unknown"
    text = f"Floor {floor} ({name})"
    if floor == _BOSS_FLOOR:
        state = "vulnerable" if boss_vulnerable else "not vulnerable yet"
        return f"{text}; the necromancer is {state}."
    if ladder_open:
        return f"{text}; ladder down open."
    return (f"{text}; ladder down blocked until {_MONSTERS_TO_OPEN_LADDER} monsters are killed "
            "on this floor.")


# ---------------------------------------------------------------------------------------------
# Assembly.


def _header(layout: ObsLayout) -> str:
    return (f"{layout.title} observation. Map: {layout.view_rows} rows x {layout.view_cols} cols "
            "centred on you at (0,0); positions are (row, col) offsets from you, "
            "row<0 = up (north), row>0 = down (south), col<0 = left (west), col>0 = right (east).")


def render_texts(obs: np.ndarray, env_name: str) -> list[str]:
    """Canonical text of each observation in a batch ``[N, D]`` (see the module docstring)."""
    layout = obs_layout(env_name)
    batch = _as_batch(obs, layout)
    tables = _tables(env_name)
    full = layout.has_light_channel
    m = _decode_map(batch, layout, tables)
    tails = _full_tail(batch, layout) if full else _classic_tail(batch, layout)

    # Ladders down show as blocked while the floor is uncleared, as craftax's pixels do.
    blocked_items = _FULL_ITEMS[:2] + ("blocked ladder down",) + _FULL_ITEMS[3:]
    item_names = [
        (_FULL_ITEMS if tail.get("ladder_open", True) else blocked_items) for tail in tails
    ]
    out_of_bounds = layout.block_names.index("out of bounds")
    groups = _nearby_groups(m, tables, item_names, out_of_bounds)

    background = (m.block[:, :, None] == tables.background_ids) & m.lit[:, :, None]
    background_counts = background.sum(axis=1).tolist()
    dark_counts = (~m.lit).sum(axis=1).tolist()
    oob = (m.block == out_of_bounds) & m.lit
    any_oob = oob.any(axis=1).tolist()
    oob_grid = oob[:, tables.rank].reshape(-1, *layout.view_shape)

    direction = batch[:, layout.tail_slice("direction")]
    facing = np.where(direction.max(axis=1) > 0.5, direction.argmax(axis=1), -1).tolist()
    facing_rank = [
        int(tables.rank[(layout.centre[0] + dr) * layout.view_cols + layout.centre[1] + dc])
        for _, (dr, dc) in _DIRECTIONS
    ]
    block_list, lit_list, item_list = m.block.tolist(), m.lit.tolist(), m.item.tolist()
    header = _header(layout)
    bg_names = [layout.block_names[b] for b in tables.background_ids]

    texts = []
    for n, tail in enumerate(tails):
        lines = [header]
        if full:
            lines.append(_floor_text(tail["floor"], tail["ladder_open"], tail["boss_vulnerable"]))
        if facing[n] < 0:
            lines.append("Facing: unknown.")
        else:
            word, _ = _DIRECTIONS[facing[n]]
            t = facing_rank[facing[n]]
            lit = lit_list[n][t]
            tile = _tile_text(
                list(dict.fromkeys(layout.mob_names[i] for i in np.flatnonzero(m.mobs[n, t]))),
                item_names[n][item_list[n][t]] if item_list[n][t] else None,
                layout.block_names[block_list[n][t]] if lit else None,
            )
            lines.append(f"Facing: {word}; at {tables.coords[t]}: {tile}.")
        nearby = _format_groups(groups[n], tables.coords)
        lines += ["Nearby (nearest first):", *nearby] if nearby else ["Nearby: nothing listed."]
        ground = ", ".join(f"{name} {c}" for name, c in zip(bg_names, background_counts[n]) if c)
        ground_line = f"Ground not listed: {ground}." if ground else "Ground not listed: none."
        if full and dark_counts[n]:
            ground_line += f" Too dark to see: {dark_counts[n]} tiles."
        lines.append(ground_line)
        if any_oob[n]:
            full_rows = np.flatnonzero(oob_grid[n].all(axis=1)).tolist()
            full_cols = np.flatnonzero(oob_grid[n].all(axis=0)).tolist()
            lines.append(_edge_text(oob_grid[n], full_rows, full_cols, layout))
        inventory = tail["inventory"]
        lines.append("Inventory: " + (", ".join(inventory) if inventory else "empty") + ".")
        lines.append(tail["vitals"][0][:1].upper() + tail["vitals"][0][1:] + ".")
        lines += [v + "." for v in tail["vitals"][1:]]
        state = "asleep" if tail["sleeping"] else "resting" if tail["resting"] else "awake"
        status = f"Light {tail['light']:.2f}; {state}."
        if full:
            status += " " + tail["spells"]
        lines.append(status)
        texts.append("\n".join(lines))
    return texts


def render_text(obs: np.ndarray, env_name: str) -> str:
    """Canonical text of one observation ``[D]``; identical to its row in ``render_texts``."""
    layout = obs_layout(env_name)
    single = np.asarray(obs)
    if single.ndim != 1:
        raise UserError(f"render_text expects one {env_name} observation of shape "
                        f"[{layout.obs_dim}], got shape {single.shape}; use render_texts "
                        "for a batch")
    return render_texts(single[None], env_name)[0]
