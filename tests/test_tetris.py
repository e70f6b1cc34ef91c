"""Tetris env rules, reward modes, action modes and JAX transformations.

Boards are written directly into the state and checked against plain-numpy references, so a
wrong shift, score or shaping sign fails here rather than silently in training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from utils.envs.tetris import OBS_DIM, Action, TetrisEnv, TetrisParams, TetrisState
from utils.envs.tetris_pieces import BOARD_H, BOARD_W, PIECE_NAMES

I, O, T, S, Z, J, L = range(7)
KEY = jax.random.PRNGKey(0)

DIRECT = TetrisEnv("direct")
PLACEMENT = TetrisEnv("placement")
LINES_ONLY = TetrisEnv("direct", reward_mode="lines_only")
SURVIVAL = TetrisEnv("direct", reward_mode="survival")
# Gravity far away so that single actions can be checked in isolation.
NO_GRAVITY = DIRECT.default_params.replace(gravity_period=10**6)


def step(env: TetrisEnv, state: TetrisState, action: int, params: TetrisParams | None = None):
    """Always pass params explicitly: one compiled step per env for the whole file."""
    params = NO_GRAVITY if params is None else params
    return env.step(KEY, state, jnp.int32(action), params)


def fresh(env: TetrisEnv = DIRECT, seed: int = 0) -> TetrisState:
    return env.reset(jax.random.PRNGKey(seed), NO_GRAVITY)[1]


def with_piece(state: TetrisState, piece: int, rot: int, row: int, col: int, board=None) -> TetrisState:
    state = state.replace(
        piece=jnp.int32(piece), rot=jnp.int32(rot), row=jnp.int32(row), col=jnp.int32(col)
    )
    return state if board is None else state.replace(board=jnp.asarray(board, jnp.int8))


def cells_of(state: TetrisState) -> set[tuple[int, int]]:
    """Falling-piece cells read back from the observation's piece plane."""
    obs = np.asarray(DIRECT.get_obs(state, NO_GRAVITY))
    plane = obs[BOARD_H * BOARD_W : 2 * BOARD_H * BOARD_W].reshape(BOARD_H, BOARD_W)
    return {(int(r), int(c)) for r, c in zip(*np.nonzero(plane))}


def position(state: TetrisState) -> tuple[int, int, int, int]:
    return int(state.piece), int(state.rot), int(state.row), int(state.col)


def ref_clear(board: np.ndarray) -> tuple[np.ndarray, int]:
    keep = [row for row in board if not row.all()]
    n = BOARD_H - len(keep)
    return np.vstack([np.zeros((n, BOARD_W), board.dtype)] + keep) if keep else np.zeros_like(board), n


def ref_potential(board: np.ndarray, p: TetrisParams) -> float:
    filled = board > 0
    heights, holes = [], 0
    for c in range(BOARD_W):
        rows = np.nonzero(filled[:, c])[0]
        top = rows[0] if len(rows) else BOARD_H
        heights.append(BOARD_H - top)
        holes += int(np.sum(~filled[top:, c]))
    bump = sum(abs(a - b) for a, b in zip(heights, heights[1:]))
    return -(p.height_weight * sum(heights) + p.holes_weight * holes + p.bumpiness_weight * bump)


# ---------------------------------------------------------------------------- moves and rotation


def test_walls_and_blocks_stop_sideways_moves():
    s = with_piece(fresh(), T, 0, 5, 0)  # T spawn cells in box cols 0..2: touching the left wall
    assert position(step(DIRECT, s, Action.LEFT)[1]) == position(s)
    moved = step(DIRECT, s, Action.RIGHT)[1]
    assert int(moved.col) == 1
    s = with_piece(fresh(), T, 0, 5, 7)  # touching the right wall
    assert position(step(DIRECT, s, Action.RIGHT)[1]) == position(s)
    board = np.zeros((BOARD_H, BOARD_W), np.int8)
    board[6, 6] = 8  # a locked cell right of the T's bottom row
    s = with_piece(fresh(), T, 0, 5, 3, board)
    assert position(step(DIRECT, s, Action.RIGHT)[1]) == position(s)


