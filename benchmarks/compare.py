"""Compare methods at equal env steps: run a suite, then write its table and learning curves.

A suite (``benchmarks/suites/<name>.yaml``) names the envs, the seeds, the budget in env steps per
seed, and for every method its entry point, presets and extra flags. Each method trains through its
normal entry point with ``--run-dir runs/compare/<suite>/<env>/<method>/<seeds>``, so its run folder
holds the metrics, the checkpoints and ``summary.json``, and running the same command again resumes
an interrupted comparison where it stopped (finished runs are skipped).

    python -m benchmarks.compare classic_2m                   # every run, one after another, then the table
    python -m benchmarks.compare classic_debug --budget 256   # a quick check of the whole pipeline
    python -m benchmarks.compare classic_2m --list            # the runs (Slurm array indices) and their state
    python -m benchmarks.compare classic_2m --slurm --dry-run # print the array job: one task per run
    python -m benchmarks.compare classic_2m --slurm --partition gpu --account proj   # submit it
    python -m benchmarks.compare classic_2m --collect         # only (re)write the table and plot

Collecting writes the suite's record, ``docs/data/<suite>.json`` (per seed: curve, final and
evaluation metrics; per process: wall and CPU seconds, machine, commit; ``benchmarks.records``), then
``benchmarks.report`` renders it into ``docs/results.md`` between ``<!-- report:<suite>:begin -->`` and
``<!-- report:<suite>:end -->`` (appended if missing) with intervals over seeds, and draws its figure
into ``docs/figures/``; ``python -m benchmarks.report`` redraws every block from the data alone. Suite flags may use ``${VAR}`` for site paths (e.g. a model folder); they are
expanded where the run starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

from benchmarks import records
from benchmarks.common import git_commit, host_description
from utils.errors import UserError, exit_on_user_error
from utils.io import atomic_write_json, check_output_path

REPO_ROOT = Path(__file__).resolve().parent.parent
SUITES_DIR = Path(__file__).resolve().parent / "suites"
DEFAULT_RUNS_ROOT = "runs/compare"
DEFAULT_RESULTS_MD = "docs/results.md"
TASK_RECORD = "compare_task.json"  # written by this script into each run folder

_SUITE_KEYS = {"description", "envs", "seeds", "first_seed", "budget", "flags", "methods", "slurm",
               "seed_role", "headline", "equal_compute", "references", "time_target_seconds",
               "early_steps", "diagnostics"}
_REFERENCE_KEYS = {"env", "label", "value", "source"}
_METHOD_KEYS = {"module", "presets", "flags", "seeds_together", "budget_factor"}
_SLURM_KEYS = {"time", "gres", "cpus_per_task", "mem"}


# ---------------------------------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    module: str
    presets: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    seeds_together: bool = True
    """True: all seeds in one process (--num-seeds, vmapped); False: one process per seed."""
    budget_factor: int = 1
    """This method trains ``budget_factor`` times the suite's env steps: a cheap method given the compute
    of an expensive one (PPO for as many CPU seconds as Dreamer). The report compares it with the others
    at equal training time only, never at equal env steps."""


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    description: str
    envs: tuple[str, ...]
    seeds: int
    first_seed: int
    budget: int
    flags: tuple[str, ...]
    methods: tuple[Method, ...]
    slurm: dict[str, Any]
    overrides: tuple[str, ...] = ()
    """The command-line flags that changed the file's values (shown in the reproduce command)."""
    seed_role: str | None = None
    """"report": no seed of the suite was used to choose any preset; "tuning": they were."""
    headline: bool = False
    """A headline table of docs/results.md: the report flags it while it has fewer than 5 seeds."""
    equal_compute: bool = False
    """Also tabulate and plot each method's return at equal training time (methods of unequal cost)."""
    references: tuple[dict, ...] = ()
    """Published or earlier figures at the same budget: ``{env, label, value, source}``."""
    time_target_seconds: float | None = None
    """A wall-clock goal per training process (e.g. a preset meant to finish within 16 minutes): the
    report adds each process's wall time and the return each seed reached within the goal."""
    early_steps: tuple[int, ...] = ()
    """Env steps at which the report also compares the methods along the curve (e.g. does a pretrained
    policy's head start survive the first updates, and where do the curves meet)."""
    diagnostics: tuple[str, ...] = ()
    """Logged metrics (e.g. ``diag/reward_pred_first``) the record keeps per seed as curves and the report
    tabulates at ``early_steps``: the evidence for or against a hypothesis about why a method learns."""


