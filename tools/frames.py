"""Pictures for the tools: env states and saved observations to RGB frames, text to images,
captions under frames, and GIF/MP4/PNG writing.

Every function returns ``uint8 [H, W, 3]`` numpy arrays so play, render and the tests share one
image type. How a saved observation becomes a picture depends on what it holds:

* pixel observations (``[H, W, 3]`` floats in [0, 1]) are shown as they are;
* Craftax-Classic symbolic observations are decoded back into a map of craftax's own 16-px block,
  mob and player textures (the 7 x 9 view the agent sees; inventory and vitals go in the caption
  through the canonical text);
* Tetris symbolic observations are drawn as the board, the falling piece highlighted;
* full Craftax symbolic observations (83 block/item/mob/light channels per tile) are shown as their
  canonical text (``utils.text_obs``) rendered into an image: a faithful tile picture would need
  full Craftax's per-floor mob texture tables, and the text already names everything on the map.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.errors import UserError
from utils.media import write_gif

CAPTION_BG = (24, 24, 24)
CAPTION_FG = (235, 235, 235)
TEXT_BG = (250, 250, 245)
TEXT_FG = (20, 20, 20)
VIDEO_SUFFIXES = (".gif", ".mp4")


# ----------------------------------------------------------------------------------------------
# Env states (live games)
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Saved observations
# ----------------------------------------------------------------------------------------------


def obs_picture(obs: np.ndarray, env_name: str) -> np.ndarray:
    """A picture of one saved observation (see the module docstring for what each env shows)."""
    obs = np.asarray(obs)
    if obs.ndim == 3:
        scale = 255.0 if obs.dtype.kind == "f" and obs.max() <= 1.0 + 1e-6 else 1.0
        return (obs.astype(np.float32) * scale).clip(0, 255).astype(np.uint8)
    if env_name == "Craftax-Classic-Symbolic-v1":
        return classic_map_picture(obs)
    if env_name.startswith("Tetris-"):
        return tetris_board_picture(obs)
    if env_name == "Craftax-Symbolic-v1":
        from utils.text_obs import render_text
        return text_image(render_text(obs, env_name))
    raise UserError(f"cannot draw an observation of shape {obs.shape} from {env_name}")


@functools.lru_cache(maxsize=1)
def _classic_tiles() -> dict[str, np.ndarray]:
    """craftax's 16-px Classic textures: blocks, mobs (with alpha) and the player by direction."""
    from craftax.craftax_classic.constants import BLOCK_PIXEL_SIZE_IMG, OBS_DIM, load_all_textures

    from utils.textures import CLASSIC, ensure_texture_cache

    ensure_texture_cache(CLASSIC)
    t = load_all_textures()[BLOCK_PIXEL_SIZE_IMG]
    px = BLOCK_PIXEL_SIZE_IMG
    r0, c0 = (OBS_DIM[0] // 2) * px, (OBS_DIM[1] // 2) * px  # the player's tile in the full-map ones
    crop = lambda a: np.asarray(a)[:, r0:r0 + px, c0:c0 + px].astype(np.float32)
    mobs = ("zombie", "cow", "skeleton", "arrow")  # text_obs channel order
    return {
        "blocks": np.asarray(t["block_textures"], dtype=np.float32),
        "mobs": np.stack([np.asarray(t[f"{m}_texture"], dtype=np.float32) for m in mobs]),
        "mob_alpha": np.stack([np.asarray(t[f"{m}_texture_alpha"], dtype=np.float32) for m in mobs]),
        "player": crop(t["full_map_player_textures"]),
        "player_alpha": crop(t["full_map_player_textures_alpha"]),
        "night": np.asarray(t["night_texture"], dtype=np.float32),
        "px": np.asarray(px),
    }


def classic_map_picture(obs: np.ndarray) -> np.ndarray:
    """Decode a Craftax-Classic symbolic observation's 7 x 9 view into craftax's textures."""
    from utils.text_obs import obs_layout

    layout = obs_layout("Craftax-Classic-Symbolic-v1")
    obs = np.asarray(obs, dtype=np.float32)
    if obs.shape != (layout.obs_dim,):
        raise UserError(f"a Craftax-Classic symbolic observation has shape [{layout.obs_dim}], got {obs.shape}")
    tiles = _classic_tiles()
    px = int(tiles["px"])
    rows, cols = layout.view_shape
    grid = obs[:layout.map_size].reshape(rows, cols, layout.channels)
    n_blocks = len(layout.block_names)
    blocks = grid[..., :n_blocks].argmax(-1)
    mobs = grid[..., n_blocks:n_blocks + len(layout.mob_names)] > 0.5
    image = np.zeros((rows * px, cols * px, 3), np.float32)
    for r in range(rows):
        for c in range(cols):
            tile = tiles["blocks"][blocks[r, c]]
            for m in np.flatnonzero(mobs[r, c]):
                alpha = tiles["mob_alpha"][m]
                tile = tile * (1 - alpha) + tiles["mobs"][m] * alpha
            image[r * px:(r + 1) * px, c * px:(c + 1) * px] = tile
    direction = obs[layout.tail_slice("direction")]
    sleeping = obs[layout.tail_slice("sleeping")][0] > 0.5
    pose = 4 if sleeping else int(direction.argmax()) if direction.max() > 0.5 else 3
    r, c = layout.centre
    centre = image[r * px:(r + 1) * px, c * px:(c + 1) * px]
    alpha = tiles["player_alpha"][pose]
    image[r * px:(r + 1) * px, c * px:(c + 1) * px] = centre * (1 - alpha) + tiles["player"][pose] * alpha
    light = float(obs[layout.tail_slice("light")][0])
    return _classic_shading(image, light, sleeping, tiles["night"]).clip(0, 255).astype(np.uint8)


def _classic_shading(image: np.ndarray, daylight: float, sleeping: bool, night: np.ndarray) -> np.ndarray:
    """craftax-classic's dusk and sleep colouring (its renderer, without the random static it adds
    below daylight 0.5, which depends on the env's RNG state and is not in the observation)."""
    grey = lambda x: (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]
    night_pixels = 0.4 * image + 0.6 * grey(image)
    night_pixels = 0.5 * night_pixels + 0.5 * night
    image = daylight * image + (1 - daylight) * night_pixels
    if sleeping:
        image = np.broadcast_to(0.5 * grey(image), image.shape) + 0.5 * np.array([0, 0, 16])
    return image


def tetris_board_picture(obs: np.ndarray, cell_px: int = 8) -> np.ndarray:
    """Locked cells grey, the falling piece orange, from a Tetris symbolic observation."""
    from utils.envs.tetris_pieces import BOARD_H, BOARD_W

    obs = np.asarray(obs, dtype=np.float32)
    cells = BOARD_H * BOARD_W
    if obs.ndim != 1 or obs.shape[0] < 2 * cells:
        raise UserError(f"a Tetris observation starts with 2 x {cells} board cells, got shape {obs.shape}")
    locked = obs[:cells].reshape(BOARD_H, BOARD_W) > 0.5
    falling = obs[cells:2 * cells].reshape(BOARD_H, BOARD_W) > 0.5
    grid = np.full((BOARD_H, BOARD_W, 3), 16, np.uint8)
    grid[locked] = (150, 150, 160)
    grid[falling] = (240, 150, 40)
    image = np.repeat(np.repeat(grid, cell_px, 0), cell_px, 1)
    image[::cell_px] //= 2  # thin grid lines keep neighbouring cells apart
    image[:, ::cell_px] //= 2
    return image


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _font(size: int):
    """DejaVu Sans Mono from matplotlib's own data (always installed): fixed width, no system fonts."""
    from matplotlib import font_manager
    from PIL import ImageFont

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans Mono"), size)


def wrap_lines(text: str, width: int) -> list[str]:
    import textwrap

    lines: list[str] = []
    for line in text.splitlines() or [""]:
        lines += textwrap.wrap(line, width, subsequent_indent="  ") or [""]
    return lines


def text_image(text: str, width_chars: int = 80, font_size: int = 12, margin: int = 6,
               min_width: int = 0) -> np.ndarray:
    """Render ``text`` (wrapped at ``width_chars``) as black-on-white monospace lines."""
    from PIL import Image, ImageDraw

    font = _font(font_size)
    lines = wrap_lines(text, width_chars)
    line_h = font_size + 3
    char_w = font.getlength("M")
    width = max(min_width, int(char_w * max(len(line) for line in lines)) + 2 * margin)
    image = Image.new("RGB", (width, line_h * len(lines) + 2 * margin), TEXT_BG)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * line_h), line, fill=TEXT_FG, font=font)
    return np.asarray(image)


