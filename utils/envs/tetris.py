"""Tetris as a JAX environment with Craftax's interface (``EnvironmentNoAutoReset``), so the env
factory's wrappers (vectorisation, optimistic resets, episode statistics) apply unchanged.

Rules chosen (see also ``TetrisParams``):

- 10 x 20 board, no hidden rows above it; the seven tetrominoes come from a 7-bag (a random
  permutation per bag, drawn from the step key and kept in the state).
- Rotation is SRS with its standard wall-kick tables (tetris_pieces.KICKS); if no kick fits, the
  piece does not move.
- Direct mode (actions: see ``Action``): gravity moves the piece down one row every
  ``gravity_period`` steps whatever the action, so stalling is impossible. A piece locks when
  gravity or a soft drop tries to move it down and it is blocked (no lock delay), or on a hard
  drop.
- Placement mode: an action picks a rotation and the column of the piece's LEFTMOST cell; a column
  that would push the piece past the right wall is clamped to the rightmost legal column. The
  piece enters that column with its top cell in row 0 and is hard-dropped from there (reachability
  from the spawn position is not checked). If it cannot even enter (that column is stacked to the
  top) the game is over, as for a spawn collision. Action 40 is hold; once hold is used for this
  piece, action 40 drops the piece at its spawn rotation and column (so the game can never stall).
- Hold swaps the current piece with the held one (or takes the next piece if nothing is held);
  once per piece; in direct mode a second hold before the piece locks is a no-op.
- Score per clear of 1, 2, 3, 4 lines: 100, 300, 500, 800 (guideline, level 1; no levels).
- Game over when a new piece overlaps the stack; the episode also ends after ``max_steps`` env
  steps (actions, in both modes). Stepping a game-over state returns it unchanged with reward 0.

Rewards (weights in ``TetrisParams``; reasoning in docs/tetris.md):

- ``lines_only``: the number of lines cleared this step.
- ``survival``: ``standard`` without the shaping: line score + survival - game-over penalty. For
  world models: the shaping's payback of the board's potential on the step that tops out (up to
  about +18 on a bad board) is a reward a learned model can imagine collecting again and again
  (docs/results.md, Tetris); without shaping no step pays more than a line clear.
- ``standard``: score_reward_scale * line score + piece_reward per locked piece
  - game_over_penalty on the step that tops out + shaping F = shaping_discount * phi(s') - phi(s),
  with the potential phi = -(height_weight * aggregate height + holes_weight * holes
  + bumpiness_weight * bumpiness) and phi = 0 for a topped-out state. Because the game-over state
  has potential 0, the shaping of the final step pays back the board's potential: over any game that
  tops out the shaping sums to zero (shaping_discount = 1), or its discounted sum does (at discount
  shaping_discount), so the shaping only moves reward in time (potential-based shaping, Ng et al.
  1999). An episode's return is then line score + survival - penalty: topping out early is never
  better than surviving. Without the payback the shaping summed to phi(final board) and PPO learned
  to top out in 12 steps.

Observation (float32 [423]): locked board (200, row-major, 0/1), then the falling piece as its own
200-cell plane, then one-hots of the current, next and held piece (7 each, held all-zero when
empty), then hold_used (1) and gravity phase = timer / gravity_period (1).

Like Craftax, ``state.achievements`` is a bool vector over ``achievement_names``; ``info`` holds
scalars for this step: lines_cleared, score, shaping, piece_locked, topped_out, discount.
"""

from __future__ import annotations

from enum import IntEnum
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from craftax.environment_base import spaces
from craftax.environment_base.environment_bases import EnvironmentNoAutoReset
from flax import struct

from utils.envs import tetris_logic as logic
from utils.envs.tetris_pieces import (
    BOARD_H,
    BOARD_W,
    NUM_PIECES,
    NUM_ROTATIONS,
    SHAPE_MIN_COL,
    SHAPE_MIN_ROW,
    SHAPE_WIDTH,
    SPAWN_COL,
    SPAWN_ROW,
)
from utils.envs.tetris_render import render_pixels

Array = jax.Array