@pytest.mark.parametrize(
    "piece, rot, col, action, expected_rot, expected_shift",
    [
        (I, 1, -2, Action.ROTATE_CW, 2, +2),  # vertical I on the left wall, SRS R->2 test 3
        (I, 3, 8, Action.ROTATE_CCW, 2, -2),  # vertical I on the right wall, SRS L->2 test 2
        (T, 1, -1, Action.ROTATE_CCW, 0, +1),  # T pointing right on the left wall, R->0 test 2
    ],
)
def test_wall_kicks_move_piece_off_the_wall(piece, rot, col, action, expected_rot, expected_shift):
    s = with_piece(fresh(), piece, rot, 8, col)
    assert all(0 <= c < BOARD_W for _, c in cells_of(s))
    out = step(DIRECT, s, action)[1]
    assert int(out.rot) == expected_rot
    assert int(out.col) - col == expected_shift
    assert all(0 <= c < BOARD_W for _, c in cells_of(out))


def test_kick_can_lift_the_piece():
    """SRS 0->R test 3 is (-1, +1): one left and one UP; a sign slip in rows would miss it."""
    board = np.zeros((BOARD_H, BOARD_W), np.int8)
    board[19, 4:6] = 8  # blocks tests 1 and 2 under the T's stem
    s = with_piece(fresh(), T, 0, 17, 4, board)
    out = step(DIRECT, s, Action.ROTATE_CW)[1]
    assert (int(out.rot), int(out.row), int(out.col)) == (1, 16, 3)


def test_blocked_rotation_leaves_piece_unchanged():
    board = np.full((BOARD_H, BOARD_W), 8, np.int8)
    board[19, :4] = 0  # a one-row tunnel exactly as long as the flat I piece
    board[:, 9] = 0  # keep every row from being full
    s = with_piece(fresh(), I, 0, 18, 0, board)
    for action in (Action.ROTATE_CW, Action.ROTATE_CCW):
        assert position(step(DIRECT, s, action)[1]) == position(s)


def test_gravity_and_soft_drop_lock_when_blocked():
    params = DIRECT.default_params.replace(gravity_period=4)
    s = with_piece(fresh(), T, 0, 3, 3)
    for _ in range(3):
        s = step(DIRECT, s, Action.NOOP, params)[1]
        assert int(s.row) == 3
    s = step(DIRECT, s, Action.NOOP, params)[1]
    assert int(s.row) == 4
    s = with_piece(s, O, 0, 18, 0)  # O resting on the floor
    s = step(DIRECT, s, Action.SOFT_DROP)[1]
    assert int(s.pieces) == 1 and np.asarray(s.board)[18:, 1:3].all()


# ---------------------------------------------------------------------------- line clears, score


def _clear_setup(full_rows: list[int], extra: list[tuple[int, int]]) -> np.ndarray:
    board = np.zeros((BOARD_H, BOARD_W), np.int8)
    for r in full_rows:
        board[r, 1:] = 8  # full except column 0, which the vertical I fills
    for r, c in extra:
        board[r, c] = 8
    return board


@pytest.mark.parametrize(
    "full_rows, extra",
    [
        ([19], [(18, 5)]),
        ([18, 19], [(17, 5)]),
        ([17, 18, 19], [(16, 5)]),
        ([16, 17, 18, 19], [(15, 5)]),
        ([17, 19], [(18, 1), (18, 2), (16, 7)]),  # not contiguous: row 18 must survive between
    ],
)
def test_line_clears_score_and_shift(full_rows, extra):
    board = _clear_setup(full_rows, extra)
    s = with_piece(fresh(), I, 1, 0, -2, board)  # vertical I above column 0
    _, out, reward, _, info = step(DIRECT, s, Action.HARD_DROP)
    n = len(full_rows)
    dropped = board.copy()
    dropped[16:, 0] = I + 1
    expected, ref_n = ref_clear(dropped)
    assert ref_n == n
    np.testing.assert_array_equal(np.asarray(out.board), expected)
    score = (0, 100, 300, 500, 800)[n]
    assert int(info["lines_cleared"]) == n and float(info["score"]) == score
    assert int(out.lines) == n and int(out.score) == score
    p = NO_GRAVITY
    shaping = p.shaping_discount * ref_potential(expected, p) - ref_potential(board, p)
    assert float(info["shaping"]) == pytest.approx(shaping, abs=1e-5)
    assert float(reward) == pytest.approx(p.score_reward_scale * score + p.piece_reward + shaping, abs=1e-5)
    if full_rows == list(range(20 - n, 20)):  # contiguous: the marker row above fell n rows
        assert expected[19, 5] and np.asarray(out.board)[19, 5]
    assert bool(np.asarray(DIRECT.achievements(out))[n - 1])


