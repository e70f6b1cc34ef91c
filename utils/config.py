"""Typed configs: dataclass defaults, then YAML presets left to right, then single-field flags.

Every entry point declares a dataclass whose fields document themselves (tyro turns the field
docstrings into ``--help``). Presets live in ``configs/<area>/<algo>.yaml`` as a mapping from
preset name to field overrides, so ``--preset debug`` is a readable file, not code.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from utils.errors import UserError

C = TypeVar("C")

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"

#: Fields that may differ when a run folder is reused: they change where and how results are shown,
#: never what is computed.
PRESENTATION_FIELDS = frozenset(
    {"preset", "run_dir", "run_name", "progress", "tensorboard", "wandb", "wandb_project", "checkpoint_every"}
)


@dataclasses.dataclass
class RunConfig:
    """Fields every training entry point shares (docs/design.md's command-line contract)."""

    env: str = "Craftax-Classic-Symbolic-v1"
    """Environment name (see utils.envs.ENV_NAMES)."""
    preset: tuple[str, ...] = ()
    """Presets from configs/<area>/<algo>.yaml, applied left to right before other flags."""
    run_dir: str | None = None
    """Run folder; default runs/<area>/<algo>/<env>/<run-name>. Re-running with the same folder resumes."""
    run_name: str | None = None
    """Name of the run folder; default '<presets>-s<seed>'."""
    seed: int = 0
    """Base random seed; seed i of --num-seeds uses seed + i."""
    num_seeds: int = 1
    """Independent seeds trained together in one compiled program (vmap)."""
    total_steps: int = 1_000_000
    """Env steps per seed."""
    checkpoint_every: int = 50
    """Save a checkpoint every this many updates (and at the end)."""
    progress: bool = True
    """Show a progress bar with steps/s and ETA."""
    tensorboard: bool = False
    """Also write TensorBoard event files (needs the 'tensorboard' extra)."""
    wandb: str = "disabled"
    """wandb mode: disabled, offline or online (needs the 'wandb' extra)."""
    wandb_project: str = "craftax-baselines"
    """wandb project name."""


def load_presets(area: str, algo: str) -> dict[str, dict[str, Any]]:
    path = CONFIG_ROOT / area / f"{algo}.yaml"
    if not path.exists():
        return {}
    with open(path) as f:
        presets = yaml.safe_load(f) or {}
    if not isinstance(presets, dict):
        raise UserError(f"{path} must map preset names to field overrides")
    return presets


def apply_presets(config: C, names: Sequence[str], presets: dict[str, dict[str, Any]], source: str) -> C:
    """Return ``config`` with each named preset's fields set, in order."""
    field_names = {f.name for f in dataclasses.fields(config)}
    for name in names:
        if name not in presets:
            raise UserError(f"unknown preset {name!r} in {source}; available: {', '.join(sorted(presets))}")
        overrides = presets[name] or {}
        unknown = sorted(set(overrides) - field_names)
        if unknown:
            raise UserError(f"preset {name!r} in {source} sets unknown fields: {', '.join(unknown)}")
        overrides = {
            k: tuple(v) if isinstance(getattr(config, k), tuple) and isinstance(v, list) else v
            for k, v in overrides.items()
        }
        config = dataclasses.replace(config, **overrides)
    return dataclasses.replace(config, preset=tuple(names))


def _preset_names(argv: Sequence[str]) -> list[str]:
    """Collect ``--preset a [b ...]`` values (the flag may repeat) before tyro sees the rest."""
    names, collecting = [], False
    for arg in argv:
        if arg == "--preset":
            collecting = True
        elif arg.startswith("--preset="):
            names.append(arg.split("=", 1)[1])
            collecting = False
        elif arg.startswith("-"):
            collecting = False
        elif collecting:
            names.append(arg)
    return names


def _strip_presets(argv: Sequence[str]) -> list[str]:
    out, skipping = [], False
    for arg in argv:
        if arg == "--preset":
            skipping = True
        elif arg.startswith("--preset="):
            skipping = False
        elif arg.startswith("-"):
            skipping = False
            out.append(arg)
        elif not skipping:
            out.append(arg)
    return out


def parse_config(config_cls: type[C], area: str, algo: str, argv: Sequence[str] | None = None,
                 default: C | None = None) -> C:
    """Defaults, then presets (left to right), then the remaining flags; ``--help`` lists every field.

    ``default`` replaces ``config_cls()`` as the starting point (e.g. Dreamer starts from the
    preset of the version named on the command line)."""
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    names = _preset_names(argv)
    presets = load_presets(area, algo)
    start = config_cls() if default is None else default
    base = apply_presets(start, names, presets, f"configs/{area}/{algo}.yaml")
    return tyro.cli(config_cls, default=base, args=_strip_presets(argv), description=config_cls.__doc__)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain YAML/JSON-friendly dict (tuples become lists)."""

    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def differing_fields(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Fields that change what a run computes, listed as 'name: saved -> current'."""
    keys = (set(saved) | set(current)) - PRESENTATION_FIELDS
    return [
        f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(keys) if saved.get(k) != current.get(k)
    ]