def suite_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"suite file {path} not found")
        return path
    path = SUITES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SUITES_DIR.glob("*.yaml")))
        raise UserError(f"unknown suite {name_or_path!r}; available: {known} (or a path to a YAML file)")
    return path


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise UserError(f"{what} must be a list of strings, got {value!r}")
    return tuple(str(v) for v in value)


def _unknown_keys(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown keys {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def load_suite(name_or_path: str, *, budget: int | None = None, seeds: int | None = None,
               envs: Iterable[str] | None = None, methods: Iterable[str] | None = None) -> Suite:
    """Read and check a suite; the keyword arguments override its values (``--budget`` etc.)."""
    path = suite_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping with envs, seeds, budget and methods")
    _unknown_keys(raw, _SUITE_KEYS, str(path))
    raw_methods = raw.get("methods") or {}
    if not isinstance(raw_methods, dict) or not raw_methods:
        raise UserError(f"{path}: 'methods' must map method names to {{module, presets, flags}}")
    parsed = []
    for name, spec in raw_methods.items():
        spec = spec or {}
        _unknown_keys(spec, _METHOD_KEYS, f"{path}: method {name}")
        if not isinstance(spec.get("module"), str) or not spec["module"]:
            raise UserError(f"{path}: method {name} needs 'module' (e.g. online_rl.ppo)")
        factor = spec.get("budget_factor", 1)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise UserError(f"{path}: method {name}: 'budget_factor' must be a positive integer, got {factor!r}")
        parsed.append(Method(str(name), spec["module"], _strings(spec.get("presets"), f"{name}.presets"),
                             _strings(spec.get("flags"), f"{name}.flags"), bool(spec.get("seeds_together", True)),
                             factor))
    overrides: list[str] = []
    if methods is not None:
        methods = list(methods)
        unknown = [m for m in methods if m not in {p.name for p in parsed}]
        if unknown:
            raise UserError(f"methods {', '.join(unknown)} are not in suite {path.stem} "
                            f"(it has {', '.join(p.name for p in parsed)})")
        parsed = [p for p in parsed if p.name in methods]
        overrides += ["--methods", ",".join(methods)]
    suite_envs = _strings(raw.get("envs"), "envs")
    if envs:
        suite_envs = tuple(envs)
        overrides += [a for env in suite_envs for a in ("--env", env)]
    if not suite_envs:
        raise UserError(f"{path}: 'envs' must list at least one env")
    if budget is not None:
        overrides += ["--budget", str(budget)]
    if seeds is not None:
        overrides += ["--seeds", str(seeds)]
    values = {"budget": budget if budget is not None else raw.get("budget"),
              "seeds": seeds if seeds is not None else raw.get("seeds", 1), "first_seed": raw.get("first_seed", 0)}
    for key, value in values.items():
        if not isinstance(value, int) or value < (0 if key == "first_seed" else 1):
            where = f"--{key}" if {"budget": budget, "seeds": seeds}.get(key) is not None else f"{path}: '{key}'"
            raise UserError(f"{where} must be a {'non-negative' if key == 'first_seed' else 'positive'} "
                            f"integer, got {value!r}")
    slurm = raw.get("slurm") or {}
    _unknown_keys(slurm, _SLURM_KEYS, f"{path}: slurm")
    from utils.envs import ENV_NAMES

    for env in suite_envs:
        if env not in ENV_NAMES:  # found now, not after the first methods of a suite have trained
            where = "fix --env" if envs else f"fix 'envs' in {path}"
            raise UserError(f"unknown env {env!r}; valid names: {', '.join(ENV_NAMES)}; {where}")
    if raw.get("seed_role") not in (None, "report", "tuning"):
        raise UserError(f"{path}: 'seed_role' must be report or tuning, got {raw['seed_role']!r}")
    references = raw.get("references") or []
    for ref in references:
        if (not isinstance(ref, dict) or not _REFERENCE_KEYS <= set(ref) <= _REFERENCE_KEYS | {"env_steps"}
                or not isinstance(ref["value"], (int, float))
                or not (isinstance(ref.get("env_steps", 1), int) and ref.get("env_steps", 1) > 0)):
            raise UserError(f"{path}: each reference needs exactly {', '.join(sorted(_REFERENCE_KEYS))} "
                            f"(value a number), and may give env_steps (a positive integer: where the plot "
                            f"marks it), got {ref!r}")
    target = raw.get("time_target_seconds")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float)) or target <= 0):
        raise UserError(f"{path}: 'time_target_seconds' must be a positive number of seconds, got {target!r}")
    early = raw.get("early_steps") or []
    if not isinstance(early, list) or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v
                                              for v in early):
        raise UserError(f"{path}: 'early_steps' must be a list of positive env-step counts, got {early!r}")
    diagnostics = _strings(raw.get("diagnostics"), "diagnostics")
    return Suite(name=path.stem, path=path, description=str(raw.get("description", "")).strip(), envs=suite_envs,
                 seeds=values["seeds"], first_seed=values["first_seed"], budget=values["budget"],
                 flags=_strings(raw.get("flags"), "flags"), methods=tuple(parsed), slurm=dict(slurm),
                 overrides=tuple(overrides), seed_role=raw.get("seed_role"), headline=bool(raw.get("headline")),
                 equal_compute=bool(raw.get("equal_compute")), references=tuple(references),
                 time_target_seconds=None if target is None else float(target), early_steps=tuple(early),
                 diagnostics=diagnostics)