def with_caption(frame: np.ndarray, lines: Sequence[str], min_width: int = 320, font_size: int = 11,
                 num_lines: int | None = None) -> np.ndarray:
    """``frame`` scaled up by whole pixels to at least ``min_width``, above a strip of text lines.

    ``num_lines`` fixes the strip's height (video frames must all have one size); longer captions
    are cut, shorter ones padded.
    """
    from PIL import Image, ImageDraw

    frame = np.asarray(frame, dtype=np.uint8)
    scale = max(1, -(-min_width // frame.shape[1]))
    frame = np.repeat(np.repeat(frame, scale, 0), scale, 1)
    width = frame.shape[1]
    font = _font(font_size)
    chars = max(10, int((width - 8) // font.getlength("M")))
    wrapped = [piece for line in lines for piece in wrap_lines(line, chars)]
    count = len(wrapped) if num_lines is None else num_lines
    wrapped = (wrapped + [""] * count)[:count]
    line_h = font_size + 3
    strip = Image.new("RGB", (width, line_h * count + 6), CAPTION_BG)
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(wrapped):
        draw.text((4, 3 + i * line_h), line, fill=CAPTION_FG, font=font)
    return np.concatenate([frame, np.asarray(strip)], axis=0)


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 4) -> np.ndarray:
    """Two images next to each other, top-aligned, padded to the taller one."""
    height = max(left.shape[0], right.shape[0])
    pad = lambda img: np.pad(img, ((0, height - img.shape[0]), (0, 0), (0, 0)), constant_values=0)
    spacer = np.zeros((height, gap, 3), np.uint8)
    return np.concatenate([pad(left), spacer, pad(right)], axis=1)


def same_size(frames: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Pad every frame (bottom/right, black) to the largest height and width, as videos need."""
    height = max(f.shape[0] for f in frames)
    width = max(f.shape[1] for f in frames)
    return [np.pad(f, ((0, height - f.shape[0]), (0, width - f.shape[1]), (0, 0))) for f in frames]


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def save_png(path: str | Path, frame: np.ndarray) -> None:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(frame, dtype=np.uint8)).save(path)


def write_video(path: str | Path, frames: Sequence[np.ndarray], fps: int = 10) -> Path:
    """A GIF (looping) or an MP4 (H.264 through imageio-ffmpeg), chosen by the suffix."""
    import imageio.v2 as imageio

    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise UserError(f"--out {path}: the video must end in .gif or .mp4")
    if not frames:
        raise UserError(f"no frames to write to {path}")
    frames = same_size(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        return write_gif(path, frames, fps)
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise UserError("MP4 needs imageio-ffmpeg: pip install -e '.[tools]' (or write a .gif)") from None
    # H.264 wants even sizes; macro_block_size=2 pads to them instead of resizing. The writer
    # starts ffmpeg with fork+exec, which Python flags as risky next to JAX's threads; exec follows
    # at once, so the warning does not apply.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=2,
                                ffmpeg_log_level="error") as writer:
            for frame in frames:
                writer.append_data(frame)
    return path
