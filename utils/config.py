"""Typed configs: dataclass defaults, then YAML presets left to right, then single-field flags.

Every entry point declares a dataclass whose fields document themselves (tyro turns the field
docstrings into ``--help``). Presets live in ``configs/<area>/<algo>.yaml`` as a mapping from
preset name to field overrides, so ``--preset debug`` is a readable file, not code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import re
import sys
from pathlib import Path
from typing import Any, ClassVar, Sequence, TypeVar

import yaml

from utils.errors import UserError

C = TypeVar("C")

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"

#: Fields that may differ when a run folder is reused: they change where and how results are shown,
#: never what is computed (``devices`` splits the same global program over more devices: a checkpoint
#: resumes on any count).
PRESENTATION_FIELDS = frozenset(
    {"preset", "run_dir", "run_name", "progress", "tensorboard", "wandb", "wandb_project", "checkpoint_every",
     "devices"}
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

    #: Fields that only say how long to train, for algorithms where nothing else depends on them (no
    #: schedule over the run): re-running a folder with a new value continues the run to the new length
    #: instead of being refused. Empty here: PPO's learning rate anneals over ``total_steps``.
    LENGTH_FIELDS: ClassVar[frozenset[str]] = frozenset()


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
            raise UserError(f"--preset: unknown preset {name!r} in {source}; available: {', '.join(sorted(presets))}")
        overrides = presets[name] or {}
        unknown = sorted(set(overrides) - field_names)
        if unknown:
            raise UserError(f"--preset: preset {name!r} in {source} sets unknown fields: {', '.join(unknown)}")
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
    preset of the version named on the command line). The result has passed ``check_config``, so a
    bad number or output path stops here, before any env is built or program compiled."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = _preset_names(argv)
    presets = load_presets(area, algo)
    start = config_cls() if default is None else default
    base = apply_presets(start, names, presets, f"configs/{area}/{algo}.yaml")
    config = cli(config_cls, _strip_presets(argv), default=base)
    # The default run folder, checked before any work; an entry point whose env is only known later
    # (offline RL reads it from the dataset) checks it once it is resolved.
    if hasattr(config, "run_name") and not getattr(config, "run_dir", None) and getattr(config, "env", None):
        from utils.run_dir import check_run_dir, resolve_run_dir

        check_run_dir(resolve_run_dir(config, area, algo), "--run-dir")
    return config


def cli(config_cls: type[C], argv: Sequence[str] | None = None, default: C | None = None) -> C:
    """``tyro.cli`` with one-line errors, then ``check_config``: the parser for entry points without presets.

    tyro reports a bad flag in a several-line box; it is turned into a ``UserError`` (one ``error:``
    line, exit 2 through ``exit_on_user_error``) that names the flag. ``--help`` is unchanged."""
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            config = tyro.cli(config_cls, default=default, args=argv, description=config_cls.__doc__)
    except SystemExit as stop:
        if stop.code in (0, None):
            sys.stderr.write(captured.getvalue())
            raise
        raise UserError(_one_line(captured.getvalue(), config_cls)) from None
    except BaseException:  # a bug, not a user's mistake: show everything tyro said with the traceback
        sys.stderr.write(captured.getvalue())
        raise
    sys.stderr.write(captured.getvalue())  # warnings, if any
    return check_config(config)


def _one_line(box: str, config_cls: type) -> str:
    """The gist of one of tyro's error boxes, e.g. 'unknown flag --foo (did you mean --food?); see --help'."""
    lines = [line.strip(" \u2502\u256d\u256e\u2570\u256f\u2500") for line in box.splitlines()]
    lines = [line for line in lines if line and not re.fullmatch(r"[-\u2500 ]+", line)]
    text = " ".join(lines)
    match = re.search(r"Unrecognized options: (.*?)(?: Perhaps you meant:| For full helptext|$)", text)
    if match:
        tokens = [t for t in match.group(1).replace(",", " ").split()]
        flags = [t.split("=", 1)[0] for t in tokens if t.startswith("-")]
        hint = re.search(r"Perhaps you meant: (--[\w-]+)", text)
        suggestion = f" (did you mean {hint.group(1)}?)" if hint and len(flags) == 1 else ""
        if flags:
            return f"unknown flag{'s' if len(flags) > 1 else ''} {', '.join(flags)}{suggestion}; see --help"
        return f"unexpected argument{'s' if len(tokens) > 1 else ''} {' '.join(tokens)}; see --help"
    match = re.search(r"invalid choice '(.*?)' for argument '(\S+?)'\. Expected one of \((.*?)\)", text)
    if match:
        choices = match.group(3).replace("'", "").rstrip(",")
        return f"{match.group(2)}: invalid choice {match.group(1)!r}; expected one of {choices}"
    match = re.search(r"Error parsing (\S+?): (.*?)(?: Argument helptext:| For full helptext|$)", text)
    if match:
        reason = re.sub(r"invalid literal for int\(\) with base 10: (.*)", r"expected an integer, got \1",
                        match.group(2))
        reason = re.sub(r"could not convert string to float: (.*)", r"expected a number, got \1", reason)
        return f"{match.group(1)}: {reason}; see --help"
    match = re.search(r"Missing value for argument '(\S+)'", text)
    if match:
        return f"{match.group(1)} needs a value; see --help"
    match = re.search(r"Missing from [^:]*: (\S+)", text) or re.search(r"[Rr]equired options?:? (--[\w-]+)", text)
    if match:
        missing = match.group(1)
        if not missing.startswith("-"):  # a positional argument: tyro shows its type, name the field
            fields = [f.name.upper() for f in dataclasses.fields(config_cls)
                      if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
            missing = fields[0] if fields else "argument"
        return f"missing {missing}; see --help"
    body = re.split(r" For full helptext", text)[0]
    return f"{body}; see --help" if body else "bad command line; see --help"


#: Integer fields whose names say they count or size something: zero or less is a typo, and would
#: otherwise train nothing (and write ``complete: true``) or crash deep inside a compiled program.
_COUNT_NAME = re.compile(
    r"^(num|total|max|eval|report|render|rnd|icm|llm|feature|value)_|"
    r"_(steps|size|envs|every|episodes|width|length|chunk|epochs|batch|fps|frames|attempts|jobs|"
    r"horizon|ratio|count|chars|queue|after|n|seeds|context|sequences)$|"
    r"^(episodes|deter|hidden|stoch|classes|units|layers|cnn_depth|cnn_stages|bins|fps|shards_in_memory)$"
)
#: Count-like integers whose docs give 0 a meaning ("0: only at the end", "0: in this process").
ZERO_ALLOWED = frozenset({"eval_every", "eval_envs", "eval_episodes", "num_workers", "few_shot_count", "prefill",
                          "early_steps"})
#: Integers where a negative value means something (a layer counted from the last, any seed).
SIGNED = frozenset({"seed", "layer", "llm_layer"})
#: Fields that name something a command writes: a folder, or a file. (``--out`` is a file for some
#: commands and a folder for others: those commands check it themselves.)
OUTPUT_DIRS = frozenset({"save_trajectories", "record"})
OUTPUT_FILES = frozenset({"json", "gif", "embedded_redis"})
#: Fields that name something a command reads: it must exist (a dataset must also hold its manifest).
INPUT_PATHS = frozenset({"dataset", "checkpoint", "few_shot"})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_input_path(path: Path, flag: str) -> None:
    if flag == "--dataset" and not (path / "manifest.json").is_file():
        where = "" if path.exists() else ", the folder does not exist"
        raise UserError(f"{flag}: {path} is not a trajectory dataset (no manifest.json{where}); pass a folder "
                        "written by python -m online_rl.ppo --save-trajectories DIR")
    if not path.exists():
        raise UserError(f"{flag}: {path} does not exist; check the path")


def check_config(config: C) -> C:
    """Refuse numbers and output paths that cannot work, naming the flag; return ``config`` unchanged.

    One central check rather than one per entry point: every count must be positive, every other
    integer non-negative (except seeds and layer indices), rates positive, discounts in [0, 1],
    durations non-negative; the env and input paths must exist; output folders and files must be
    creatable (``utils.io.check_output_path``), and a reused run folder must hold a readable config
    (``utils.run_dir.check_run_dir``)."""
    from utils.io import check_output_path

    for field in dataclasses.fields(config):
        name, value = field.name, getattr(config, field.name)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int) and name not in SIGNED:
            positive = bool(_COUNT_NAME.search(name)) and name not in ZERO_ALLOWED
            if value < (1 if positive else 0):
                raise UserError(f"{_flag(name)} must be {'positive' if positive else 'zero or more'}, got {value}")
        elif isinstance(value, float):
            if math.isnan(value):
                raise UserError(f"{_flag(name)} must be a number, got nan")
            if (name == "lr" or name.endswith("_lr")) and value <= 0:
                raise UserError(f"{_flag(name)} must be positive, got {value}")
            if name in ("gamma", "int_gamma", "gae_lambda", "lam") and not 0 <= value <= 1:
                raise UserError(f"{_flag(name)} must be between 0 and 1, got {value}")
            if name.endswith(("_s", "_ms", "_mb")) and value < 0:
                raise UserError(f"{_flag(name)} must be zero or more, got {value}")
            if name == "watch" and value <= 0:  # a refresh interval
                raise UserError(f"{_flag(name)} must be positive, got {value}")
        elif isinstance(value, str) and value:
            if name in OUTPUT_DIRS:
                check_output_path(value, _flag(name), "dir")
            elif name in OUTPUT_FILES:
                check_output_path(value, _flag(name), "file")
            elif name in INPUT_PATHS:
                _check_input_path(Path(value), _flag(name))
    names = {field.name for field in dataclasses.fields(config)}
    if "env" in names and isinstance(config.env, str) and config.env:
        from utils.envs import ENV_NAMES

        if config.env not in ENV_NAMES:
            raise UserError(f"unknown env {config.env!r}; valid names: {', '.join(ENV_NAMES)}; fix --env")
    if "run_name" in names and getattr(config, "run_dir", None):  # a run folder this command writes
        from utils.run_dir import check_run_dir

        check_run_dir(Path(config.run_dir), "--run-dir")
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """Plain YAML/JSON-friendly dict (tuples become lists)."""

    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def differing_fields(saved: dict[str, Any], current: dict[str, Any],
                     length_fields: frozenset[str] = frozenset()) -> list[str]:
    """Fields that change what a run computes, listed as 'name: saved -> current' (``length_fields``:
    fields that only set how long the run is, so a new value extends or shortens it).

    Only fields both configs have are compared: a field on one side only was added or removed by a
    later version of the code (see :func:`fields_on_one_side`), and refusing to resume every run saved
    before it would strand them; the presets keep their old behaviour when fields are split or added.
    """
    keys = (set(saved) & set(current)) - PRESENTATION_FIELDS - length_fields
    return [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in sorted(keys) if saved[k] != current[k]]


def fields_on_one_side(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(fields the code added since the run was saved, fields it removed)``."""
    return sorted(set(current) - set(saved) - PRESENTATION_FIELDS), sorted(set(saved) - set(current) - PRESENTATION_FIELDS)