# ---------------------------------------------------------------------------------------------------
# Tasks: one training process each
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
    suite: Suite
    method: Method
    env: str
    seeds: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"seed{self.seeds[0]}" if len(self.seeds) == 1 else f"seeds{self.seeds[0]}-{self.seeds[-1]}"

    @property
    def title(self) -> str:
        return f"{self.method.name} on {self.env} ({self.label})"

    @property
    def budget(self) -> int:
        return self.suite.budget * self.method.budget_factor

    def run_dir(self, runs_root: str | Path) -> Path:
        return Path(runs_root) / self.suite.name / self.env / self.method.name / self.label

    def argv(self, runs_root: str | Path) -> list[str]:
        """The entry point's flags: the contract every training entry point accepts, then the suite's
        flags, then the method's (so a method may override a suite-wide flag)."""
        argv = ["--env", self.env]
        if self.method.presets:
            argv += ["--preset", *self.method.presets]
        argv += ["--run-dir", str(self.run_dir(runs_root)), "--seed", str(self.seeds[0]),
                 "--num-seeds", str(len(self.seeds)), "--total-steps", str(self.budget)]
        return argv + [expand_flag(f) for f in (*self.suite.flags, *self.method.flags)]


def expand_flag(flag: str) -> str:
    """``${VAR}`` in a suite flag, from the environment of the machine the run starts on."""
    expanded = os.path.expandvars(flag)
    missing = re.findall(r"\$\{?(\w+)", expanded)
    if missing:
        raise UserError(f"suite flag {flag!r} needs the environment variable {missing[0]}; export it first")
    return expanded


def suite_tasks(suite: Suite) -> list[Task]:
    """Every training process of the suite, in a fixed order (the Slurm array index is the position)."""
    seeds = tuple(range(suite.first_seed, suite.first_seed + suite.seeds))
    tasks = []
    for env in suite.envs:
        for method in suite.methods:
            groups = [seeds] if method.seeds_together else [(s,) for s in seeds]
            tasks += [Task(suite, method, env, group) for group in groups]
    return tasks


