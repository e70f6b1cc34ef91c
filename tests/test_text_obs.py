"""The text renderer against real game states: what is where, numbers, names and errors.

States are built with known contents and turned into observations by craftax's own symbolic
renderer, so every assertion compares the text with the game state rather than with itself.
Classic states come from a real (jitted, cached) reset; the full-Craftax state is assembled by
hand from the shapes of a traced reset, which avoids the minute-long compile of full world
generation. Full Craftax also ships ``render_craftax_text``; the text must agree with it on
what is at every tile.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from craftax.craftax.constants import BlockType as FullBlock
from craftax.craftax.constants import ItemType
from craftax.craftax.craftax_state import Mobs as FullMobs
from craftax.craftax.renderer import render_craftax_symbolic as full_symbolic
from craftax.craftax.renderer import render_craftax_text
from craftax.craftax_classic.constants import OBS_DIM as CLASSIC_OBS_DIM
from craftax.craftax_classic.constants import BlockType as ClassicBlock
from craftax.craftax_classic.renderer import render_craftax_symbolic as classic_symbolic
from craftax.craftax_env import make_craftax_env_from_name

from utils.text_obs import obs_layout, render_text, render_texts

CLASSIC = "Craftax-Classic-Symbolic-v1"
FULL = "Craftax-Symbolic-v1"
COORD = re.compile(r"\((-?\d+),(-?\d+)\)")


# ----------------------------------------------------------------------------- helpers


def nearby(text: str) -> dict[str, list[tuple[int, int]]]:
    """Parse the '- name at (r,c), ...' lines back into name -> offsets."""
    out = {}
    for line in text.splitlines():
        match = re.fullmatch(r"- (.+?) at (.*)", line)
        if match:
            out[match[1]] = [(int(r), int(c)) for r, c in COORD.findall(match[2])]
    return out


def by_tile(text: str) -> dict[tuple[int, int], set[str]]:
    out: dict[tuple[int, int], set[str]] = {}
    for name, offsets in nearby(text).items():
        for offset in offsets:
            out.setdefault(offset, set()).add(name)
    return out


def ground_counts(text: str) -> dict[str, int]:
    line = next(l for l in text.splitlines() if l.startswith("Ground not listed:"))
    body = line.split(":", 1)[1].split(".")[0]
    return {m[1].strip(): int(m[2]) for m in re.finditer(r"([a-z ]+?) (\d+)", body)}


def line_starting(text: str, prefix: str) -> str:
    return next(l for l in text.splitlines() if l.startswith(prefix))


# ----------------------------------------------------------------------------- Classic


@pytest.fixture(scope="module")
def classic():
    env = make_craftax_env_from_name(CLASSIC, auto_reset=False)
    reset = jax.jit(env.reset)
    render = jax.jit(classic_symbolic)

    def obs_of(state) -> np.ndarray:
        return np.asarray(render(state))

    return env, reset, obs_of


def classic_state(classic, seed: int = 0):
    env, reset, _ = classic
    return reset(jax.random.PRNGKey(seed), env.default_params)[1]


def place(state, offsets_blocks, fill=ClassicBlock.GRASS.value, rows=7, cols=9):
    """Fill the view with ``fill`` and put blocks at (row, col) offsets from the player."""
    r0, c0 = (int(x) for x in state.player_position)
    grid = state.map.at[r0 - rows // 2 : r0 + rows // 2 + 1, c0 - cols // 2 : c0 + cols // 2 + 1]
    new_map = grid.set(fill)
    for (dr, dc), block in offsets_blocks:
        new_map = new_map.at[r0 + dr, c0 + dc].set(block)
    return state.replace(map=new_map)


def like(old, value):
    """``value`` with ``old``'s dtype, so the jitted renderer is not recompiled."""
    return jnp.asarray(value, dtype=jnp.asarray(old).dtype)