def test_lines_only_reward_is_lines_cleared():
    s = with_piece(fresh(LINES_ONLY), I, 1, 0, -2, _clear_setup([18, 19], []))
    _, _, reward, _, info = step(LINES_ONLY, s, Action.HARD_DROP)
    assert float(reward) == 2.0 and int(info["lines_cleared"]) == 2
    s = with_piece(fresh(LINES_ONLY), S, 0, 5, 0)  # a drop that makes a hole clears nothing
    assert float(step(LINES_ONLY, s, Action.HARD_DROP)[2]) == 0.0


def test_survival_reward_is_the_standard_reward_without_shaping():
    board = _clear_setup([18, 19], [])
    for placement, lines in (((I, 1, 0, -2), 2), ((S, 0, 5, 0), 0)):  # two lines cleared; a drop that leaves a hole
        _, _, standard, _, info = step(DIRECT, with_piece(fresh(), *placement, board), Action.HARD_DROP)
        _, _, survival, _, _ = step(SURVIVAL, with_piece(fresh(SURVIVAL), *placement, board), Action.HARD_DROP)
        assert int(info["lines_cleared"]) == lines and abs(float(info["shaping"])) > 1e-3
        assert float(survival) == pytest.approx(float(standard) - float(info["shaping"]), abs=1e-5)
        assert float(survival) == pytest.approx(NO_GRAVITY.piece_reward + NO_GRAVITY.score_reward_scale
                                                * NO_GRAVITY.line_scores[lines], abs=1e-5)


def test_standard_shaping_penalises_holes():
    s = with_piece(fresh(), S, 0, 5, 0)  # flat S on the floor leaves a hole under its right end
    _, _, hole_reward, _, info = step(DIRECT, s, Action.HARD_DROP)
    assert float(info["shaping"]) < 0
    o = with_piece(fresh(), O, 0, 5, 0)  # an O on the floor makes none
    assert float(hole_reward) < float(step(DIRECT, o, Action.HARD_DROP)[2])
    holes_only = NO_GRAVITY.replace(height_weight=0.0, bumpiness_weight=0.0, shaping_discount=1.0)
    shaping = float(step(DIRECT, s, Action.HARD_DROP, holes_only)[4]["shaping"])
    assert shaping == pytest.approx(-holes_only.holes_weight)  # exactly one hole, negative sign
    assert float(step(DIRECT, o, Action.HARD_DROP, holes_only)[4]["shaping"]) == 0.0


# ---------------------------------------------------------------------------- bag, game over, limit


def test_seven_bag_yields_each_piece_once_per_seven_spawns():
    s = fresh(seed=3)
    seen = []
    for _ in range(21):
        seen.append(int(s.piece))
        s = step(DIRECT, s, Action.HARD_DROP)[1]
        s = s.replace(board=jnp.zeros_like(s.board))
    for bag in range(3):
        assert sorted(seen[7 * bag : 7 * bag + 7]) == list(range(7)), seen
    assert seen[:7] != seen[7:14] or seen[7:14] != seen[14:]  # bags are reshuffled


