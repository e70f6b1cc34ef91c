"""Hyperparameter grids from the command line: ``--sweep lr=1e-4,3e-4 ent_coef=0.003,0.01``.

A sweep is the product of the listed values, times the run's seeds. Fields that do not change any
array's shape (an algorithm lists them in its config's ``SWEEP_FIELDS``: learning rate, loss
coefficients, discounts) are fed to the compiled program as traced values, so the whole inner grid
trains in one program, vmapped beside the seeds; the other fields (widths, env counts) change the
program, so each of their combinations is a separate program run one after the other under the same
command. This module parses and checks the grid and writes the index that ties a sweep folder's
programs and slots to grid points; it knows nothing about any algorithm, so Dreamer can reuse it.

A sweep folder holds ``sweep.json`` (this index) and one ordinary run folder per program,
``program_000/``, ... . Inside a program the per-seed lists of ``metrics.jsonl`` and ``summary.json``
have one entry per *slot*: grid point major, seed minor (slot ``point * num_seeds + seed``).
``python -m benchmarks.sweep FOLDER`` ranks the points by final return with intervals over seeds.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Sequence

from utils.errors import UserError
from utils.io import atomic_write_json

#: Fields a sweep may not vary: the seeds are what the intervals are taken over, the rest says where
#: and how results are written (or would put points of different envs in one ranking).
NOT_SWEEPABLE = frozenset({"seed", "num_seeds", "preset", "run_dir", "run_name", "sweep", "devices", "progress",
                           "tensorboard", "wandb", "wandb_project", "checkpoint_every", "save_trajectories",
                           "save_every", "env"})

INDEX_FILE = "sweep.json"


def _parse_value(text: str, like: Any, flag: str) -> Any:
    """One value of ``--sweep name=...`` in the type of the field's current value."""
    try:
        if isinstance(like, bool):
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
    except ValueError:
        kind = "true or false" if isinstance(like, bool) else type(like).__name__
        raise UserError(f"--sweep {flag}: {text!r} is not a valid {kind}") from None
    return text


def parse_sweep(config: Any, specs: Sequence[str]) -> dict[str, list]:
    """``{field: [values]}`` in the order given, each value typed like the field; every grid point is
    checked with ``utils.config.check_config`` here, so a bad value stops before anything compiles."""
    from utils.config import check_config

    names = {f.name for f in dataclasses.fields(config)}
    grid: dict[str, list] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        field = name.strip().lstrip("-").replace("-", "_")
        if not sep or not values.strip():
            raise UserError(f"--sweep: {spec!r} is not NAME=V1,V2,...; e.g. --sweep lr=1e-4,3e-4 ent_coef=0.003,0.01")
        if field not in names:
            raise UserError(f"--sweep: unknown field {field!r}; see --help for the fields")
        if field in NOT_SWEEPABLE:
            raise UserError(f"--sweep: {field} cannot be swept (seeds give the intervals; run one sweep per env)")
        if field in grid:
            raise UserError(f"--sweep: {field} is listed twice")
        parsed = [_parse_value(v.strip(), getattr(config, field), field) for v in values.split(",") if v.strip()]
        if len(set(map(repr, parsed))) != len(parsed):
            raise UserError(f"--sweep: {field} lists a value twice")
        grid[field] = parsed
    for point in grid_points(grid):
        try:
            check_config(dataclasses.replace(config, **point, sweep=()))
        except UserError as error:
            raise UserError(f"--sweep: {error}") from None
    return grid


def grid_points(grid: dict[str, list]) -> list[dict]:
    """The product of a grid's values as ``[{field: value}]``, the last field varying fastest
    (``[{}]`` for an empty grid: one point, the config itself)."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def split_grid(grid: dict[str, list], shape_free: Sequence[str]) -> tuple[dict[str, list], dict[str, list]]:
    """``(program grid, in-program grid)``: fields outside ``shape_free`` need a program of their own."""
    return ({k: v for k, v in grid.items() if k not in shape_free},
            {k: v for k, v in grid.items() if k in shape_free})


def grid_specs(grid: dict[str, list]) -> tuple[str, ...]:
    """A grid back as ``--sweep`` arguments (what a program folder's config records)."""
    return tuple(f"{k}={','.join(str(v) for v in values)}" for k, values in grid.items())


def write_index(folder: Path, index: dict) -> None:
    atomic_write_json(Path(folder) / INDEX_FILE, index)