def with_mobs(mobs, offsets, player):
    n = mobs.mask.shape[0]
    positions = np.zeros((n, 2), dtype=np.int32)
    mask = np.zeros(n, dtype=bool)
    for i, (dr, dc) in enumerate(offsets):
        positions[i] = np.asarray(player) + (dr, dc)
        mask[i] = True
    return mobs.replace(position=jnp.asarray(positions), mask=jnp.asarray(mask))


def test_layout_matches_craftax():
    for env_name, blocks, view in ((CLASSIC, ClassicBlock, CLASSIC_OBS_DIM),
                                   (FULL, FullBlock, (9, 11))):
        layout = obs_layout(env_name)
        env = make_craftax_env_from_name(env_name, auto_reset=False)
        assert layout.obs_dim == env.observation_space(env.default_params).shape[0]
        assert layout.view_shape == tuple(view)
        assert len(layout.block_names) == len(blocks)
        renamed = {"WALL_MOSS": "mossy wall", "GRAVE2": "grave", "GRAVE3": "grave",
                   "ENCHANTMENT_TABLE_FIRE": "fire enchantment table",
                   "ENCHANTMENT_TABLE_ICE": "ice enchantment table",
                   "NECROMANCER_VULNERABLE": "vulnerable necromancer"}
        for block in blocks:
            expected = renamed.get(block.name, block.name.lower().replace("_", " "))
            assert layout.block_names[block.value] == expected
    assert obs_layout(CLASSIC).obs_dim == 1345 and obs_layout(FULL).obs_dim == 8268
    full = obs_layout(FULL)
    assert [full.item_names[i.value] for i in ItemType] == [
        "none", "torch", "ladder down", "ladder up", "blocked ladder down"]


def test_classic_objects_at_known_offsets(classic):
    _, _, obs_of = classic
    state = place(classic_state(classic), [
        ((-2, 1), ClassicBlock.TREE.value), ((0, 3), ClassicBlock.TREE.value),
        ((1, -1), ClassicBlock.WATER.value), ((3, 4), ClassicBlock.STONE.value),
        ((-3, -4), ClassicBlock.CRAFTING_TABLE.value), ((2, 2), ClassicBlock.DIAMOND.value),
        ((0, -1), ClassicBlock.SAND.value), ((-1, 0), ClassicBlock.LAVA.value),
    ])
    player = state.player_position
    state = state.replace(
        zombies=with_mobs(state.zombies, [(1, 2)], player),
        cows=with_mobs(state.cows, [(-1, -2), (2, -3)], player),
        skeletons=with_mobs(state.skeletons, [(-3, 3)], player),
        arrows=with_mobs(state.arrows, [(0, 1)], player),
        player_direction=like(state.player_direction, 3),  # up
    )
    text = render_text(obs_of(state), CLASSIC)
    assert nearby(text) == {
        "lava": [(-1, 0)],
        "arrow": [(0, 1)],
        "water": [(1, -1)],
        "tree": [(-2, 1), (0, 3)],
        "zombie": [(1, 2)],
        "cow": [(-1, -2), (2, -3)],
        "diamond": [(2, 2)],
        "skeleton": [(-3, 3)],
        "crafting table": [(-3, -4)],
        "stone": [(3, 4)],
    }
    # Groups come nearest first; ties by name.
    names = [l[2:].split(" at ")[0] for l in text.splitlines() if l.startswith("- ")]
    assert names == ["lava", "arrow", "water", "tree", "cow", "zombie", "diamond",
                     "skeleton", "crafting table", "stone"]
    assert ground_counts(text) == {"grass": 7 * 9 - 8, "sand": 1}
    assert "Facing: up (north); at (-1,0): lava." in text
    assert "row<0 = up (north)" in text.splitlines()[0]
    assert "Beyond the map edge" not in text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classic_text_agrees_with_state_map(classic, seed):
    """Every block of a generated world is named at its true (row, col) offset."""
    _, _, obs_of = classic
    state = classic_state(classic, seed)
    layout = obs_layout(CLASSIC)
    text = render_text(obs_of(state), CLASSIC)
    world = np.asarray(state.map)
    pr, pc = (int(x) for x in state.player_position)
    expected_listed, expected_ground = set(), {}
    for dr in range(-3, 4):
        for dc in range(-4, 5):
            name = layout.block_names[world[pr + dr, pc + dc]]
            if name in layout.background_blocks:
                expected_ground[name] = expected_ground.get(name, 0) + 1
            else:
                expected_listed.add((name, (dr, dc)))
    listed = {(name, off) for name, offs in nearby(text).items() for off in offs}
    assert listed == expected_listed
    assert ground_counts(text) == expected_ground


