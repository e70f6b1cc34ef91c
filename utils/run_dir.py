"""Run folders: ``runs/<area>/<algo>/<env>/<run-name>/`` with the resolved config and resume rules.

Re-running a command with the same folder resumes it; a folder whose saved config computes
something different is refused with the differing fields named, so two runs are never mixed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from utils.config import differing_fields, to_dict
from utils.errors import UserError
from utils.io import atomic_write_yaml


def default_run_name(config: Any) -> str:
    presets = "-".join(config.preset) if config.preset else "default"
    return f"{presets}-s{config.seed}"


def resolve_run_dir(config: Any, area: str, algo: str, root: str | Path = "runs") -> Path:
    if config.run_dir:
        return Path(config.run_dir)
    return Path(root) / area / algo / config.env / (config.run_name or default_run_name(config))


def open_run_dir(config: Any, path: Path) -> bool:
    """Create or reopen ``path`` for ``config``; True if the folder already held this run."""
    config_path = path / "config.yaml"
    current = to_dict(config)
    if config_path.exists():
        with open(config_path) as f:
            saved = yaml.safe_load(f) or {}
        differences = differing_fields(saved, current)
        if differences:
            raise UserError(
                f"run folder {path} holds a run with a different config ({'; '.join(differences)}); "
                "pass a new --run-name/--run-dir, or the saved values to resume it"
            )
        atomic_write_yaml(config_path, current)
        return True
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_yaml(config_path, current)
    return False
