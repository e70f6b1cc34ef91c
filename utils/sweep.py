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
import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from utils.errors import UserError
from utils.io import atomic_write_json

#: Fields a sweep may not vary: the seeds are what the intervals are taken over, the rest says where
#: and how results are written (or would put points of different envs in one ranking).
NOT_SWEEPABLE = frozenset({"seed", "num_seeds", "preset", "run_dir", "run_name", "sweep", "sweep_part", "devices",
                           "progress",
                           "tensorboard", "wandb", "wandb_project", "checkpoint_every", "save_trajectories",
                           "save_every", "env"})

INDEX_FILE = "sweep.json"


@dataclasses.dataclass
class SweepFields:
    """The command-line fields of an entry point that can sweep (mixed into its config dataclass)."""

    sweep: tuple[str, ...] = ()
    """Hyperparameter grid, e.g. --sweep lr=1e-4,3e-4 ent_coef=0.003,0.01: every point x every seed. Fields in
    the algorithm's SWEEP_FIELDS train in one compiled program; others (widths, env counts) run one program per
    value. Rank the points with python -m benchmarks.sweep FOLDER."""
    sweep_part: str = ""
    """K/N: train only part K (0-based) of N of the sweep's programs, e.g. one Slurm array task each
    (scripts/sbatch/sweep_array.sbatch); every part writes the same sweep.json. Empty: the whole sweep."""

    #: Fields that change no array shape, so a sweep over them trains in one program (per algorithm).
    SWEEP_FIELDS: ClassVar[tuple[str, ...]] = ()


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program of a sweep: its folder, its shape-changing values and the shape-free points
    it trains together (each with all of the run's seeds)."""

    folder: str
    values: dict
    points: list[dict]


def hyper_of(cfg: Any) -> dict[str, float]:
    """The config's values of its ``SWEEP_FIELDS``, as Python floats: what a compiled update reads as
    traced values (one per slot), so that a sweep over them is one program and a single run is a sweep
    of one point."""
    return {name: float(getattr(cfg, name)) for name in cfg.SWEEP_FIELDS}


def sweep_folder(cfg: Any, area: str, algo: str) -> Path:
    """Where a sweep writes: ``--run-dir``, or the run folder a single run would get, with ``-sweep``."""
    from utils.run_dir import default_run_name, resolve_run_dir

    return resolve_run_dir(dataclasses.replace(cfg, run_name=cfg.run_name or f"{default_run_name(cfg)}-sweep"),
                           area, algo)


def parse_part(text: str) -> tuple[int, int]:
    """``"K/N"`` as ``(K, N)``; ``""`` is the whole sweep, ``(0, 1)``."""
    if not text:
        return 0, 1
    k, sep, n = text.partition("/")
    try:
        part, parts = int(k), int(n)
    except ValueError:
        part, parts = -1, 0
    if not sep or parts < 1 or not 0 <= part < parts:
        raise UserError(f"--sweep-part must be K/N with 0 <= K < N (e.g. 0/4 for the first of 4 jobs), got {text!r}")
    return part, parts


def plan_programs(grid: dict[str, list], shape_free: Sequence[str], parts: int = 1) -> list[Program]:
    """The sweep's programs, in a fixed order every part computes alike: one per combination of the
    shape-changing fields, each split into enough pieces of its shape-free points that ``parts`` jobs
    all get work (a grid of shape-free fields only still spreads over an array of jobs)."""
    program_grid, inner_grid = split_grid(grid, shape_free)
    groups, inner = grid_points(program_grid), grid_points(inner_grid)
    pieces = min(len(inner), max(1, math.ceil(parts / len(groups))))
    programs = []
    for values in groups:
        for piece in range(pieces):
            chunk = inner[piece * len(inner) // pieces:(piece + 1) * len(inner) // pieces]
            programs.append(Program(f"program_{len(programs):03d}", values, chunk))
    return programs


def run_grid(cfg: Any, area: str, algo: str, train_program: Callable[[Any, list[dict]], dict]) -> dict:
    """Train this part's programs of ``cfg.sweep`` (every point x every seed), one after the other.

    ``train_program(program_cfg, points)`` trains one program: ``program_cfg`` is ``cfg`` with the
    program's shape-changing values and its own run folder in the sweep folder, and ``points`` the
    shape-free values of each of its points (slot ``p * num_seeds + s`` is seed ``s`` of point ``p``).
    ``sweep.json`` lists every program and point of the whole sweep before anything trains, so a partial
    sweep (or one part of an array) can be ranked; re-running the command resumes every program.
    """
    grid = parse_sweep(cfg, cfg.sweep)
    part, parts = parse_part(getattr(cfg, "sweep_part", ""))
    folder = sweep_folder(cfg, area, algo)
    shape_free = [f for f in grid if f in cfg.SWEEP_FIELDS]
    programs = plan_programs(grid, shape_free, parts)
    index = {"area": area, "algo": algo, "env": cfg.env, "fields": list(grid), "grid": grid, "shape_free": shape_free,
             "seed": cfg.seed, "num_seeds": cfg.num_seeds, "programs": [], "points": []}
    for program in programs:
        index["programs"].append({"folder": program.folder, "values": program.values,
                                  "slots": len(program.points) * cfg.num_seeds})
        for p, values in enumerate(program.points):
            index["points"].append({"values": {**program.values, **values}, "program": program.folder,
                                    "slots": [p * cfg.num_seeds + s for s in range(cfg.num_seeds)]})
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_index(Path(folder), index)
    results = []
    for number, program in enumerate(programs):
        if number % parts != part:
            continue
        # The program's folder records the shape-free values it trains (its config's sweep), for reading only.
        inner_values = {k: list(dict.fromkeys(v[k] for v in program.points)) for k in shape_free}
        program_cfg = dataclasses.replace(cfg, **program.values, run_dir=str(Path(folder) / program.folder),
                                          run_name=None, sweep=grid_specs(inner_values), sweep_part="")
        results.append(train_program(program_cfg, [dataclasses.replace(program_cfg, **v) for v in program.points]))
    return {"index": index, "programs": results, "run_dir": Path(folder)}


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