def test_classic_numbers_direction_light(classic):
    _, _, obs_of = classic
    state = classic_state(classic)
    inventory = {"wood": 3, "sapling": 1, "wood_pickaxe": 1, "iron_sword": 1, "diamond": 9}
    state = state.replace(
        inventory=state.inventory.replace(
            **{k: like(getattr(state.inventory, k), v) for k, v in inventory.items()}),
        player_health=like(state.player_health, 7), player_food=like(state.player_food, 5),
        player_drink=like(state.player_drink, 4), player_energy=like(state.player_energy, 2),
        player_direction=like(state.player_direction, 1),
        is_sleeping=like(state.is_sleeping, True), light_level=like(state.light_level, 0.5),
    )
    text = render_text(obs_of(state), CLASSIC)
    assert "Inventory: wood 3, diamond 9, sapling 1, wood pickaxe 1, iron sword 1." in text
    assert "Health 7, food 5, drink 4, energy 2." in text
    assert line_starting(text, "Facing:").startswith("Facing: left (west); at (0,-1):")
    assert "Light 0.50; asleep." in text
    awake = render_text(obs_of(state.replace(is_sleeping=like(state.is_sleeping, False),
                                             player_direction=like(state.player_direction, 4))),
                        CLASSIC)
    assert "; awake." in awake and "Facing: down (south); at (1,0):" in awake
    assert "Inventory: empty." in render_text(obs_of(classic_state(classic)), CLASSIC)


def test_docstring_example_is_real(classic):
    """The Classic example in utils/text_obs.py is exactly what this state renders to."""
    import utils.text_obs

    _, _, obs_of = classic
    block = utils.text_obs.__doc__.split("re-renders this exact state)::\n\n", 1)[1]
    lines = [l.strip() for l in block.split("\n\n", 1)[0].splitlines()]
    body = lines.index("Facing: right (east); at (0,1): tree.")
    expected = "\n".join([" ".join(lines[:body]), *lines[body:]])

    state = classic_state(classic, 0)
    state = state.replace(player_position=like(state.player_position, [1, 20]))
    player = state.player_position
    inventory = {"wood": 3, "sapling": 1, "wood_pickaxe": 1}
    state = state.replace(
        cows=with_mobs(state.cows, [(2, -3)], player),
        zombies=with_mobs(state.zombies, [(1, -4)], player),
        inventory=state.inventory.replace(
            **{k: like(getattr(state.inventory, k), v) for k, v in inventory.items()}),
        player_health=like(state.player_health, 7), player_food=like(state.player_food, 5),
        player_direction=like(state.player_direction, 2),
    )
    assert render_text(obs_of(state), CLASSIC) == expected


def test_classic_map_edge(classic):
    _, _, obs_of = classic
    state = classic_state(classic)
    state = state.replace(player_position=like(state.player_position, [1, 62]))
    text = render_text(obs_of(state), CLASSIC)
    # Row 1 sees rows -1..5 of the world: world rows -2, -1 are beyond the edge (offsets -3, -2);
    # col 62 of 64 sees cols up to 66: offsets 2..4 are beyond the east edge.
    assert "Beyond the map edge: rows -3..-2 (north), cols 2..4 (east)." in text
    assert "out of bounds" not in text


# ----------------------------------------------------------------------------- full Craftax

FULL_PLAYER = (24, 24)
FULL_LEVEL = 1
# Every mob name craftax has, one per channel (class, type), at distinct tiles.
FULL_MOB_CLASSES = {
    "melee_mobs": 8, "passive_mobs": 3, "ranged_mobs": 8, "mob_projectiles": 8,
    "player_projectiles": 8,
}