def task_state(task: Task, runs_root: str | Path) -> str:
    """'done' (finished with these exact flags), 'partial' (started: the entry point resumes it) or 'new'."""
    run_dir = task.run_dir(runs_root)
    record, summary = _read_json(run_dir / TASK_RECORD), _read_json(run_dir / "summary.json")
    if summary and summary.get("complete") and record and record.get("argv") == task.argv(runs_root):
        return "done"
    return "partial" if (run_dir / "config.yaml").exists() else "new"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_task(task: Task, runs_root: str | Path, in_process: bool = False) -> int:
    """Train (or resume) one task through its entry point; returns its exit status.

    A subprocess by default: each method gets a fresh process (and all GPU memory), and a crash ends
    only that method. ``in_process`` calls the module's ``main(argv)`` instead (quicker for tiny runs).
    """
    argv = task.argv(runs_root)
    run_dir = task.run_dir(runs_root)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = _read_json(run_dir / TASK_RECORD) or {}
    # A process killed before it could write this record (a session ending, a preempted job) leaves
    # logged rows that no record accounts for: its CPU seconds are lost, so the total is marked incomplete
    # rather than printed as if it were the run's cost.
    lost_segment = metric_rows(run_dir) > int(previous.get("metric_rows", 0))
    commit = git_commit()  # the code the run starts with, not whatever is checked out when it ends
    start, cpu_start = time.perf_counter(), _cpu_seconds(in_process)
    if in_process:
        status = _run_in_process(task.method.module, argv)
    else:
        status = _run_subprocess([sys.executable, "-m", task.method.module, *argv])
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds(in_process) - cpu_start
    atomic_write_json(run_dir / TASK_RECORD, {
        "module": task.method.module, "argv": argv, "returncode": status, "machine": host_description(),
        "wall_seconds": round(float(previous.get("wall_seconds", 0.0)) + seconds, 1),
        "cpu_seconds": round(float(previous.get("cpu_seconds", 0.0)) + cpu_seconds, 1),
        "cpu_seconds_incomplete": bool(previous.get("cpu_seconds_incomplete")) or lost_segment,
        "metric_rows": metric_rows(run_dir),
        "commit": commit,
    })
    return status


def metric_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    with path.open() as handle:
        return sum(1 for line in handle if line.strip())


