"""Frames of live games and GIF files, shared by every area that shows an agent playing.

One renderer choice and one GIF writer, so a GIF from offline evaluation, LLM play or the tools
looks and times the same. GIFs are written with Pillow, whose frame ``duration`` is in
milliseconds (imageio's v2 ``mimsave`` also passes milliseconds to Pillow in current versions, so
``duration=1/fps`` there silently makes frames with no delay).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from utils.errors import UserError


def state_renderer(env) -> Callable[[Any], np.ndarray]:
    """``state -> uint8 [H, W, 3]`` for ONE unbatched base-env state of a ``utils.envs`` env.

    Craftax uses its own pixel renderer at 16 px per block (the size of the game's image
    observations); other envs (Tetris) their ``render_pixels``.
    """
    import jax

    from utils.textures import constants_module_for, ensure_texture_cache

    if env.name.startswith("Craftax-"):
        ensure_texture_cache(constants_module_for(env.name))
    if env.name.startswith("Craftax-Classic"):
        from craftax.craftax_classic.constants import BLOCK_PIXEL_SIZE_IMG
        from craftax.craftax_classic.renderer import make_craftax_pixel_renderer
        render = jax.jit(make_craftax_pixel_renderer(BLOCK_PIXEL_SIZE_IMG))
    elif env.name.startswith("Craftax-"):
        from craftax.craftax.constants import BLOCK_PIXEL_SIZE_IMG
        from craftax.craftax.renderer import make_craftax_pixel_renderer
        render = jax.jit(make_craftax_pixel_renderer(BLOCK_PIXEL_SIZE_IMG))
    elif hasattr(env.base_env, "render_pixels"):
        render = env.base_env.render_pixels
    else:
        raise UserError(f"{env.name} has no pixel renderer; add one to utils/media.py")
    return lambda state: np.asarray(render(state)).clip(0, 255).astype(np.uint8)


def first_env_renderer(env) -> Callable[[Any], np.ndarray]:
    """``VecEnv state -> frame`` of env 0: what a GIF of a batched evaluation shows."""
    import jax

    one = state_renderer(env)
    return lambda state: one(jax.tree.map(lambda x: x[0], state.env_state))


def write_gif(path: str | Path, frames: Sequence[np.ndarray], fps: int = 10) -> Path:
    """A looping GIF at ``fps`` frames per second, written atomically (temp file, then rename)."""
    from PIL import Image

    if not len(frames):
        raise UserError(f"no frames to write to {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(np.asarray(frame, dtype=np.uint8)) for frame in frames]
    tmp = path.with_name(f".{path.name}.tmp")
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, round(1000 / fps)), loop=0)
    tmp.replace(path)
    return path