ACTION_MODES = ("direct", "placement")
REWARD_MODES = ("standard", "survival", "lines_only")
OBS_DIM = 2 * BOARD_H * BOARD_W + 3 * NUM_PIECES + 2
NUM_PLACEMENTS = NUM_ROTATIONS * BOARD_W
PLACEMENT_HOLD = NUM_PLACEMENTS  # the action after the 40 placements

ACHIEVEMENT_NAMES: tuple[str, ...] = (
    "clear_1_line",
    "clear_2_lines",
    "clear_3_lines",
    "clear_4_lines",
    "clear_10_lines",
    "place_100_pieces",
)

_SPAWN_ROW = jnp.asarray(SPAWN_ROW)
_MIN_ROW = jnp.asarray(SHAPE_MIN_ROW)
_MIN_COL = jnp.asarray(SHAPE_MIN_COL)
_WIDTH = jnp.asarray(SHAPE_WIDTH)


class Action(IntEnum):
    """Direct-mode actions. Placement mode uses rotation * 10 + column, then 40 = hold."""

    LEFT = 0
    RIGHT = 1
    ROTATE_CW = 2
    ROTATE_CCW = 3
    SOFT_DROP = 4
    HARD_DROP = 5
    HOLD = 6
    NOOP = 7


@struct.dataclass
class TetrisParams:
    """Tunables that may change without recompiling the env's structure.

    Standard-reward weights (docs/tetris.md has the measurements behind them):

    - line score 100/300/500/800 x score_reward_scale 0.03: 3, 9, 15, 24 for 1-4 lines;
    - piece_reward 0.25 per locked piece: survival is worth something before any line is cleared,
      and without clears a 10 x 20 board holds about 45 pieces, so more of it needs lines;
    - game_over_penalty 2, once, on the step that tops out (not when the step limit ends a game);
    - shaping on Yiyuan Lee's genetic-algorithm heuristic (0.51 height, 0.36 holes, 0.18 bumpiness),
      scaled by 0.1: large enough that a hole costs about a third of a piece's survival reward at
      once, small enough that the board's potential (down to about -20) stays within what PPO's
      clipped value function tracks. With 3x these weights (and line score 0.01) PPO (placement,
      3M steps) cleared no lines: the residual cost in ``TetrisEnv.default_params`` outweighed
      survival.
    - shaping_discount: 1.0 in placement mode, 0.99 (PPO's discount) in direct mode; see
      ``TetrisEnv.default_params``.
    """

    max_steps: int = 10_000
    gravity_period: int = 4  # direct mode: env steps per row of free fall
    line_scores: tuple[float, ...] = (0.0, 100.0, 300.0, 500.0, 800.0)  # by lines cleared 0..4
    score_reward_scale: float = 0.03
    piece_reward: float = 0.25
    game_over_penalty: float = 2.0
    height_weight: float = 0.051
    holes_weight: float = 0.036
    bumpiness_weight: float = 0.018
    shaping_discount: float = 1.0


@struct.dataclass
class TetrisState:
    """Everything the game needs; the falling piece is (piece, rot, row, col) of its 4x4 box."""

    board: Array  # int8 [20, 10], 0 empty, 1..7 locked piece type + 1, 8 garbage
    piece: Array  # int32, current piece type 0..6 (I, O, T, S, Z, J, L)
    rot: Array
    row: Array
    col: Array
    held: Array  # int32, -1 when nothing is held
    hold_used: Array  # bool, hold already used for the current piece
    queue: Array  # int32 [14], current bag then the next bag
    queue_idx: Array  # int32, index of the next piece in queue
    gravity_timer: Array
    timestep: Array
    lines: Array  # lines cleared this episode
    pieces: Array  # pieces locked this episode
    score: Array  # game score this episode (line_scores, unscaled)
    game_over: Array
    achievements: Array  # bool [len(ACHIEVEMENT_NAMES)]


def spawn_position(piece: Array) -> tuple[Array, Array, Array]:
    """(rot, row, col) where a new piece appears: spawn orientation, top row, centred."""
    return jnp.int32(0), _SPAWN_ROW[piece], jnp.int32(SPAWN_COL)