def test_game_over_on_spawn_collision_and_frozen_after():
    board = np.zeros((BOARD_H, BOARD_W), np.int8)
    board[0, 3:7] = 8  # every piece spawns over these columns
    s = with_piece(fresh(), O, 0, 10, 0, board)
    _, out, reward, done, info = step(DIRECT, s, Action.HARD_DROP)
    assert bool(done) and bool(out.game_over) and float(info["discount"]) == 0.0
    assert bool(info["topped_out"])
    # The O locks (piece reward), the penalty applies, and the shaping pays back phi(board): the
    # topped-out state has potential 0.
    p = NO_GRAVITY
    assert float(info["shaping"]) == pytest.approx(-ref_potential(board, p), abs=1e-5)
    expected = p.piece_reward - p.game_over_penalty - ref_potential(board, p)
    assert float(reward) == pytest.approx(expected, abs=1e-5)
    _, again, reward, done, info = step(DIRECT, out, Action.HARD_DROP)
    assert bool(done) and float(reward) == 0.0 and not bool(info["topped_out"])
    np.testing.assert_array_equal(np.asarray(again.board), np.asarray(out.board))
    # survival: the penalty without the shaping's payback of phi(board), which is what a world model
    # imagines collecting again (docs/results.md, Tetris).
    s = with_piece(fresh(SURVIVAL), O, 0, 10, 0, board)
    _, out, reward, done, info = step(SURVIVAL, s, Action.HARD_DROP)
    assert bool(done) and bool(info["topped_out"]) and -ref_potential(board, p) > 0.1
    assert float(reward) == pytest.approx(p.piece_reward - p.game_over_penalty, abs=1e-6)
    # lines_only stays lines only: no penalty, no survival reward.
    s = with_piece(fresh(LINES_ONLY), O, 0, 10, 0, board)
    _, out, reward, done, _ = step(LINES_ONLY, s, Action.HARD_DROP)
    assert bool(out.game_over) and float(reward) == 0.0


def test_step_limit_ends_episode():
    params = NO_GRAVITY.replace(max_steps=5)
    s = fresh()
    for t in range(5):
        _, s, reward, done, info = step(DIRECT, s, Action.NOOP, params)
        assert bool(done) == (t == 4)
        assert not bool(info["topped_out"]) and float(reward) == 0.0  # no penalty at the limit
    assert not bool(s.game_over)


# ---------------------------------------------------------------------------- placement and hold


@pytest.mark.parametrize(
    "piece, rot, col, stack, expected",
    [
        (T, 2, 4, [], {(18, 4), (18, 5), (18, 6), (19, 5)}),  # upside-down T
        (I, 1, 9, [], {(16, 9), (17, 9), (18, 9), (19, 9)}),  # vertical I in the last column
        (I, 0, 9, [], {(19, 6), (19, 7), (19, 8), (19, 9)}),  # too far right: clamped to col 6
        (T, 2, 4, [(19, 5)], {(17, 4), (17, 5), (17, 6), (18, 5)}),  # lands on the stack
    ],
)
def test_placement_lands_at_chosen_column_and_rotation(piece, rot, col, stack, expected):
    board = np.zeros((BOARD_H, BOARD_W), np.int8)
    for r, c in stack:
        board[r, c] = 8
    s = with_piece(fresh(PLACEMENT), piece, 0, 0, 3, board)
    _, out, _, done, info = step(PLACEMENT, s, rot * BOARD_W + col)
    placed = {(int(r), int(c)) for r, c in zip(*np.nonzero(np.asarray(out.board) == piece + 1))}
    assert placed == expected and bool(info["piece_locked"]) and not bool(done)


def test_placement_into_a_full_column_is_game_over():
    board = np.zeros((BOARD_H, BOARD_W), np.int8)
    board[:, 0] = 8
    s = with_piece(fresh(PLACEMENT), O, 0, 0, 3, board)
    _, out, _, done, _ = step(PLACEMENT, s, 0)
    assert bool(done) and bool(out.game_over)
    np.testing.assert_array_equal(np.asarray(out.board), board)


