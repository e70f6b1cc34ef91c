"""RGB rendering of a Tetris state, jittable and vmappable, for humans and pixel agents.

The image is a grid of cells: the 10 x 20 board, a one-cell separator, then a 4-cell-wide panel
showing the next piece (rows 1-4) and the held piece (rows 7-10, greyed out once hold was used for
this piece). Pixel agents thus see everything the symbolic observation holds except the gravity
phase. Each filled cell gets a darker 1-px rim so neighbouring blocks stay distinguishable.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from utils.envs.tetris_logic import piece_cells
from utils.envs.tetris_pieces import (
    BOARD_H,
    BOARD_W,
    GARBAGE_CELL,
    PALETTE,
    PANEL_BG,
    SEPARATOR,
    SHAPES,
)

CELL_PX = 8
PANEL_COL = BOARD_W + 1
GRID_W = BOARD_W + 1 + 4
NEXT_ROW, HELD_ROW = 1, 7

_PALETTE = jnp.asarray(PALETTE)
_SHAPES = jnp.asarray(SHAPES)


def _draw_preview(grid: jax.Array, piece: jax.Array, top: int, colour: jax.Array) -> jax.Array:
    """Draw a piece in its spawn orientation into the side panel at row ``top``."""
    cells = _SHAPES[jnp.clip(piece, 0), 0]
    return grid.at[cells[:, 0] + top, cells[:, 1] + PANEL_COL].set(colour)


def colour_grid(state: Any) -> jax.Array:
    """Palette index per cell, int32 [BOARD_H, GRID_W]."""
    board = state.board.astype(jnp.int32)
    rows, cols = piece_cells(state.piece, state.rot, state.row, state.col)
    board = board.at[rows, cols].set(state.piece + 1, mode="drop")
    grid = jnp.full((BOARD_H, GRID_W), PANEL_BG, jnp.int32)
    grid = grid.at[:, :BOARD_W].set(board).at[:, BOARD_W].set(SEPARATOR)
    next_piece = state.queue[state.queue_idx]
    grid = _draw_preview(grid, next_piece, NEXT_ROW, next_piece + 1)
    held_colour = jnp.where(state.hold_used, GARBAGE_CELL, state.held + 1)
    held_colour = jnp.where(state.held >= 0, held_colour, PANEL_BG)
    return _draw_preview(grid, state.held, HELD_ROW, held_colour)


def render_pixels(state: Any, cell_px: int = CELL_PX) -> jax.Array:
    """uint8 [BOARD_H * cell_px, GRID_W * cell_px, 3]."""
    grid = colour_grid(state)
    rgb = _PALETTE[grid].astype(jnp.float32)
    img = jnp.repeat(jnp.repeat(rgb, cell_px, axis=0), cell_px, axis=1)
    edge = jnp.zeros(cell_px, bool).at[0].set(True).at[-1].set(True)
    rim = edge[:, None] | edge[None, :]
    shade = jnp.where(jnp.tile(rim, (BOARD_H, GRID_W)), 0.6, 1.0)
    return (img * shade[..., None]).astype(jnp.uint8)