def _mob_offsets():
    """Distinct lit offsets (rows -4..0) for every mob (class, type), away from the items."""
    free = [(r, c) for r in range(-4, 1) for c in range(-5, 6) if (r, c) != (0, 0)]
    out, i = {}, 0
    for cls, count in FULL_MOB_CLASSES.items():
        for type_id in range(count):
            out[(cls, type_id)] = free[i]
            i += 1
    return out


def _mobs(level_count: int, cls: str, count: int, offsets: dict) -> FullMobs:
    pos = np.zeros((level_count, 8, 2), dtype=np.int32)
    mask = np.zeros((level_count, 8), dtype=bool)
    type_id = np.zeros((level_count, 8), dtype=np.int32)
    for t in range(count):
        pos[FULL_LEVEL, t] = np.add(FULL_PLAYER, offsets[(cls, t)])
        mask[FULL_LEVEL, t] = True
        type_id[FULL_LEVEL, t] = t
    return FullMobs(position=jnp.asarray(pos), health=jnp.ones((level_count, 8)),
                    mask=jnp.asarray(mask), attack_cooldown=jnp.zeros((level_count, 8), int),
                    type_id=jnp.asarray(type_id))


@pytest.fixture(scope="module")
def full_state():
    """A dungeon-floor state with every mob type, items, dark tiles and a rich inventory."""
    env = make_craftax_env_from_name(FULL, auto_reset=False)
    shapes = jax.eval_shape(env.reset, jax.random.PRNGKey(0), env.default_params)[1]
    state = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    levels, rows, cols = state.map.shape
    pr, pc = FULL_PLAYER
    world = np.full((levels, rows, cols), FullBlock.PATH.value, dtype=np.int32)
    items = np.zeros_like(world)
    light = np.ones((levels, rows, cols), dtype=np.float32)
    world[FULL_LEVEL, pr + 1, pc + 2] = FullBlock.CHEST.value
    world[FULL_LEVEL, pr + 2, pc - 3] = FullBlock.WALL.value
    world[FULL_LEVEL, pr + 2, pc - 4] = FullBlock.WALL.value
    world[FULL_LEVEL, pr + 1, pc - 1] = FullBlock.DARKNESS.value
    world[FULL_LEVEL, pr + 3, pc + 3] = FullBlock.SAPPHIRE.value
    world[FULL_LEVEL, pr + 3, pc + 4] = FullBlock.FOUNTAIN.value
    items[FULL_LEVEL, pr + 2, pc + 1] = ItemType.LADDER_DOWN.value
    items[FULL_LEVEL, pr + 1, pc + 3] = ItemType.TORCH.value
    items[FULL_LEVEL, pr + 1, pc] = ItemType.LADDER_UP.value
    light[FULL_LEVEL, pr + 4, :] = 0.0  # bottom view row unlit
    light[FULL_LEVEL, pr + 3, pc - 5] = 0.01  # below craftax's 0.05 threshold
    offsets = _mob_offsets()
    inventory = state.inventory.replace(
        wood=jnp.int32(4), torches=jnp.int32(2), arrows=jnp.int32(17), books=jnp.int32(1),
        pickaxe=jnp.int32(2), sword=jnp.int32(3), bow=jnp.int32(1),
        potions=jnp.array([1, 0, 0, 0, 0, 3], jnp.int32), armour=jnp.array([1, 0, 2, 0], jnp.int32),
    )
    return state.replace(
        map=jnp.asarray(world), item_map=jnp.asarray(items), light_map=jnp.asarray(light),
        player_position=jnp.array(FULL_PLAYER, jnp.int32), player_level=jnp.int32(FULL_LEVEL),
        player_direction=jnp.int32(4),  # down
        monsters_killed=jnp.zeros(levels, jnp.int32).at[FULL_LEVEL].set(3),
        player_health=jnp.float32(8.5), player_food=jnp.int32(9), player_drink=jnp.int32(8),
        player_energy=jnp.int32(7), player_mana=jnp.int32(6), player_xp=jnp.int32(1),
        player_dexterity=jnp.int32(1), player_strength=jnp.int32(2),
        player_intelligence=jnp.int32(3), inventory=inventory,
        sword_enchantment=jnp.int32(1), bow_enchantment=jnp.int32(2),
        armour_enchantments=jnp.array([2, 0, 0, 0], jnp.int32),
        learned_spells=jnp.array([True, False]), light_level=jnp.float32(0.987),
        boss_timesteps_to_spawn_this_round=jnp.int32(1),
        **{cls: _mobs(levels, cls, n, offsets) for cls, n in FULL_MOB_CLASSES.items()},
    )


