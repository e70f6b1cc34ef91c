"""What a vision-language model is told about a frame: one prompt per env family.

A text observation explains itself ("Craftax-Classic observation. Map: 7 rows x 9 cols centred on
you ..."), so text features need no more than the labelling presets' short instruction
(``configs/labelling/enqueue.yaml``, ``qwen-0.5b``: system prompt "You are an agent playing
Craftax, a 2D survival game.", template ``"{text}\\nWhat should you do next?"``). A frame does not:
the model must be told which game it shows and how to read the picture. These prompts follow the
text presets' wording and add that.

How a frame becomes a prompt (``utils.llm.vision``): the chat template renders
``[system, user]`` where the user turn is the image followed by ``LLMSpec.template`` with
``{text}`` replaced by the family's ``question``, and the system turn is ``LLMSpec.system_prompt``
when one is given, else the family's ``system``. So ``--template``/``--system-prompt`` work for
frames as for texts, and the defaults (``{text}``, none) give the prompts below.

:func:`frame_prompts_digest` goes into the template hash of image features (``LLMSpec``), so
editing a prompt here changes the features' identity, and datasets or runs made with the old
words are refused instead of mixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from utils.errors import UserError

__all__ = ["FramePrompt", "FRAME_PROMPTS", "FRAME_ENV_NAMES", "frame_family", "frame_prompt",
           "frame_prompts_digest"]

FRAME_ENV_NAMES = (
    "Craftax-Classic-Pixels-v1", "Craftax-Classic-Symbolic-v1", "Craftax-Pixels-v1", "Craftax-Symbolic-v1",
    *(f"Tetris-{action}-{reward}-v0" for action in ("Direct", "Placement")
      for reward in ("LinesOnly", "Standard", "Survival")),
)
"""Every env of ``utils.envs.ENV_NAMES`` (a test keeps them equal), listed here because importing
the env registry imports JAX, which a server of frames does not otherwise need."""


@dataclasses.dataclass(frozen=True)
class FramePrompt:
    """The words around one env family's frames."""

    system: str
    """The system turn: which game, and how to read its frames."""
    question: str
    """Replaces ``{text}`` in the spec's template; it follows the image in the user turn."""


FRAME_PROMPTS: dict[str, FramePrompt] = {
    "craftax-classic": FramePrompt(
        system=("You are an agent playing Craftax-Classic, a 2D survival game, seen from above. "
                "The image shows the 7 x 9 tiles around you, with you in the centre tile, and "
                "below them your health, food, drink and energy and your inventory."),
        question="This is what you see now. What should you do next?"),
    "craftax": FramePrompt(
        system=("You are an agent playing Craftax, a 2D survival game with several floors, seen "
                "from above. The image shows the 9 x 11 tiles around you, with you in the centre "
                "tile, and below them your health, food, drink, energy and mana, your inventory, "
                "potions and armour."),
        question="This is what you see now. What should you do next?"),
    "tetris": FramePrompt(
        system=("You are playing Tetris. The image shows the 10 x 20 board, where the falling "
                "piece drops onto the stack, and to its right the next piece and the held piece "
                "(grey when hold was already used for this piece). A full row clears."),
        question="This is the board now. What should you do next?"),
}
"""Family -> prompt. A family is :func:`frame_family` of an env name."""


def frame_family(env_name: str) -> str:
    """``craftax-classic``, ``craftax`` or ``tetris`` for a registered env (symbolic or pixel: the
    family, not the observation type, decides what a frame shows)."""
    if env_name not in FRAME_ENV_NAMES:
        raise UserError(f"unknown env {env_name!r} for frames; use one of {', '.join(FRAME_ENV_NAMES)}")
    if env_name.startswith("Craftax-Classic-"):
        return "craftax-classic"
    return "craftax" if env_name.startswith("Craftax-") else "tetris"


def frame_prompt(env_name: str) -> FramePrompt:
    """The prompt for frames of ``env_name``."""
    return FRAME_PROMPTS[frame_family(env_name)]


def frame_prompts_digest() -> str:
    """Short hash of every family's words, for the template hash of image features."""
    payload = json.dumps({k: dataclasses.asdict(v) for k, v in FRAME_PROMPTS.items()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