def _cpu_seconds(in_process: bool) -> float:
    """User + system CPU seconds of this process (in-process runs) or of its finished children: the
    compute a run cost, which wall time on a shared machine does not measure."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF if in_process else resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_in_process(module: str, argv: list[str]) -> int:
    try:
        importlib.import_module(module).main(argv)
    except SystemExit as stop:  # exit_on_user_error: a one-line message was printed
        return stop.code if isinstance(stop.code, int) else 1
    except Exception:  # noqa: BLE001 - a broken method must not end the whole comparison
        import traceback

        traceback.print_exc()
        return 1
    return 0


def _run_subprocess(command: list[str]) -> int:
    """Run ``command``; a SIGTERM to this process (Slurm's time limit) is passed on to it."""
    child = subprocess.Popen(command)
    forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
    previous = signal.signal(signal.SIGTERM, forward)
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_suite(tasks: list[Task], runs_root: str | Path, in_process: bool = False) -> list[Task]:
    """Run every task not done yet, one after another; returns the tasks that failed."""
    failed = []
    for i, task in enumerate(tasks, 1):
        state = task_state(task, runs_root)
        if state == "done":
            print(f"[{i}/{len(tasks)}] {task.title}: done, skipped", flush=True)
            continue
        verb = "resuming" if state == "partial" else "starting"
        command = shlex.join(["python", "-m", task.method.module, *task.argv(runs_root)])
        print(f"[{i}/{len(tasks)}] {task.title}: {verb}\n  {command}", flush=True)
        status = run_task(task, runs_root, in_process)
        if status != 0:
            print(f"[{i}/{len(tasks)}] {task.title}: FAILED (exit {status}); continuing", flush=True)
            failed.append(task)
    return failed


# ---------------------------------------------------------------------------------------------------
# Collecting: the suite's record in docs/data, then its block through benchmarks.report
# ---------------------------------------------------------------------------------------------------


def reproduce_command(suite: Suite) -> str:
    target = suite.name if suite.path.parent.resolve() == SUITES_DIR else str(suite.path)
    return shlex.join(["python", "-m", "benchmarks.compare", target, *suite.overrides])


def method_record(tasks: list[Task], runs_root: str | Path, steps: list[int], previous: dict | None = None) -> dict:
    """One method on one env: its resolved config, its training processes and one entry per seed.

    ``previous`` is this method's entry in the record already committed: its seeds that have no run
    folder under ``runs_root`` are kept (see :func:`merge_previous`)."""
    method = tasks[0].method
    entry = {"module": method.module, "presets": list(method.presets), "flags": list(method.flags),
             "config": {}, "processes": [], "runs": []}
    if method.budget_factor != 1:  # its own budget, so its own curve points
        steps = records.curve_steps(tasks[0].budget)
        entry.update(budget=tasks[0].budget, curve_steps=steps)
    for task in tasks:
        run_dir = task.run_dir(runs_root)
        runs = records.run_entries(run_dir, task.seeds, steps, task.suite.diagnostics)
        if not runs:
            continue
        entry["config"] = entry["config"] or records.run_config(run_dir)
        task_record = _read_json(run_dir / TASK_RECORD) or {}
        entry["processes"].append({"seeds": list(task.seeds), "wall_seconds": task_record.get("wall_seconds"),
                                   "cpu_seconds": (None if task_record.get("cpu_seconds_incomplete")
                                                   else task_record.get("cpu_seconds")),
                                   "machine": task_record.get("machine"), "commit": task_record.get("commit")})
        entry["runs"] += runs
    return merge_previous(entry, previous, [seed for task in tasks for seed in task.seeds])


def merge_previous(entry: dict, previous: dict | None, seeds: list[int]) -> dict:
    """``entry`` plus the seeds of ``previous`` it has no run for, in seed order.

    Run folders (``runs/``) do not outlive the machine they were trained on, and a suite's seeds can
    take longer than one machine lasts: collecting seed 102 on a new machine must not drop seeds 100-101
    from the committed record. Seeds merge only from the same method (module, presets, flags) at the same
    resolved config; anything else is an error rather than a silent mix of two setups."""
    if not previous or not previous.get("runs"):
        return entry
    same = all(previous.get(key) == entry.get(key) for key in ("module", "presets", "flags", "budget"))
    if not same:
        return entry  # the suite changed the method: its old seeds describe something else
    # A field only one side has is a setting added to the code between the two machines, at the default
    # that keeps the old behaviour; a field both have with different values is another setup.
    differ = sorted(k for k in set(entry["config"]) & set(previous.get("config") or {})
                    if entry["config"][k] != previous["config"][k])
    if differ:
        raise UserError(f"the committed record holds seeds of this method at another config (keys differ: "
                        f"{', '.join(differ)}); rerun those seeds here, or delete the record file to drop them")
    have = {run["seed"] for run in entry["runs"]}
    kept = [run for run in previous["runs"] if run["seed"] not in have and run["seed"] in seeds]
    if not kept:
        return entry
    kept_seeds = {run["seed"] for run in kept}
    processes = [p for p in previous.get("processes", []) if set(p["seeds"]) <= kept_seeds]
    order = {seed: i for i, seed in enumerate(seeds)}
    return {**entry, "config": entry["config"] or previous.get("config", {}),
            "processes": sorted(entry["processes"] + processes, key=lambda p: order[p["seeds"][0]]),
            "runs": sorted(entry["runs"] + kept, key=lambda run: order[run["seed"]])}


def suite_record(suite: Suite, runs_root: str | Path, previous: dict | None = None) -> dict:
    """The record ``benchmarks.report`` renders (layout: ``benchmarks.records``). ``previous`` is the
    committed record of the same suite: seeds trained on another machine are kept from it (only at the
    same budget, whose curve points they share)."""
    tasks = suite_tasks(suite)
    steps = records.curve_steps(suite.budget)
    if previous is not None and previous.get("budget") != suite.budget:
        previous = None

    def before(env: str, method: str) -> dict | None:
        return ((previous or {}).get("envs", {}).get(env, {}).get("methods", {})).get(method)

    return {
        "name": suite.name, "title": f"Comparison `{suite.name}`", "description": suite.description,
        "command": reproduce_command(suite), "suite": f"benchmarks/suites/{suite.path.name}",
        "budget": suite.budget, "seeds": list(range(suite.first_seed, suite.first_seed + suite.seeds)),
        "seed_role": suite.seed_role, "headline": suite.headline, "equal_compute": suite.equal_compute,
        "references": [dict(r) for r in suite.references], "curve_steps": steps,
        "time_target_seconds": suite.time_target_seconds, "early_steps": list(suite.early_steps),
        **({"diagnostics": list(suite.diagnostics)} if suite.diagnostics else {}),
        "envs": {env: {"methods": {m.name: method_record([t for t in tasks if t.env == env and t.method == m],
                                                         runs_root, steps, before(env, m.name))
                                   for m in suite.methods}}
                 for env in suite.envs},
    }


def committed_record(path: Path) -> dict | None:
    """The record already at ``path``, or None where there is none or it is not a comparison record."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("schema") == records.SCHEMA else None


def write_results(suite: Suite, runs_root: str | Path, results_md: str | Path,
                  data_dir: str | Path | None = None) -> str:
    """Write the suite's record (``data_dir``, default ``data/`` beside ``results_md``), then regenerate
    its block and figure in ``results_md`` from the record alone; returns the block."""
    from benchmarks import report

    results_md = Path(results_md)
    data_dir = Path(data_dir) if data_dir is not None else results_md.parent / "data"
    path = data_dir / f"{suite.name}.json"
    record = suite_record(suite, runs_root, committed_record(path))
    path = records.write(path, record)
    report.write(results_md, data_dir)
    block, _ = report.render_record(records.read(path), path.name)
    return block


# ---------------------------------------------------------------------------------------------------
# Slurm: one array task per training process, then a job that writes the table
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SlurmOptions:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    gres: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    max_parallel: int | None = None
    extra: tuple[str, ...] = ()


def _sbatch_header(job_name: str, output: str, options: dict[str, Any], extra: Iterable[str]) -> list[str]:
    lines = [f"#SBATCH --job-name={job_name}", f"#SBATCH --output={output}"]
    lines += [f"#SBATCH --{key.replace('_', '-')}={value}" for key, value in options.items() if value not in (None, "")]
    return lines + [f"#SBATCH {option}" for option in extra]


def _script_body(compare_args: list[str]) -> list[str]:
    """Find the checkout and its Python the way every script in scripts/ does (scripts/shell/common.sh)."""
    return ["set -euo pipefail",
            f"export CRAFTAX_ROOT=\"${{CRAFTAX_ROOT:-{REPO_ROOT}}}\"",
            'source "$CRAFTAX_ROOT/scripts/shell/common.sh"',
            "craftax_setup",
            'craftax_run "$PYTHON" -m benchmarks.compare ' + " ".join(compare_args)]


def slurm_scripts(suite: Suite, runs_root: str | Path, opts: SlurmOptions,
                  results_md: str | Path = DEFAULT_RESULTS_MD) -> tuple[str, str]:
    """``(array script, collect script)``: one array task per training process; the second job writes
    the table into ``results_md`` once every task has ended (submitted with ``--dependency=afterany``)."""
    tasks = suite_tasks(suite)
    runs_root = Path(runs_root).resolve()
    logs = runs_root / suite.name / "slurm"
    target = shlex.quote(str(suite.path.resolve()))
    common = [target, *map(shlex.quote, suite.overrides), "--runs-root", shlex.quote(str(runs_root))]
    array = f"0-{len(tasks) - 1}" + (f"%{opts.max_parallel}" if opts.max_parallel else "")
    resources = {"partition": opts.partition, "account": opts.account, "qos": opts.qos,
                 "time": opts.time or suite.slurm.get("time"), "gres": opts.gres or suite.slurm.get("gres"),
                 "cpus_per_task": opts.cpus_per_task or suite.slurm.get("cpus_per_task"),
                 "mem": opts.mem or suite.slurm.get("mem")}
    listing = [f"#   {i}: {t.title}" for i, t in enumerate(tasks)]
    array_script = "\n".join(
        ["#!/bin/bash", f"# Suite {suite.name}: {len(tasks)} training runs, one per array task "
         "(written by python -m benchmarks.compare --slurm).", *listing,
         f"#SBATCH --array={array}",
         *_sbatch_header(f"compare-{suite.name}", str(logs / "%x-%A_%a.out"), resources, opts.extra),
         *_script_body([*common, "--task", '"$SLURM_ARRAY_TASK_ID"'])]) + "\n"
    site = {"partition": opts.partition, "account": opts.account, "qos": opts.qos, "time": "00:30:00",
            "cpus_per_task": 1}
    collect_script = "\n".join(
        ["#!/bin/bash", f"# Suite {suite.name}: write its table and plot once the array job has ended.",
         *_sbatch_header(f"compare-{suite.name}-collect", str(logs / "%x-%j.out"), site, opts.extra),
         *_script_body([*common, "--collect", "--results-md", shlex.quote(str(Path(results_md).resolve()))])]) + "\n"
    return array_script, collect_script


def submit_slurm(suite: Suite, runs_root: str | Path, opts: SlurmOptions,
                 results_md: str | Path = DEFAULT_RESULTS_MD) -> tuple[str, str]:
    """Write both scripts next to the runs and submit them; returns the two job ids."""
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: run --slurm on a Slurm login node, or add --dry-run to see the script")
    array_script, collect_script = slurm_scripts(suite, runs_root, opts, results_md)
    folder = Path(runs_root).resolve() / suite.name / "slurm"
    folder.mkdir(parents=True, exist_ok=True)  # Slurm does not create the log folder
    (folder / "array.sbatch").write_text(array_script)
    (folder / "collect.sbatch").write_text(collect_script)

    def sbatch(*args: str) -> str:
        done = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"sbatch {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout.strip().split(";")[0]

    array_id = sbatch(str(folder / "array.sbatch"))
    collect_id = sbatch(f"--dependency=afterany:{array_id}", str(folder / "collect.sbatch"))
    return array_id, collect_id


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one ``error:`` line (a ``UserError``), not usage + error."""

    def error(self, message: str):
        message = re.sub(r"^unrecognized arguments: (.*)", r"unknown flag \1", message)
        raise UserError(f"{message}; see --help")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", help="suite name (benchmarks/suites/NAME.yaml) or path to a suite YAML file")
    parser.add_argument("--budget", type=int, help="env steps per seed (default: the suite's)")
    parser.add_argument("--seeds", type=int, help="number of seeds (default: the suite's)")
    parser.add_argument("--env", action="append", help="run only this env (repeatable; default: the suite's envs)")
    parser.add_argument("--methods", help="comma-separated subset of the suite's methods")
    parser.add_argument("--runs-root", default=os.environ.get("CRAFTAX_COMPARE_RUNS", DEFAULT_RUNS_ROOT),
                        help="run folders go to RUNS_ROOT/<suite>/<env>/<method>/<seeds> "
                             "(env CRAFTAX_COMPARE_RUNS; default %(default)s)")
    parser.add_argument("--results-md", default=DEFAULT_RESULTS_MD,
                        help="markdown file that receives the table; figures go to its figures/ folder")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--collect", action="store_true", help="only write the table and plot of finished runs")
    mode.add_argument("--list", action="store_true", help="list the runs (array indices) and their state")
    mode.add_argument("--task", type=int, help="run only task TASK of --list (what each Slurm array task does)")
    mode.add_argument("--slurm", action="store_true", help="submit an array job (one task per run) and a "
                                                           "collect job that writes the table afterwards")
    parser.add_argument("--no-collect", action="store_true", help="after local runs, do not write the table")
    parser.add_argument("--in-process", action="store_true",
                        help="call each entry point's main() in this process instead of a subprocess")
    slurm = parser.add_argument_group(
        "Slurm (with --slurm). Partition, account and QOS: these flags, or Slurm's own SBATCH_PARTITION, "
        "SBATCH_ACCOUNT and SBATCH_QOS environment variables, which sbatch reads itself")
    slurm.add_argument("--dry-run", action="store_true", help="print the array script instead of submitting")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--time", help="time limit per task (default: the suite's slurm.time)")
    slurm.add_argument("--gres", help="generic resources per task, e.g. gpu:1 (default: the suite's slurm.gres)")
    slurm.add_argument("--cpus-per-task", type=int, help="default: the suite's slurm.cpus_per_task")
    slurm.add_argument("--mem", help="memory per task, e.g. 32G (default: the suite's slurm.mem)")
    slurm.add_argument("--max-parallel", type=int, help="run at most this many array tasks at once")
    slurm.add_argument("--sbatch-option", action="append", default=[],
                       help="any other #SBATCH option, e.g. --constraint=a100 (repeatable)")
    args = parser.parse_args(argv)
    if args.dry_run and not args.slurm:
        parser.error("--dry-run goes with --slurm")
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_output_path(args.runs_root, "--runs-root", "dir")
    check_output_path(args.results_md, "--results-md", "file")
    suite = load_suite(args.suite, budget=args.budget, seeds=args.seeds, envs=args.env,
                       methods=args.methods.split(",") if args.methods else None)
    tasks = suite_tasks(suite)
    if args.list:
        for i, task in enumerate(tasks):
            print(f"{i:3d}  {task_state(task, args.runs_root):7s}  {task.title}  -> {task.run_dir(args.runs_root)}")
        return 0
    if args.slurm:
        opts = SlurmOptions(args.partition, args.account, args.qos, args.time, args.gres, args.cpus_per_task,
                            args.mem, args.max_parallel, tuple(args.sbatch_option))
        if args.dry_run:
            array_script, _ = slurm_scripts(suite, args.runs_root, opts)
            print(array_script, end="")
            print(f"(dry run: would submit this array of {len(tasks)} tasks, then a collect job with "
                  "--dependency=afterany on it)", file=sys.stderr)
            return 0
        array_id, collect_id = submit_slurm(suite, args.runs_root, opts, args.results_md)
        print(f"submitted array job {array_id} ({len(tasks)} tasks) and collect job {collect_id}; "
              f"logs in {Path(args.runs_root) / suite.name / 'slurm'}")
        return 0
    if args.task is not None:
        if not 0 <= args.task < len(tasks):
            raise UserError(f"--task {args.task} is out of range: suite {suite.name} has tasks 0-{len(tasks) - 1}")
        return 1 if run_suite([tasks[args.task]], args.runs_root, args.in_process) else 0
    failed = [] if args.collect else run_suite(tasks, args.runs_root, args.in_process)
    if not args.no_collect:
        # The block covers the whole suite even when --methods/--env ran a part of it: a rerun of one
        # method must not drop the rows of the others from results.md.
        whole = load_suite(args.suite, budget=args.budget, seeds=args.seeds)
        print(write_results(whole, args.runs_root, args.results_md))
        print(f"wrote the {suite.name} block of {args.results_md}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(t.title for t in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
