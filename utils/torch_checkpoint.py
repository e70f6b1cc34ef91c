"""The offline-RL checkpoint file, as every reader sees it: where it is, what it holds, its policy's layers.

``offline_rl`` writes one self-describing PyTorch file per save (``checkpoints/step_NNNNNNNNN.pt``: the
network spec, the weights of every seed, the LLM labels block when the policy reads hidden states and
``format_version``). Two areas read it: ``offline_rl`` itself (resume, evaluation) and ``online_rl``
(``--init-from``: PPO fine-tuned from an offline policy). The import rules keep the algorithm areas
apart, so the file's format lives here, in ``utils``, once; ``offline_rl.checkpoint`` re-exports it.

PyTorch is imported inside the functions that need it: importing this module costs nothing, so a
JAX-only install (no ``offline`` extra) can still ask whether a folder holds such a checkpoint.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np

from utils.errors import UserError
from utils.io import atomic_write_bytes

FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^step_(\d{9})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:09d}.pt"


def checkpoint_step(path: Path) -> int:
    """The update a checkpoint file was saved at, from its name (no need to load it)."""
    return int(_NAME_RE.match(path.name).group(1))


def checkpoint_files(folder: Path) -> list[Path]:
    """Checkpoint files of a folder, oldest first (the zero-padded step sorts by name)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME_RE.match(p.name))


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus the format version) atomically: a crash leaves the old file or none."""
    import torch

    buffer = io.BytesIO()
    torch.save({**payload, "format_version": FORMAT_VERSION}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def newest_checkpoint(path: str | Path) -> Path | None:
    """``path`` itself if it is a ``.pt`` file, else the newest checkpoint of a run folder (or of its
    ``checkpoints/`` folder); None when there is none."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".pt" else None
    for folder in (path / "checkpoints", path):
        found = checkpoint_files(folder)
        if found:
            return found[-1]
    return None


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a file, else the newest checkpoint of a run folder (or its
    ``checkpoints/`` folder); a UserError naming what was looked for otherwise."""
    path = Path(path)
    if path.is_file():
        return path
    found = newest_checkpoint(path)
    if found is None:
        raise UserError(f"{path}: no checkpoint found (expected a .pt file or a run folder with "
                        "checkpoints/step_*.pt); train one with python -m offline_rl.awr, offline_rl.bc or offline_rl.iql")
    return found


def load_checkpoint(path: str | Path, device: Any = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint file or a run folder's newest one."""
    import torch

    path = find_checkpoint(path)
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise UserError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc}); "
                        "delete it to resume from the previous one") from exc
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        version = payload.get("format_version") if isinstance(payload, dict) else None
        raise UserError(f"{path}: checkpoint format version {version!r}, this code reads "
                        f"{FORMAT_VERSION}; use the matching version of craftax-baselines")
    payload["path"] = str(path)
    return payload


Layer = tuple[np.ndarray, np.ndarray]
"""One dense layer as ``(kernel [in, out], bias [out])``: flax's layout, the transpose of torch's weight."""


def _dense(state: dict[str, Any], name: str) -> Layer:
    return (state[f"{name}.weight"].detach().cpu().numpy().T.copy(),
            state[f"{name}.bias"].detach().cpu().numpy().copy())


def _mlp_layers(state: dict[str, Any], torso: str, depth: int) -> list[Layer]:
    """The dense layers of a torso's ``nn.Sequential`` of (Linear, activation) pairs: Linear ``i`` is item ``2i``."""
    return [_dense(state, f"{torso}.mlp.{2 * i}") for i in range(depth)]


def mlp_policy_layers(payload: dict[str, Any], seed_index: int) -> dict[str, Any]:
    """One seed's actor (and critic, where the network has one) of a symbolic-observation checkpoint as
    plain arrays: ``{"actor": [layers], "logits": layer, "critic": [layers] or None, "value": layer or None}``.

    The names are those of ``offline_rl.networks.PolicyNetwork`` (``actor.mlp.0``, ``logits``,
    ``critic.mlp.0``, ``value``); ``tests/test_init_from.py`` pins them by comparing action probabilities.
    IQL's Q networks are left out: the PPO critic is a state value, IQL's ``V``."""
    network = payload["network"]
    state = payload["models"][seed_index]
    depth = int(network["depth"])
    critic = bool(network.get("critic"))
    return {
        "actor": _mlp_layers(state, "actor", depth),
        "logits": _dense(state, "logits"),
        "critic": _mlp_layers(state, "critic", depth) if critic else None,
        "value": _dense(state, "value") if critic else None,
    }