def test_hold_swaps_once_per_piece():
    env, hold = DIRECT, Action.HOLD
    s = fresh(env, seed=1)
    first, second, third = int(s.queue[0]), int(s.queue[1]), int(s.queue[2])
    assert int(s.piece) == first and int(s.held) == -1
    s = step(env, s, hold)[1]
    assert (int(s.piece), int(s.held), bool(s.hold_used)) == (second, first, True)
    again = step(env, s, hold)[1]
    assert (int(again.piece), int(again.held)) == (second, first)  # second hold: no-op
    s = step(env, again, Action.HARD_DROP)[1]
    assert (int(s.piece), bool(s.hold_used)) == (third, False)
    s = step(env, s, hold)[1]
    assert (int(s.piece), int(s.held)) == (first, third)
    assert (int(s.rot), int(s.col)) == (0, 3)  # the swapped-in piece starts at the spawn


def test_placement_second_hold_drops_the_piece_so_the_game_cannot_stall():
    hold = 4 * BOARD_W
    s = fresh(PLACEMENT, seed=1)
    first, second, third = int(s.queue[0]), int(s.queue[1]), int(s.queue[2])
    s = step(PLACEMENT, s, hold)[1]
    assert (int(s.piece), int(s.held), bool(s.hold_used)) == (second, first, True)
    spawn_cols = {int(s.col) + c for c in range(4)}
    locked = step(PLACEMENT, s, hold)[1]
    assert (int(locked.piece), int(locked.held), bool(locked.hold_used)) == (third, first, False)
    filled_cols = set(np.flatnonzero(np.asarray(locked.board).any(0)).tolist())
    assert len(np.flatnonzero(np.asarray(locked.board))) == 4 and filled_cols <= spawn_cols
    # Holding forever still places a piece at least every other step.
    for _ in range(6):
        s = step(PLACEMENT, s, hold)[1]
    assert int(np.count_nonzero(np.asarray(s.board))) >= 12


# ---------------------------------------------------------------------------- standard reward design
#
# The first standard reward summed its shaping to phi(final board) over an episode, so with no lines
# cleared the best return came from topping out fast (PPO learned 12-step games). These tests pin
# the fix: the return is line score + survival - penalty, whatever the final board looks like.

PLACEMENT_PARAMS = PLACEMENT.default_params


@jax.jit
def _afterstates(state: TetrisState):
    """The step result of every placement (not hold) from ``state``."""
    actions = jnp.arange(4 * BOARD_W)
    return jax.vmap(lambda a: PLACEMENT.step(KEY, state, a, PLACEMENT_PARAMS))(actions)


def _stack_heights(boards: np.ndarray) -> np.ndarray:
    filled = boards > 0
    return np.where(filled.any(1), BOARD_H - filled.argmax(1), 0)  # [n, BOARD_W]


def tower(state: TetrisState) -> int:
    return 1 * BOARD_W + 0  # every piece upright in the leftmost columns: a quick top-out


def survive_without_lines(state: TetrisState) -> int:
    """Keep the stack as low as possible without ever filling the last column (so no line can be
    completed); top out only when every other placement would touch that column."""
    _, after, _, _, info = _afterstates(state)
    boards = np.asarray(after.board)
    allowed = (boards[:, :, -1] == 0).all(1) & (np.asarray(info["lines_cleared"]) == 0)
    heights = _stack_heights(boards)
    cost = heights.max(1) * 100 + heights.sum(1) + 10**6 * np.asarray(after.game_over)
    return int(np.argmin(np.where(allowed, cost, 10**9)))


def clear_lines_greedily(state: TetrisState) -> int:
    """One-ply greedy on the potential plus lines: clears lines steadily."""
    _, after, _, _, info = _afterstates(state)
    boards, lines = np.asarray(after.board), np.asarray(info["lines_cleared"])
    value = [ref_potential(b, PLACEMENT_PARAMS) for b in boards] + 10.0 * lines
    return int(np.argmax(np.where(np.asarray(after.game_over), -1e9, value)))


