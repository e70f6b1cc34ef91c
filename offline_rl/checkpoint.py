"""Self-describing PyTorch checkpoints: one file per save, written atomically.

A checkpoint holds everything evaluation needs without the training config or the dataset (the
network spec: observation shape and encoding, action count, feature width; the LLM labels block
when the policy uses hidden states; the normalisation statistics, inside the weights as buffers)
and everything a resumed run needs (optimiser states, position in the data, RNG states).

Layout inside ``<run>/checkpoints/``: ``step_<NNNNNNNNN>.pt``; the newest ``keep`` are kept.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch

from offline_rl.networks import NetworkSpec, PolicyNetwork
from utils.errors import UserError
from utils.io import atomic_write_bytes

FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^step_(\d{9})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:09d}.pt"


def checkpoint_step(path: Path) -> int:
    """The update a checkpoint file was saved at, from its name (no need to load it)."""
    return int(_NAME_RE.match(path.name).group(1))


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus the format version) atomically: a crash leaves the old file or none."""
    buffer = io.BytesIO()
    torch.save({**payload, "format_version": FORMAT_VERSION}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files of a folder, oldest first (the zero-padded step sorts by name)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME_RE.match(p.name))


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a file, else the newest checkpoint of a run folder (or its
    ``checkpoints/`` folder); a UserError naming what was looked for otherwise."""
    path = Path(path)
    if path.is_file():
        return path
    for folder in (path / "checkpoints", path):
        found = _checkpoints(folder)
        if found:
            return found[-1]
    raise UserError(f"{path}: no checkpoint found (expected a .pt file or a run folder with "
                    "checkpoints/step_*.pt); train one with python -m offline_rl.awr, offline_rl.bc or offline_rl.iql")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint file or a run folder's newest one."""
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


def policies_from_checkpoint(payload: dict[str, Any], device: str | torch.device = "cpu"
                             ) -> list[PolicyNetwork]:
    """One network per trained seed, weights and normalisation statistics loaded, in eval mode."""
    spec = NetworkSpec.from_dict(payload["network"])
    networks = []
    for state in payload["models"]:
        network = PolicyNetwork(spec)
        network.load_state_dict(state)
        networks.append(network.to(device).eval())
    return networks


class CheckpointDir:
    """``checkpoints/`` of a run: save by step, keep the newest ``keep``, find the latest."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = keep

    def latest(self) -> Path | None:
        found = _checkpoints(self.directory)
        return found[-1] if found else None

    def save(self, step: int, payload: dict[str, Any]) -> Path:
        path = self.directory / checkpoint_name(step)
        save_checkpoint(path, payload)
        for old in _checkpoints(self.directory)[:-self.keep]:
            old.unlink(missing_ok=True)
        return path
