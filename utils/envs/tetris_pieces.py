"""Static Tetris tables: board size, tetromino shapes per rotation, SRS wall kicks, colours.

Everything here is plain numpy computed once at import, so the jitted game logic only does table
look-ups (gathers) and never branches on the piece type in Python.

Coordinates are (row, col) with row 0 at the top of the board and rows growing downwards. A piece
is placed by the (row, col) of the top-left corner of its 4x4 bounding box, as in the Super
Rotation System (SRS), so rotating never moves that corner; wall kicks do.
"""

from __future__ import annotations

import numpy as np

BOARD_H = 20
BOARD_W = 10
NUM_PIECES = 7
NUM_ROTATIONS = 4
NUM_KICKS = 5

PIECE_NAMES: tuple[str, ...] = ("I", "O", "T", "S", "Z", "J", "L")
I_PIECE, O_PIECE = 0, 1

# Spawn orientation (SRS "state 0") and the size of the box the piece rotates in.
_SPAWN_CELLS: dict[str, tuple[int, list[tuple[int, int]]]] = {
    "I": (4, [(1, 0), (1, 1), (1, 2), (1, 3)]),
    "O": (4, [(0, 1), (0, 2), (1, 1), (1, 2)]),
    "T": (3, [(0, 1), (1, 0), (1, 1), (1, 2)]),
    "S": (3, [(0, 1), (0, 2), (1, 0), (1, 1)]),
    "Z": (3, [(0, 0), (0, 1), (1, 1), (1, 2)]),
    "J": (3, [(0, 0), (1, 0), (1, 1), (1, 2)]),
    "L": (3, [(0, 2), (1, 0), (1, 1), (1, 2)]),
}


def _rotations(name: str) -> np.ndarray:
    """The four orientations, clockwise from spawn; O is the same in all (SRS keeps it still)."""
    size, cells = _SPAWN_CELLS[name]
    out = [np.array(cells)]
    for _ in range(NUM_ROTATIONS - 1):
        if name == "O":
            out.append(out[-1])
        else:
            r, c = out[-1][:, 0], out[-1][:, 1]
            out.append(np.stack([c, size - 1 - r], axis=1))  # (r, c) -> (c, n-1-r) is clockwise
    return np.stack(out)


# SHAPES[piece, rotation, cell] = (row, col) offset inside the bounding box.
SHAPES: np.ndarray = np.stack([_rotations(n) for n in PIECE_NAMES]).astype(np.int32)
SHAPE_MIN_ROW: np.ndarray = SHAPES[..., 0].min(axis=-1)  # [piece, rot]
SHAPE_MIN_COL: np.ndarray = SHAPES[..., 1].min(axis=-1)
SHAPE_WIDTH: np.ndarray = SHAPES[..., 1].max(axis=-1) - SHAPE_MIN_COL + 1

# Guideline spawn: 3-wide pieces in columns 3-5, I in 3-6, O in 4-5, all touching the top row.
SPAWN_COL = 3
SPAWN_ROW: np.ndarray = (-SHAPE_MIN_ROW[:, 0]).astype(np.int32)  # -1 for I (its cells sit in box row 1)

# SRS kick tests as printed in the guideline, (x, y) with y pointing UP, keyed by (from, to)
# rotation state (0 = spawn, 1 = R, 2 = 180, 3 = L).
_JLSTZ_KICKS = {
    (0, 1): [(0, 0), (-1, 0), (-1, 1), (0, -2), (-1, -2)],
    (1, 0): [(0, 0), (1, 0), (1, -1), (0, 2), (1, 2)],
    (1, 2): [(0, 0), (1, 0), (1, -1), (0, 2), (1, 2)],
    (2, 1): [(0, 0), (-1, 0), (-1, 1), (0, -2), (-1, -2)],
    (2, 3): [(0, 0), (1, 0), (1, 1), (0, -2), (1, -2)],
    (3, 2): [(0, 0), (-1, 0), (-1, -1), (0, 2), (-1, 2)],
    (3, 0): [(0, 0), (-1, 0), (-1, -1), (0, 2), (-1, 2)],
    (0, 3): [(0, 0), (1, 0), (1, 1), (0, -2), (1, -2)],
}
_I_KICKS = {
    (0, 1): [(0, 0), (-2, 0), (1, 0), (-2, -1), (1, 2)],
    (1, 0): [(0, 0), (2, 0), (-1, 0), (2, 1), (-1, -2)],
    (1, 2): [(0, 0), (-1, 0), (2, 0), (-1, 2), (2, -1)],
    (2, 1): [(0, 0), (1, 0), (-2, 0), (1, -2), (-2, 1)],
    (2, 3): [(0, 0), (2, 0), (-1, 0), (2, 1), (-1, -2)],
    (3, 2): [(0, 0), (-2, 0), (1, 0), (-2, -1), (1, 2)],
    (3, 0): [(0, 0), (1, 0), (-2, 0), (1, -2), (-2, 1)],
    (0, 3): [(0, 0), (-1, 0), (2, 0), (-1, 2), (2, -1)],
}


def _kick_table() -> np.ndarray:
    """KICKS[piece, from_rot, direction (0 = cw, 1 = ccw), test] = (d_row, d_col).

    Converted to board coordinates once (d_row = -y) so the game logic never flips signs. O gets
    five zero tests: it never kicks.
    """
    table = np.zeros((NUM_PIECES, NUM_ROTATIONS, 2, NUM_KICKS, 2), np.int32)
    for p, name in enumerate(PIECE_NAMES):
        if name == "O":
            continue
        kicks = _I_KICKS if name == "I" else _JLSTZ_KICKS
        for frm in range(NUM_ROTATIONS):
            for d, to in enumerate(((frm + 1) % 4, (frm + 3) % 4)):
                table[p, frm, d] = [(-y, x) for x, y in kicks[(frm, to)]]
    return table


KICKS: np.ndarray = _kick_table()

# Palette for render_pixels: 0 empty, 1..7 pieces (guideline colours), 8 garbage / greyed-out,
# 9 side-panel background, 10 separator.
GARBAGE_CELL = 8
PANEL_BG = 9
SEPARATOR = 10
PALETTE: np.ndarray = np.array(
    [
        (0, 0, 0),
        (0, 240, 240),
        (240, 240, 0),
        (160, 0, 240),
        (0, 240, 0),
        (240, 0, 0),
        (0, 0, 240),
        (240, 160, 0),
        (128, 128, 128),
        (30, 30, 30),
        (90, 90, 90),
    ],
    np.uint8,
)