def play(env: TetrisEnv, choose, steps: int, seed: int = 0, params: TetrisParams | None = None):
    """One episode from a fresh board until it ends or ``steps`` pass; per-step numpy arrays."""
    params = env.default_params if params is None else params
    state = env.reset(jax.random.PRNGKey(seed), params)[1]
    rows = []
    for _ in range(steps):
        _, state, reward, done, info = env.step(KEY, state, jnp.int32(choose(state)), params)
        rows.append((float(reward), float(info["score"]), bool(info["piece_locked"]), bool(info["topped_out"])))
        if bool(done):
            break
    reward, score, locked, topped = (np.asarray(col) for col in zip(*rows))
    return dict(reward=reward, score=score, locked=locked, topped=topped, state=state)


def expected_return(ep: dict, params: TetrisParams) -> float:
    """The return the design promises, discounted at shaping_discount: the shaping telescopes to
    discount^T * phi(final board) - phi(empty board), and phi is 0 once the game is over."""
    g = params.shaping_discount
    disc = g ** np.arange(len(ep["reward"]))
    base = params.score_reward_scale * ep["score"] + params.piece_reward * ep["locked"]
    base = base - params.game_over_penalty * ep["topped"]
    final = 0.0 if ep["topped"].any() else ref_potential(np.asarray(ep["state"].board), params)
    return float(np.sum(disc * base) + g ** len(disc) * final)


def discounted(rewards: np.ndarray, gamma: float) -> float:
    return float(np.sum(rewards * gamma ** np.arange(len(rewards))))


def test_topping_out_early_returns_less_than_surviving_without_lines():
    quick = play(PLACEMENT, tower, 200)
    slow = play(PLACEMENT, survive_without_lines, 200)
    for ep in (quick, slow):
        assert ep["topped"][-1] and ep["topped"].sum() == 1 and int(ep["state"].lines) == 0
    assert int(slow["state"].pieces) >= int(quick["state"].pieces) + 10
    # Undiscounted, and as PPO (gamma 0.99) sees it.
    assert slow["reward"].sum() > quick["reward"].sum() + 1.0
    assert discounted(slow["reward"], 0.99) > discounted(quick["reward"], 0.99)
    # Without lines the return is survival minus the penalty: the final board does not count.
    for ep in (quick, slow):
        p = PLACEMENT_PARAMS
        assert ep["reward"].sum() == pytest.approx(
            p.piece_reward * int(ep["state"].pieces) - p.game_over_penalty, abs=1e-3
        )


def test_clearing_lines_returns_more_than_surviving_without_them():
    greedy = play(PLACEMENT, clear_lines_greedily, 60)
    slow = play(PLACEMENT, survive_without_lines, 200)
    assert int(greedy["state"].lines) >= 10 and not greedy["topped"].any()
    assert greedy["reward"].sum() > slow["reward"].sum()


@pytest.mark.parametrize(
    "env, choose, steps",
    [
        (PLACEMENT, tower, 200),  # tops out
        (PLACEMENT, clear_lines_greedily, 40),  # clears lines, cut off while alive
        (DIRECT, "random", 2000),  # direct mode: shaping discounted at 0.99, many steps a piece
    ],
    ids=["placement-top-out", "placement-lines", "direct-random"],
)
def test_return_is_line_score_plus_survival_minus_penalty(env, choose, steps):
    if choose == "random":
        rng = np.random.default_rng(0)
        choose = lambda state: int(rng.integers(env.num_actions))
    params = env.default_params
    ep = play(env, choose, steps, params=params)
    got = discounted(ep["reward"], params.shaping_discount)
    assert got == pytest.approx(expected_return(ep, params), abs=2e-3)
    assert ep["topped"].sum() == int(ep["topped"].any()) and not ep["topped"][:-1].any()


def test_reward_weights_are_the_documented_ones():
    """docs/tetris.md's weight table and TetrisParams must agree."""
    import pathlib
    import re

    doc = (pathlib.Path(__file__).parents[1] / "docs" / "tetris.md").read_text()
    table = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", doc, flags=re.M))
    assert set(table) >= {"score_reward_scale", "piece_reward", "game_over_penalty", "height_weight",
                          "holes_weight", "bumpiness_weight", "shaping_discount"}, table
    for name, text in table.items():
        if name == "shaping_discount":
            values = dict((mode, float(v)) for v, mode in re.findall(r"([\d.]+) \((\w+)\)", text))
            assert values == {"placement": PLACEMENT_PARAMS.shaping_discount,
                              "direct": DIRECT.default_params.shaping_discount}
        else:
            assert float(text) == getattr(TetrisParams(), name), name
    assert (PLACEMENT_PARAMS.shaping_discount, DIRECT.default_params.shaping_discount) == (1.0, 0.99)