class TetrisEnv(EnvironmentNoAutoReset):
    """Single-board Tetris; vectorise with jax.vmap (the factory does)."""

    achievement_names: tuple[str, ...] = ACHIEVEMENT_NAMES

    def __init__(
        self, action_mode: str = "direct", reward_mode: str = "standard", max_steps: int = 10_000
    ) -> None:
        super().__init__()
        if action_mode not in ACTION_MODES:
            raise ValueError(f"Tetris action_mode must be one of {ACTION_MODES}, got {action_mode!r}")
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"Tetris reward_mode must be one of {REWARD_MODES}, got {reward_mode!r}")
        self.action_mode = action_mode
        self.reward_mode = reward_mode
        self.max_steps = int(max_steps)

    @property
    def default_params(self) -> TetrisParams:
        """Defaults, with the shaping discount chosen per action mode.

        With shaping_discount = 1 the payback of the potential comes at game over, so under the
        agent's discount gamma the shaping leaves a residual cost of (1 - gamma) * |phi| per env
        step: a mild push towards a low, hole-free stack. In placement mode (one step per piece)
        that is below the piece reward and helped PPO (3.5 vs 1.6 lines per episode, 3 seeds each);
        in direct mode a piece takes about ten steps, the residual outweighed the piece reward and
        PPO learned to hard-drop into a quick top-out, so direct mode uses gamma = 0.99 (PPO's),
        for which the shaping is exactly neutral.
        """
        discount = 1.0 if self.action_mode == "placement" else 0.99
        return TetrisParams(max_steps=self.max_steps, shaping_discount=discount)

    @property
    def num_actions(self) -> int:
        return len(Action) if self.action_mode == "direct" else NUM_PLACEMENTS + 1

    def action_space(self, params: TetrisParams | None = None) -> spaces.Discrete:
        return spaces.Discrete(self.num_actions)

    def observation_space(self, params: TetrisParams | None = None) -> spaces.Box:
        return spaces.Box(0.0, 1.0, (OBS_DIM,), jnp.float32)

    # ------------------------------------------------------------------ reset / step

    def reset_env(self, key: Array, params: TetrisParams) -> tuple[Array, TetrisState]:
        k1, k2 = jax.random.split(key)
        queue = jnp.concatenate([logic.new_bag(k1), logic.new_bag(k2)])
        piece = queue[0]
        rot, row, col = spawn_position(piece)
        zero = jnp.int32(0)
        state = TetrisState(
            board=jnp.zeros((BOARD_H, BOARD_W), jnp.int8),
            piece=piece,
            rot=rot,
            row=row,
            col=col,
            held=jnp.int32(-1),
            hold_used=jnp.bool_(False),
            queue=queue,
            queue_idx=jnp.int32(1),
            gravity_timer=zero,
            timestep=zero,
            lines=zero,
            pieces=zero,
            score=zero,
            game_over=jnp.bool_(False),
            achievements=jnp.zeros(len(ACHIEVEMENT_NAMES), bool),
        )
        return self.get_obs(state, params), state

    def step_env(
        self, key: Array, state: TetrisState, action: Any, params: TetrisParams
    ) -> tuple[Array, TetrisState, Array, Array, dict[str, Array]]:
        """One env step. A state that is already game-over is returned unchanged (reward 0), so
        a vmapped batch can keep stepping finished envs until the wrapper resets them."""
        action = jnp.asarray(action, jnp.int32)
        if self.action_mode == "direct":
            move = self._direct_move(state, action, params)
        else:
            move = self._placement_move(state, action)
        new_state, lines, score = self._resolve(key, state, move, params)
        new_state = new_state.replace(timestep=state.timestep + 1)

        topped_out = new_state.game_over  # the input state is not game over (else frozen below)
        shaping = _shaping(state.board, new_state.board, topped_out, params)
        if self.reward_mode in ("standard", "survival"):
            reward = (
                params.score_reward_scale * score
                + params.piece_reward * move["lock"]
                - params.game_over_penalty * topped_out
            )
            reward = reward + shaping if self.reward_mode == "standard" else reward
        else:
            reward = lines.astype(jnp.float32)

        frozen = state.game_over
        new_state = jax.tree.map(lambda old, new: jnp.where(frozen, old, new), state, new_state)
        reward = jnp.where(frozen, 0.0, reward).astype(jnp.float32)
        done = self.is_terminal(new_state, params)
        info = {
            "lines_cleared": jnp.where(frozen, 0, lines),
            "score": jnp.where(frozen, 0.0, score),
            "shaping": jnp.where(frozen, 0.0, shaping),
            "piece_locked": move["lock"] & ~frozen,
            "topped_out": topped_out & ~frozen,
            "discount": jnp.where(done, 0.0, 1.0),
        }
        return jax.lax.stop_gradient(self.get_obs(new_state, params)), new_state, reward, done, info

    def is_terminal(self, state: TetrisState, params: TetrisParams) -> Array:
        return state.game_over | (state.timestep >= params.max_steps)

    def _direct_move(self, state: TetrisState, action: Array, params: TetrisParams) -> dict:
        """Apply one direct action, then gravity. Returns the new position and lock/hold flags."""
        board, p, rot, row, col = state.board, state.piece, state.rot, state.row, state.col

        no_lock, locks = jnp.bool_(False), jnp.bool_(True)

        def shift(d_col: int):
            return lambda: (rot, row, logic.try_shift(board, p, rot, row, col, 0, d_col)[1], no_lock)

        def rotate(clockwise: bool):
            return lambda: (*logic.try_rotate(board, p, rot, row, col, clockwise), no_lock)

        def soft_drop():
            new_row, _, moved = logic.try_shift(board, p, rot, row, col, 1, 0)
            return rot, new_row, col, ~moved

        def hard_drop():
            return rot, row + jnp.maximum(logic.drop_distance(board, p, rot, row, col), 0), col, locks

        def stay():  # hold and no-op: hold is resolved later, in _resolve
            return rot, row, col, no_lock

        # Order must match the Action enum; out-of-range actions are clipped into it.
        branches = [shift(-1), shift(1), rotate(True), rotate(False), soft_drop, hard_drop, stay, stay]
        idx = jnp.clip(action, 0, len(Action) - 1)
        rot, row, col, lock = jax.lax.switch(idx, branches)

        hold = (action == Action.HOLD) & ~state.hold_used
        timer = state.gravity_timer + 1
        gravity = (timer >= params.gravity_period) & ~lock & ~hold
        new_row, _, fell = logic.try_shift(board, p, rot, row, col, 1, 0)
        row = jnp.where(gravity, new_row, row)
        lock = lock | (gravity & ~fell)
        timer = jnp.where(gravity, 0, timer)
        return dict(
            rot=rot, row=row, col=col, lock=lock, hold=hold, top_out=jnp.bool_(False), timer=timer
        )

    def _placement_move(self, state: TetrisState, action: Array) -> dict:
        """Drop the piece at the chosen rotation and leftmost column (clamped), or hold.

        A hold that is no longer available drops the piece where it spawned: otherwise repeating it
        would freeze the game, and agents learn to stall forever rather than place pieces.
        """
        chosen = action < PLACEMENT_HOLD
        hold = ~chosen & ~state.hold_used
        place = chosen | state.hold_used
        p = state.piece
        rot = jnp.where(chosen, jnp.clip(action // BOARD_W, 0, NUM_ROTATIONS - 1), state.rot)
        left = jnp.clip(action % BOARD_W, 0, BOARD_W - _WIDTH[p, rot])
        col = jnp.where(chosen, left - _MIN_COL[p, rot], state.col)
        row = -_MIN_ROW[p, rot]
        dist = logic.drop_distance(state.board, p, rot, row, col)
        top_out = place & (dist < 0)
        lock = place & ~top_out
        return dict(
            rot=jnp.where(lock, rot, state.rot),
            row=jnp.where(lock, row + dist, state.row),
            col=jnp.where(lock, col, state.col),
            lock=lock,
            hold=hold,
            top_out=top_out,
            timer=state.gravity_timer,
        )

    def _resolve(
        self, key: Array, state: TetrisState, move: dict, params: TetrisParams
    ) -> tuple[TetrisState, Array, Array]:
        """Lock, clear lines, hold and spawn; shared by both action modes.

        Every branch is computed and selected with jnp.where: under vmap a lax.cond would do the
        same work anyway, and this keeps the step a straight line of array ops.
        """
        lock, hold = move["lock"], move["hold"]
        locked = logic.lock_piece(state.board, state.piece, move["rot"], move["row"], move["col"])
        cleared, lines = logic.clear_lines(locked)
        board = jnp.where(lock, cleared, state.board)
        lines = jnp.where(lock, lines, 0)
        score = jnp.asarray(params.line_scores, jnp.float32)[lines]

        spawn = lock | hold
        from_held = hold & (state.held >= 0)
        bag_piece, queue, queue_idx = logic.take_from_queue(state.queue, state.queue_idx, key)
        consume = spawn & ~from_held
        new_piece = jnp.where(from_held, state.held, bag_piece)
        s_rot, s_row, s_col = spawn_position(new_piece)
        piece = jnp.where(spawn, new_piece, state.piece)
        rot = jnp.where(spawn, s_rot, move["rot"])
        row = jnp.where(spawn, s_row, move["row"])
        col = jnp.where(spawn, s_col, move["col"])
        blocked = ~logic.fits(board, piece, rot, row, col)

        total_lines = state.lines + lines
        pieces = state.pieces + lock.astype(jnp.int32)
        earned = jnp.stack(
            [lines == 1, lines == 2, lines == 3, lines == 4, total_lines >= 10, pieces >= 100]
        )
        new_state = state.replace(
            board=board,
            piece=piece,
            rot=rot,
            row=row,
            col=col,
            held=jnp.where(hold, state.piece, state.held),
            hold_used=jnp.where(lock, False, state.hold_used | hold),
            queue=jnp.where(consume, queue, state.queue),
            queue_idx=jnp.where(consume, queue_idx, state.queue_idx),
            gravity_timer=jnp.where(spawn, 0, move["timer"]),
            lines=total_lines,
            pieces=pieces,
            score=state.score + score.astype(jnp.int32),
            game_over=move["top_out"] | (spawn & blocked),
            achievements=state.achievements | earned,
        )
        return new_state, lines, score

    # ------------------------------------------------------------------ observations & metrics

    def get_obs(self, state: TetrisState, params: TetrisParams | None = None) -> Array:
        params = self.default_params if params is None else params
        board = (state.board > 0).astype(jnp.float32).ravel()
        rows, cols = logic.piece_cells(state.piece, state.rot, state.row, state.col)
        falling = jnp.zeros((BOARD_H, BOARD_W), jnp.float32).at[rows, cols].set(1.0, mode="drop")
        return jnp.concatenate(
            [
                board,
                falling.ravel(),
                jax.nn.one_hot(state.piece, NUM_PIECES),
                jax.nn.one_hot(state.queue[state.queue_idx], NUM_PIECES),
                jax.nn.one_hot(state.held, NUM_PIECES),  # -1 (nothing held) gives all zeros
                state.hold_used.astype(jnp.float32)[None],
                (state.gravity_timer / params.gravity_period).astype(jnp.float32)[None],
            ]
        ).astype(jnp.float32)

    @partial(jax.jit, static_argnums=(0,))
    def render_pixels(self, state: TetrisState) -> Array:
        """RGB uint8 [160, 120, 3]: the board plus a side panel with the next and held piece."""
        return render_pixels(state)

    def achievements(self, state: TetrisState) -> Array:
        return state.achievements

    def episode_metrics(self, state: TetrisState) -> dict[str, Array]:
        return {
            "lines": state.lines,
            "pieces": state.pieces,
            "score": state.score,
            "length": state.timestep,
        }


def _shaping(board: Array, new_board: Array, topped_out: Array, params: TetrisParams) -> Array:
    """F = shaping_discount * phi(s') - phi(s), with phi = 0 once the game is over."""
    phi_new = jnp.where(topped_out, 0.0, _potential(new_board, params))
    return params.shaping_discount * phi_new - _potential(board, params)


def _potential(board: Array, params: TetrisParams) -> Array:
    """phi(board) for potential-based shaping: higher is a better-shaped stack."""
    f = logic.board_features(board)
    return -(
        params.height_weight * f["aggregate_height"]
        + params.holes_weight * f["holes"]
        + params.bumpiness_weight * f["bumpiness"]
    ).astype(jnp.float32)
