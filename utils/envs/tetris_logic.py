"""Pure, jittable Tetris rules on arrays: collisions, moves, SRS rotation, drops, line clears,
board features and the 7-bag.

Functions take the board and the piece as separate arrays (not the env state) so each rule can be
tested and reused on its own, and every shape is fixed so the whole step vmaps without Python
branches. The board is int8 [BOARD_H, BOARD_W]: 0 is empty, anything else is a locked cell (its
value only picks a colour).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from utils.envs.tetris_pieces import (
    BOARD_H,
    BOARD_W,
    KICKS,
    NUM_PIECES,
    SHAPES,
)

Array = jax.Array

_SHAPES = jnp.asarray(SHAPES)
_KICKS = jnp.asarray(KICKS)


def piece_cells(piece: Array, rot: Array, row: Array, col: Array) -> tuple[Array, Array]:
    """Board (rows, cols) of the four cells of a piece, each int32 [4]."""
    offsets = _SHAPES[piece, rot]
    return offsets[:, 0] + row, offsets[:, 1] + col


def cells_free(board: Array, rows: Array, cols: Array) -> Array:
    """True where every cell (last axis) is inside the board and empty.

    Cells above the top row count as blocked: the board has no hidden buffer rows, so a piece that
    would need them cannot move or rotate there (and cannot spawn: that is game over).
    """
    inside = (rows >= 0) & (rows < BOARD_H) & (cols >= 0) & (cols < BOARD_W)
    occupied = board[jnp.clip(rows, 0, BOARD_H - 1), jnp.clip(cols, 0, BOARD_W - 1)] > 0
    return jnp.all(inside & ~occupied, axis=-1)


def fits(board: Array, piece: Array, rot: Array, row: Array, col: Array) -> Array:
    """Whether the piece can occupy this position."""
    return cells_free(board, *piece_cells(piece, rot, row, col))


def try_shift(
    board: Array, piece: Array, rot: Array, row: Array, col: Array, d_row: int, d_col: int
) -> tuple[Array, Array, Array]:
    """Move by (d_row, d_col) if the target is free; returns (row, col, moved)."""
    ok = fits(board, piece, rot, row + d_row, col + d_col)
    return jnp.where(ok, row + d_row, row), jnp.where(ok, col + d_col, col), ok


def try_rotate(
    board: Array, piece: Array, rot: Array, row: Array, col: Array, clockwise: bool
) -> tuple[Array, Array, Array]:
    """SRS rotation: try the five kick offsets in order and take the first that fits.

    If none fits the piece is left exactly as it was. Returns (rot, row, col).
    """
    new_rot = (rot + (1 if clockwise else 3)) % 4
    kicks = _KICKS[piece, rot, 0 if clockwise else 1]  # [5, 2]
    offsets = _SHAPES[piece, new_rot]  # [4, 2]
    rows = row + kicks[:, 0:1] + offsets[None, :, 0]  # [5, 4]
    cols = col + kicks[:, 1:2] + offsets[None, :, 1]
    ok = cells_free(board, rows, cols)  # [5]
    first = jnp.argmax(ok)
    any_ok = jnp.any(ok)
    return (
        jnp.where(any_ok, new_rot, rot),
        jnp.where(any_ok, row + kicks[first, 0], row),
        jnp.where(any_ok, col + kicks[first, 1], col),
    )


def drop_distance(board: Array, piece: Array, rot: Array, row: Array, col: Array) -> Array:
    """How many rows the piece can fall straight down; -1 if it does not fit where it is.

    Every distance 0..BOARD_H is tested at once (a [21, 4] gather) instead of a while loop, so the
    cost is fixed and vmap-friendly. Falling BOARD_H rows always leaves the board, so a piece that
    fits has a first blocked distance and the answer is the one before it.
    """
    rows, cols = piece_cells(piece, rot, row, col)
    dists = jnp.arange(BOARD_H + 1)
    ok = cells_free(board, rows[None, :] + dists[:, None], jnp.broadcast_to(cols, (BOARD_H + 1, 4)))
    return jnp.argmin(ok).astype(jnp.int32) - 1


def lock_piece(board: Array, piece: Array, rot: Array, row: Array, col: Array) -> Array:
    """Write the piece into the board (value piece + 1, for its colour)."""
    rows, cols = piece_cells(piece, rot, row, col)
    return board.at[rows, cols].set((piece + 1).astype(board.dtype), mode="drop")


def clear_lines(board: Array) -> tuple[Array, Array]:
    """Remove full rows and let the rows above fall; returns (board, number of rows cleared).

    Each kept row moves down by the number of full rows below it. Done as one scatter (full rows
    go to a dummy row past the bottom) rather than a loop over rows.
    """
    full = jnp.all(board > 0, axis=1)
    full_at_or_below = jnp.cumsum(full[::-1])[::-1]
    dest = jnp.arange(BOARD_H) + full_at_or_below - full
    dest = jnp.where(full, BOARD_H, dest)
    out = jnp.zeros((BOARD_H + 1, BOARD_W), board.dtype).at[dest].set(board)
    return out[:BOARD_H], jnp.sum(full).astype(jnp.int32)


def column_heights(board: Array) -> Array:
    """Height of each column: rows from the bottom up to its highest filled cell, 0 if empty."""
    occupied = board > 0
    top = jnp.argmax(occupied, axis=0)
    return jnp.where(occupied.any(axis=0), BOARD_H - top, 0).astype(jnp.int32)


def board_features(board: Array) -> dict[str, Array]:
    """The three quantities the standard reward shapes on (all int32 scalars).

    - aggregate_height: sum of column heights,
    - holes: empty cells with a filled cell somewhere above them in the same column,
    - bumpiness: sum of |height difference| between neighbouring columns.
    """
    occupied = board > 0
    heights = column_heights(board)
    covered = jnp.cumsum(occupied, axis=0) > 0
    return {
        "aggregate_height": jnp.sum(heights),
        "holes": jnp.sum(covered & ~occupied).astype(jnp.int32),
        "bumpiness": jnp.sum(jnp.abs(jnp.diff(heights))),
    }


def new_bag(key: Array) -> Array:
    """One 7-bag: a random permutation of the seven piece types."""
    return jax.random.permutation(key, NUM_PIECES).astype(jnp.int32)


def take_from_queue(queue: Array, idx: Array, key: Array) -> tuple[Array, Array, Array]:
    """Pop the next piece from a two-bag queue; returns (piece, queue, idx).

    The queue always holds the current bag and the one after it, so the "next piece" preview
    (queue[idx]) exists even at the end of a bag. When a bag is used up the second bag slides
    forward and a fresh one is drawn with ``key``.
    """
    piece = queue[idx]
    idx = idx + 1
    bag_done = idx >= NUM_PIECES
    refilled = jnp.concatenate([queue[NUM_PIECES:], new_bag(key)])
    queue = jnp.where(bag_done, refilled, queue)
    return piece, queue, jnp.where(bag_done, 0, idx).astype(jnp.int32)