# ---------------------------------------------------------------------------- JAX transformations


@pytest.mark.parametrize("env", [DIRECT, PLACEMENT], ids=["direct", "placement"])
def test_vmap_batch_matches_single_envs(env):
    n, steps = 8, 25
    params = env.default_params
    reset_keys = jax.random.split(jax.random.PRNGKey(7), n)
    obs_b, state_b = jax.vmap(env.reset, in_axes=(0, None))(reset_keys, params)
    singles = [env.reset(k, params) for k in reset_keys]
    np.testing.assert_array_equal(np.asarray(obs_b), np.stack([np.asarray(o) for o, _ in singles]))
    states = [st for _, st in singles]
    vstep = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
    key = jax.random.PRNGKey(11)
    for _ in range(steps):
        key, k_act, k_step = jax.random.split(key, 3)
        actions = jax.random.randint(k_act, (n,), 0, env.num_actions)
        step_keys = jax.random.split(k_step, n)
        obs_b, state_b, rew_b, done_b, _ = vstep(step_keys, state_b, actions, params)
        for i in range(n):
            o, states[i], r, d, _ = env.step(step_keys[i], states[i], actions[i], params)
            np.testing.assert_array_equal(np.asarray(obs_b[i]), np.asarray(o))
            assert float(rew_b[i]) == float(r) and bool(done_b[i]) == bool(d)


def test_random_play_ends_in_game_over_under_jit():
    env, n, steps = DIRECT, 8, 1500
    params = env.default_params
    obs, state = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(jax.random.split(KEY, n), params)
    assert obs.shape == (n, *env.observation_space(params).shape) == (n, OBS_DIM)

    @jax.jit
    def rollout(state, key):
        def body(state, key):
            k_act, k_step = jax.random.split(key)
            actions = jax.random.randint(k_act, (n,), 0, env.num_actions)
            _, state, _, done, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                jax.random.split(k_step, n), state, actions, params
            )
            return state, done

        return jax.lax.scan(body, state, jax.random.split(key, steps))

    state, dones = rollout(state, jax.random.PRNGKey(5))
    assert bool(state.game_over.all()) and bool(dones[-1].all())
    assert int(state.pieces.min()) > 5
    metrics = jax.vmap(env.episode_metrics)(state)
    assert set(metrics) >= {"lines", "pieces"} and metrics["pieces"].shape == (n,)


def test_observation_layout_and_render():
    s = with_piece(fresh(), T, 0, 0, 3)
    s = s.replace(held=jnp.int32(L), hold_used=jnp.bool_(True))
    obs = np.asarray(DIRECT.get_obs(s, NO_GRAVITY))
    assert obs.shape == (OBS_DIM,) and obs.dtype == np.float32
    tail = obs[2 * BOARD_H * BOARD_W :]
    assert tail[T] == 1 and tail[7 + int(s.queue[s.queue_idx])] == 1 and tail[14 + L] == 1
    assert tail[21] == 1.0  # hold used
    assert cells_of(s) == {(0, 4), (1, 3), (1, 4), (1, 5)}
    img = np.asarray(DIRECT.render_pixels(s))
    assert img.shape == (160, 120, 3) and img.dtype == np.uint8
    assert (img[4, 36] > 0).any() and not img[100, 36].any()  # T drawn at the top, empty below
    assert len(DIRECT.achievement_names) == DIRECT.achievements(s).shape[0]
    assert DIRECT.num_actions == 8 and PLACEMENT.num_actions == 41
    assert len(PIECE_NAMES) == 7
    with pytest.raises(ValueError, match="action_mode"):
        TetrisEnv("teleport")
