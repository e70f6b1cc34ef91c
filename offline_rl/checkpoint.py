"""Self-describing PyTorch checkpoints: one file per save, written atomically.

A checkpoint holds everything evaluation needs without the training config or the dataset (the
network spec: observation shape and encoding, action count, feature width; the LLM labels block
when the policy uses hidden states; the normalisation statistics, inside the weights as buffers)
and everything a resumed run needs (optimiser states, position in the data, RNG states).

Layout inside ``<run>/checkpoints/``: ``step_<NNNNNNNNN>.pt``; the newest ``keep`` are kept. The file
format itself (names, format version, finding and loading) lives in :mod:`utils.torch_checkpoint`,
because ``online_rl`` reads it too (``--init-from``); it is re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from offline_rl.networks import NetworkSpec, PolicyNetwork
from utils.torch_checkpoint import (  # noqa: F401  (re-exported: offline_rl's readers import them from here)
    FORMAT_VERSION,
    checkpoint_files,
    checkpoint_name,
    checkpoint_step,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


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
        found = checkpoint_files(self.directory)
        return found[-1] if found else None

    def save(self, step: int, payload: dict[str, Any]) -> Path:
        path = self.directory / checkpoint_name(step)
        save_checkpoint(path, payload)
        for old in checkpoint_files(self.directory)[:-self.keep]:
            old.unlink(missing_ok=True)
        return path