@pytest.fixture(scope="module")
def full_text(full_state):
    obs = np.asarray(jax.jit(full_symbolic)(full_state))
    return obs, render_text(obs, FULL)


def test_full_floor_ladder_items_and_darkness(full_text):
    _, text = full_text
    assert text.splitlines()[0].startswith("Craftax observation. Map: 9 rows x 11 cols")
    assert ("Floor 1 (dungeon); ladder down blocked until 8 monsters are killed on this floor."
            in text)
    tiles = nearby(text)
    assert tiles["blocked ladder down"] == [(2, 1)]
    assert tiles["ladder up"] == [(1, 0)]
    assert tiles["torch"] == [(1, 3)]
    assert tiles["chest"] == [(1, 2)]
    assert tiles["wall"] == [(2, -3), (2, -4)]
    assert tiles["sapphire"] == [(3, 3)] and tiles["fountain"] == [(3, 4)]
    assert "Facing: down (south); at (1,0): ladder up on path." in text
    # 11 tiles in the unlit bottom row plus one tile lit below the threshold.
    assert "Too dark to see: 12 tiles." in text
    assert ground_counts(text) == {"path": 99 - 12 - 6, "darkness": 1}


def test_full_mob_names_and_positions(full_text):
    _, text = full_text
    offsets = _mob_offsets()
    names = {
        "melee_mobs": ["zombie", "gnome warrior", "orc soldier", "lizard", "knight", "troll",
                       "pigman", "frost troll"],
        "passive_mobs": ["cow", "bat", "snail"],
        "ranged_mobs": ["skeleton", "gnome archer", "orc mage", "kobold", "knight archer",
                        "deep thing", "fire elemental", "ice elemental"],
        "mob_projectiles": ["arrow", "dagger", "fireball", "iceball", "arrow", "slimeball",
                            "fireball", "iceball"],
        "player_projectiles": ["your arrow", "your dagger", "your fireball", "your iceball",
                               "your arrow", "your slimeball", "your fireball", "your iceball"],
    }
    tiles = by_tile(text)
    for (cls, type_id), offset in offsets.items():
        assert names[cls][type_id] in tiles[offset], (cls, type_id, offset)


def _craftax_tiles(state) -> dict[tuple[int, int], list[str] | None]:
    """craftax's own text renderer, parsed: (row, col) -> [mob?, item?, block] or None if dark.

    Its lines read ``col, row: thing on thing`` (column first).
    """
    out = {}
    map_part = render_craftax_text(state).split("\n\nInventory:")[0]
    for line in map_part.splitlines()[1:]:
        where, what = line.split(": ", 1)
        col, row = (int(x) for x in where.split(", "))
        out[(row, col)] = None if what == "Darkness" else what.split(" on ")
    return out


