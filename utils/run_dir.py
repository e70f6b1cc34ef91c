"""Run folders: ``runs/<area>/<algo>/<env>/<run-name>/`` with the resolved config and resume rules.

Re-running a command with the same folder resumes it; a folder whose saved config computes
something different is refused with the differing fields named, so two runs are never mixed. Where an
algorithm's config declares ``LENGTH_FIELDS`` (Dreamer: ``total_steps``), a new value of those continues
the run to the new length: a finished 100k run re-run with ``--total-steps 300000`` trains on from its
last checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from utils.config import differing_fields, fields_on_one_side, to_dict
from utils.errors import UserError
from utils.io import atomic_write_yaml, check_output_path


def default_run_name(config: Any) -> str:
    presets = "-".join(config.preset) if config.preset else "default"
    return f"{presets}-s{config.seed}"


def resolve_run_dir(config: Any, area: str, algo: str, root: str | Path = "runs") -> Path:
    if config.run_dir:
        return Path(config.run_dir)
    return Path(root) / area / algo / config.env / (config.run_name or default_run_name(config))


def read_saved_config(path: Path, flag: str = "--run-dir") -> dict[str, Any] | None:
    """The config saved in run folder ``path``, None for a new folder; a ``UserError`` if it is unreadable
    (a config.yaml edited by hand or cut short by a full disk must not be silently replaced)."""
    config_path = path / "config.yaml"
    if not config_path.is_file():
        return None
    try:
        with open(config_path) as f:
            saved = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        reason = str(error).splitlines()[0]
        raise UserError(f"{flag}: {config_path} is not valid YAML ({reason}); fix it, or pass a new "
                        f"{flag} to start a fresh run") from None
    if saved is not None and not isinstance(saved, dict):
        raise UserError(f"{flag}: {config_path} does not hold a config mapping; fix it, or pass a new {flag}")
    return saved or {}


def check_run_dir(path: Path, flag: str = "--run-dir") -> None:
    """What can be checked before any work: the folder can be created, and a saved config is readable."""
    check_output_path(path, flag, "dir")
    read_saved_config(path, flag)


def open_run_dir(config: Any, path: Path) -> bool:
    """Create or reopen ``path`` for ``config``; True if the folder already held this run."""
    config_path = path / "config.yaml"
    current = to_dict(config)
    flag = "--run-dir" if getattr(config, "run_dir", None) else "--run-name"
    check_output_path(path, flag, "dir")
    saved = read_saved_config(path, flag)
    if saved is not None:
        differences = differing_fields(saved, current, getattr(config, "LENGTH_FIELDS", frozenset()))
        if differences:
            raise UserError(
                f"run folder {path} holds a run with a different config ({'; '.join(differences)}); "
                "pass a new --run-name/--run-dir, or the saved values to resume it"
            )
        added, removed = fields_on_one_side(saved, current)
        if added or removed:
            print(f"note: {path}/config.yaml was written by an older version of this code"
                  + (f"; new fields take their current values: {', '.join(added)}" if added else "")
                  + (f"; fields no longer used: {', '.join(removed)}" if removed else ""))
        atomic_write_yaml(config_path, current)
        return True
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_yaml(config_path, current)
    return False
