"""One logger for every entry point: ``metrics.jsonl`` always, TensorBoard and wandb if asked.

A metrics line is one JSON object with ``step`` (env steps per seed) and the metrics; a metric with
one value per seed is written as a list, so per-seed curves survive. Missing values (no episode
finished in the window) are written as null.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from utils.errors import UserError
from utils.io import atomic_write_text, read_jsonl


def _plain(value: Any) -> Any:
    if isinstance(value, (np.ndarray, list, tuple)):
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim == 0:
            return _plain(float(arr))
        return [_plain(float(v)) for v in arr.reshape(-1)]
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, (np.integer,)):
        return int(value)
    return value


def _mean(value: Any) -> float | None:
    if isinstance(value, list):
        finite = [v for v in value if v is not None]
        return float(np.mean(finite)) if finite else None
    return value if isinstance(value, (int, float)) else None


class MetricsLogger:
    """Append metrics lines as they happen; on resume, first drop lines past the checkpoint."""

    def __init__(
        self,
        run_dir: Path,
        *,
        config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
        tensorboard: bool = False,
        wandb_mode: str = "disabled",
        wandb_project: str = "craftax-baselines",
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [row for row in read_jsonl(self.path) if row.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")
        self._tb = self._open_tensorboard(run_dir) if tensorboard else None
        self._wandb = self._open_wandb(run_dir, wandb_mode, wandb_project, config) if wandb_mode != "disabled" else None

    @staticmethod
    def _open_tensorboard(run_dir: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs tensorboardX: pip install -e '.[tensorboard]'") from None
        return SummaryWriter(str(Path(run_dir) / "tensorboard"))

    @staticmethod
    def _open_wandb(run_dir: Path, mode: str, project: str, config):
        if mode not in ("offline", "online"):
            raise UserError(f"--wandb must be disabled, offline or online, got {mode!r}")
        try:
            import wandb
        except ImportError:
            raise UserError("--wandb needs the wandb package: pip install -e '.[wandb]'") from None
        return wandb.init(project=project, dir=str(run_dir), mode=mode, config=dict(config or {}),
                          name=Path(run_dir).name, resume="allow", id=Path(run_dir).name)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        scalars = {k: _mean(v) for k, v in row.items() if k != "step"}
        scalars = {k: v for k, v in scalars.items() if v is not None}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        return row

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