def test_full_agrees_with_craftax_text_renderer(full_state, full_text):
    """Same thing at every tile as craftax's render_craftax_text (names mapped to ours)."""
    _, text = full_text
    layout = obs_layout(FULL)
    ours = by_tile(text)
    aliases = {"archer": "knight archer"}

    def our_name(theirs: str) -> str:
        theirs = theirs.lower()
        if theirs.endswith(" (player)"):
            return "your " + theirs.removesuffix(" (player)")
        if theirs.upper() in FullBlock.__members__:
            return layout.block_names[FullBlock[theirs.upper()].value]
        if theirs.upper() in ItemType.__members__:
            name = layout.item_names[ItemType[theirs.upper()].value]
            return "blocked ladder down" if name == "ladder down" else name  # floor not cleared
        return aliases.get(theirs, theirs)

    dark = 0
    for offset, things in _craftax_tiles(full_state).items():
        if things is None:
            dark += 1
            assert offset not in ours
            continue
        expected = {our_name(t) for t in things} - layout.background_blocks
        # craftax names only one mob per tile; every tile here holds at most one.
        assert ours.get(offset, set()) == expected, offset
    assert f"Too dark to see: {dark} tiles." in text


def test_full_inventory_vitals_status(full_text):
    _, text = full_text
    assert ("Inventory: wood 4, torch 2, arrow 17, book 1, stone pickaxe, "
            "iron sword (fire enchantment), bow (ice enchantment), red potion 1, "
            "yellow potion 3, iron helmet (ice enchantment), diamond leggings.") in text
    assert "Health 8.5, food 9, drink 8, energy 7, mana 6." in text
    assert "XP 1, dexterity 1, strength 2, intelligence 3." in text
    assert "Light 0.99; awake. Spells learned: fireball." in text


def test_full_boss_floor_and_open_ladder(full_text):
    obs, _ = full_text
    layout = obs_layout(FULL)
    status = layout.tail_slice("status")
    edited = obs.copy()
    edited[status.start + 6] = 1.0  # ladder open
    text = render_text(edited, FULL)
    assert "Floor 1 (dungeon); ladder down open." in text
    assert nearby(text)["ladder down"] == [(2, 1)]
    edited[status.start + 5] = 0.8  # floor 8
    edited[status.start + 7] = 1.0
    assert "Floor 8 (graveyard); the necromancer is vulnerable." in render_text(edited, FULL)


# ------------------------------------------------------------------- batch, purity, errors


def test_batch_equals_single_and_is_pure(classic, full_text):
    _, _, obs_of = classic
    classic_obs = np.stack([obs_of(classic_state(classic, s)) for s in range(4)])
    rng = np.random.default_rng(0)
    layout = obs_layout(CLASSIC)
    random_obs = rng.random((4, layout.obs_dim)).astype(np.float32)  # arbitrary, must not crash
    batch = np.concatenate([classic_obs, random_obs])
    texts = render_texts(batch, CLASSIC)
    assert texts == [render_text(o, CLASSIC) for o in batch]
    assert texts == render_texts(jnp.asarray(batch), CLASSIC)  # live JAX arrays work too
    assert len(set(texts[:4])) == 4
    full_obs, full = full_text
    assert render_texts(np.stack([full_obs, full_obs]), FULL) == [full, full]
    assert render_text(full_obs.astype(np.float64), FULL) == full


def test_errors():
    with pytest.raises(ValueError, match="symbolic"):
        render_text(np.zeros(1345), "Craftax-Classic-Pixels-v1")
    with pytest.raises(ValueError, match="Craftax-Symbolic-v1"):
        obs_layout("Craftax-Pixels-v1")
    with pytest.raises(ValueError, match="supported"):
        render_text(np.zeros(1345), "CartPole-v1")
    with pytest.raises(ValueError, match="1345 values, got 8268"):
        render_text(np.zeros(8268), CLASSIC)
    with pytest.raises(ValueError, match=r"8268 values, got 1345"):
        render_texts(np.zeros((2, 1345)), FULL)
    with pytest.raises(ValueError, match="render_texts"):
        render_text(np.zeros((2, 1345)), CLASSIC)
    with pytest.raises(ValueError, match=r"\[N, 1345\]"):
        render_texts(np.zeros(1345), CLASSIC)
    with pytest.raises(ValueError, match="NaN"):
        render_text(np.full(1345, np.nan), CLASSIC)
    assert render_texts(np.zeros((0, 8268), np.float32), FULL) == []
