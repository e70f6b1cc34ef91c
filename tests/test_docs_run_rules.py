"""How every documented command becomes a small run (docs/README.md, "How the docs are tested").

``tests/test_docs_run_front.py``, ``tests/test_docs_run_a.py`` and ``tests/test_docs_run_b.py`` run every
command of the ``bash`` fences of README.md and docs/*.md; this module turns each documented command into a :class:`Plan` of what those
tests run, with rules written once (by flag name, by preset, by placeholder) rather than per command:

* **budget**: an entry point with a ``debug`` preset gets ``--preset debug`` as its last preset, and any
  flag that sets a field ``debug`` also sets is dropped (the preset's small value wins); budget flags of
  other entry points get small values (:data:`SMALL_VALUES`, :data:`BUDGET_FLAGS`);
* **inputs**: placeholders (``MODEL``, ``RUN``, ``$TIERS/$tier``, hub ids, ``/data/...``) are bound to
  small artefacts that the project's own debug commands make (``tests/test_docs_run_support.py``);
* **skips**: a command that cannot run here is in :data:`SKIPS` or :data:`FULL_CRAFTAX_BUDGET`, or needs a
  GPU (:func:`gpu_reason`), and the test reports the reason; nothing is dropped silently (the fast tests
  at the bottom fail on a documented line without a plan, and on a table entry the docs no longer show).

Plans are made statically (no file system, no import of the project), so collecting them is fast.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from functools import lru_cache
from pathlib import Path

import yaml
from test_docs_commands import _FENCE, ALL_PAGES, PROJECT_PACKAGES, REPO, shell_segments

from utils.config import _preset_names as preset_names  # the reader the entry points use

_SEPARATORS = {"&&", "||", ";", "|", "&"}
_ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=(.*)$", re.DOTALL)

# --------------------------------------------------------------------------------------------------
# Documented commands
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DocCommand:
    """One documented command: a ``python -m`` of the project, or a line of another program.

    ``env`` holds the ``VAR=value`` words written before the program; ``variables`` the shell variables
    that lines above it on the page set (``TIERS=...``, ``export ...``, a ``for`` loop's variable)."""

    page: str
    line: int
    text: str
    module: str | None = None
    argv: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    variables: tuple[tuple[str, str], ...] = ()
    fence: int = 0

    @property
    def block(self) -> str:
        """The page and ``bash`` fence the command is in: a server started in a block serves the rest of it."""
        return f"{self.page}#{self.fence}"

    @property
    def shown(self) -> str:
        """The command as the tables below name it: ``python -m MODULE ARGS`` or the shell line."""
        if self.module is None:
            return self.text
        return shlex.join(["python", "-m", self.module, *self.argv])

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}: {self.shown}"


def fenced_lines(text: str) -> list[tuple[int, int, str]]:
    """``(fence, line number, command)`` of every command of the page's ``bash`` fences: continuations
    joined, comment-only lines dropped, the number that of the command's first line."""
    found = []
    for fence, match in enumerate(_FENCE.finditer(text)):
        first = text[:match.start()].count("\n") + 2
        pending, start = "", 0
        for offset, raw in enumerate(match.group(1).splitlines()):
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            start = start if pending else first + offset
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            found.append((fence, start, pending + line))
            pending = ""
    return found


def shell_words(text: str) -> list[str]:
    """The line's words as the shell splits them, with a ``;`` written against a word split off."""
    words = []
    for word in shlex.split(text, comments=True):
        if word.endswith(";") and word != ";":
            words += [word[:-1], ";"]
        else:
            words.append(word)
    return words


def _python_segment(segment: list[str]) -> tuple[dict[str, str], str, list[str]] | None:
    """``(env, module, argv)`` if the segment runs ``python -m <project module>`` (after ``VAR=value``
    words and ``nice``/``nohup``/``time``/``exec`` wrappers; a redirection ends its arguments)."""
    env = {}
    while segment:
        match = _ASSIGNMENT.match(segment[0])
        if match:
            env[match.group(1)] = match.group(2)
            segment = segment[1:]
        elif segment[0] in ("nohup", "time", "exec"):
            segment = segment[1:]
        elif segment[0] == "nice":
            segment = segment[3:] if segment[1:2] == ["-n"] else segment[1:]
        else:
            break
    if len(segment) < 3 or not re.search(r"(^|/)python3?$", segment[0]) or segment[1] != "-m":
        return None
    module, argv = segment[2], []
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    for word in segment[3:]:
        if re.match(r"^\d?>|^<", word):
            break
        argv.append(word)
    return env, module, argv


def assignments(line: str) -> dict[str, str] | None:
    """The variables a line sets if it only sets variables (``A=1; B=2``, ``export A=1 B=2``, the
    ``for VAR in FIRST ...; do`` of a loop, which binds its first value), else None."""
    try:
        words = shell_words(line)
    except ValueError:
        return None
    if words[:1] == ["for"] and len(words) >= 4 and words[2] == "in":
        return {words[1]: words[3]}
    if words in (["done"], ["do"]):
        return {}
    found = {}
    for segment in shell_segments(words):
        segment = segment[1:] if segment[0] == "export" else segment
        for word in segment:
            match = _ASSIGNMENT.match(word)
            if not match:
                return None
            found[match.group(1)] = match.group(2)
    return found


def page_commands(page: str) -> list[DocCommand]:
    """Every command of a page, in order, each with the variables that lines above it in its fence set."""
    variables: dict[str, str] = {}
    commands, current_fence = [], None
    for fence, number, text in fenced_lines((REPO / page).read_text()):
        if fence != current_fence:
            variables, current_fence = {}, fence
        bound = assignments(text)
        if bound is not None:
            variables.update(bound)
            continue
        text = strip_comment(text)
        found = [p for p in map(_python_segment, shell_segments(shell_words(text))) if p is not None]
        if not found:
            commands.append(DocCommand(page, number, text, variables=tuple(variables.items()), fence=fence))
        for env, module, argv in found:
            commands.append(DocCommand(page, number, text, module, tuple(argv), tuple(env.items()),
                                       tuple(variables.items()), fence))
    return commands


def strip_comment(text: str) -> str:
    """The line without its trailing ``# comment`` (a ``#`` after a space, outside quotes)."""
    quote = None
    for index, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or text[index - 1].isspace()):
            return text[:index].rstrip()
    return text.rstrip()


@lru_cache(maxsize=1)
def documented_commands() -> tuple[DocCommand, ...]:
    return tuple(c for page in ALL_PAGES for c in page_commands(page))


# --------------------------------------------------------------------------------------------------
# Presets: which entry points have a debug preset, and which fields it sets
# --------------------------------------------------------------------------------------------------

#: Entry points whose presets are not in configs/<area>/<module>.yaml, with why.
PRESET_FILES_ELSEWHERE = {
    # builds offline-RL datasets: its presets sit with the area it feeds
    "benchmarks.offline_tiers": "offline_rl/offline_tiers",
    # these time PPO's own program under PPO's presets (benchmarks/ppo_family_sps.py: compiled_chunk)
    "benchmarks.ppo_sps": "online_rl/ppo",
    "benchmarks.ppo_family_sps": "online_rl/ppo",
    # `online_rl.ppo --bonus rnd` under its old name
    "online_rl.ppo_rnd": "online_rl/ppo",
}


@lru_cache(maxsize=None)
def presets_of(module: str) -> dict[str, dict]:
    """The presets an entry point reads (empty for one without presets)."""
    if module in PRESET_FILES_ELSEWHERE:
        path = REPO / "configs" / f"{PRESET_FILES_ELSEWHERE[module]}.yaml"
    else:
        area, _, name = module.partition(".")
        path = REPO / "configs" / area / f"{name}.yaml"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def has_debug_preset(module: str) -> bool:
    return "debug" in presets_of(module)


def flag_names(field: str) -> set[str]:
    """The command-line spellings of a config field (tyro: ``--field-name``, ``--no-field-name``)."""
    flag = field.replace("_", "-")
    return {f"--{flag}", f"--no-{flag}", f"--{field}"}


def preset_values(module: str, argv) -> dict:
    """The fields the command's presets set, merged left to right."""
    merged = {}
    for name in preset_names(argv):
        merged.update(presets_of(module).get(name) or {})
    return merged


# --------------------------------------------------------------------------------------------------
# Editing argv
# --------------------------------------------------------------------------------------------------


def _is_value(word: str) -> bool:
    """A word that is a flag's value, not the next flag (negative numbers are values)."""
    return not word.startswith("-") or bool(re.match(r"^-\d", word))


def flag_spans(argv: list[str]) -> list[tuple[str | None, int, int]]:
    """``(flag, start, end)`` of every flag with its values (``--workers 0 1 2`` is one span);
    positional words before the first flag are spans with flag None."""
    spans, index = [], 0
    while index < len(argv):
        word = argv[index]
        if word.startswith("--") and "=" in word:
            spans.append((word.split("=", 1)[0], index, index + 1))
            index += 1
        elif word.startswith("-") and not re.match(r"^-\d", word):
            end = index + 1
            while end < len(argv) and _is_value(argv[end]):
                end += 1
            spans.append((word, index, end))
            index = end
        else:
            spans.append((None, index, index + 1))
            index += 1
    return spans


def drop_flags(argv: list[str], flags: set[str]) -> list[str]:
    """``argv`` without the named flags and their values."""
    out = []
    for flag, start, end in flag_spans(argv):
        if flag not in flags:
            out += argv[start:end]
    return out


def flag_value(argv, flag: str) -> str | None:
    for name, start, end in flag_spans(list(argv)):
        if name == flag:
            if "=" in argv[start]:
                return argv[start].split("=", 1)[1]
            return argv[start + 1] if end > start + 1 else ""
    return None


def set_flag(argv: list[str], flag: str, value: str | None) -> list[str]:
    """``argv`` with ``flag`` given once, as ``flag value`` (``value`` None: a switch)."""
    new = [flag] if value is None else [flag, value]
    if flag_value(argv, flag) is None:
        return [*argv, *new]
    out, done = [], False
    for name, start, end in flag_spans(argv):
        if name == flag:
            if not done:
                out += new
                done = True
        else:
            out += argv[start:end]
    return out


# --------------------------------------------------------------------------------------------------
# The budget rules
# --------------------------------------------------------------------------------------------------

#: Small values of budget flags, by flag name: a given one gets this value (after the debug rule has dropped
#: the flags its preset sets: what is left are an entry point's own, e.g. a benchmark's --repeats), and the
#: flags of BUDGET_FLAGS that the entry point has are added when not given.
SMALL_VALUES = {
    "--episodes": "1", "--num-episodes": "1", "--max-steps": "20", "--max-episode-steps": "60",
    "--repeats": "1", "--updates": "1", "--num-steps": "10", "--steps": "8", "--num-envs": "8",
    "--seconds": "1", "--warmup-s": "0.5", "--num": "16", "--batches": "4", "--train-updates": "4",
    "--jobs": "4", "--budget": "1", "--seeds": "1", "--watch": "1",
}

#: Which budget flags each entry point has beyond its presets: added with SMALL_VALUES when the
#: documented command does not give them (their defaults run for minutes).
BUDGET_FLAGS = {
    "benchmarks.env_throughput": ("--num-envs", "--num-steps", "--repeats"),
    "benchmarks.tetris_throughput": ("--num-envs", "--steps", "--repeats"),
    "benchmarks.ppo_sps": ("--updates", "--repeats"),
    "benchmarks.ppo_family_sps": ("--updates", "--repeats"),
    "benchmarks.ppo_llm_sps": ("--num-envs", "--num-steps", "--updates", "--repeats"),
    "benchmarks.ppo_vlm_sps": ("--num-steps", "--updates", "--repeats"),
    "benchmarks.labelling_throughput": ("--repeats", "--num", "--jobs"),
    "benchmarks.server_throughput": ("--seconds", "--warmup-s", "--num"),
    "benchmarks.offline_loader": ("--batches", "--train-updates"),
    "benchmarks.compare": ("--budget", "--seeds"),
    "tools.render": ("--episodes", "--max-steps"),
    "tools.record_agent": ("--episodes", "--max-steps", "--max-episode-steps"),
}

#: Seeds trained together: more seeds add compute and a compile of their own, not a documented code path
#: (tests/test_ppo_family.py and others train several seeds).
MAX_SEEDS = 1

#: Env steps of a training run that saves a dataset (``--save-trajectories``): enough for every stream to
#: finish several episodes, which the docs' next lines need (``--top-fraction`` ranks complete episodes,
#: ``offline_rl.subset --last-shards 48`` takes 48 of its 64 shards).
DATASET_STEPS = "8192"


def default_run_name(argv) -> str:
    """The run folder name a training command gets without --run-name (utils.run_dir.default_run_name)."""
    return f"{'-'.join(preset_names(argv)) or 'default'}-s{flag_value(argv, '--seed') or 0}"


#: Fields a command must keep as written when it reads an input of this flag: they must match the run it
#: reads (``--init-from`` refuses a source whose network differs, online_rl/finetune.py), so the debug
#: preset's values would break the command rather than shrink it.
MATCHED_BY_INPUT = {"--init-from": ("layer_width", "num_layers", "activation")}


def matched_fields(argv) -> set[str]:
    """The fields the command's inputs fix (MATCHED_BY_INPUT), whose flags the debug rule keeps."""
    given = {flag for flag, _, _ in flag_spans(list(argv))}
    return {field for flag, fields in MATCHED_BY_INPUT.items() if flag in given for field in fields}


def debug_rule(module: str, argv: list[str]) -> list[str]:
    """``--preset debug`` last, and no flag that sets a field the debug preset sets (so it wins), except the
    fields an input fixes (MATCHED_BY_INPUT); a training run keeps the run folder name the documented command
    gives it."""
    debug_fields = set(presets_of(module)["debug"] or {}) - matched_fields(argv)
    flags = set().union(*(flag_names(f) for f in debug_fields)) if debug_fields else set()
    name = default_run_name(argv)
    argv = [*drop_flags(argv, flags), "--preset", "debug"]
    if module in TRAINING_MODULES and flag_value(argv, "--run-name") is None and flag_value(argv, "--run-dir") is None:
        argv += ["--run-name", name]
    if flag_value(argv, "--save-trajectories") is not None and "total_steps" in debug_fields:
        argv += ["--total-steps", DATASET_STEPS]
    return argv


#: A budget flag's small value never goes below the value of the flag named here: server_throughput cuts its
#: ``--num`` observations into requests of ``--items`` each, so fewer than ``--items`` make no request.
AT_LEAST = {"--num": "--items"}


def small_value(argv, flag: str) -> str:
    floor = flag_value(argv, AT_LEAST[flag]) if flag in AT_LEAST else None
    if floor and floor.isdigit() and int(floor) > int(SMALL_VALUES[flag]):
        return floor
    return SMALL_VALUES[flag]


def budget_rule(module: str, argv: list[str]) -> list[str]:
    """Budget flags get their small values (given ones replaced, BUDGET_FLAGS' ones added)."""
    for flag, _, _ in flag_spans(argv):
        if flag in SMALL_VALUES:
            argv = set_flag(argv, flag, small_value(argv, flag))
    for flag in BUDGET_FLAGS.get(module, ()):
        if flag_value(argv, flag) is None:
            argv = [*argv, flag, small_value(argv, flag)]
    return argv


def seeds_rule(argv: list[str]) -> list[str]:
    """At most MAX_SEEDS seeds; one seed is the default, so the flag goes."""
    value = flag_value(argv, "--num-seeds")
    if value and value.isdigit() and int(value) > MAX_SEEDS:
        argv = set_flag(argv, "--num-seeds", str(MAX_SEEDS))
    if flag_value(argv, "--num-seeds") == "1":
        argv = drop_flags(argv, {"--num-seeds"})
    return argv


def suite_of(argv) -> dict:
    """The YAML of the suite a ``benchmarks.compare`` command names (a name or a path)."""
    name = argv[0]
    path = REPO / name if name.endswith((".yaml", ".yml")) else REPO / "benchmarks" / "suites" / f"{name}.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}  # a missing suite fails when run


def compare_rule(argv: list[str]) -> list[str]:
    """A suite runs one method (the first of the documented ``--methods``, else the suite's first) on its
    first env (or the documented ``--env``), one seed, one update (``--budget 1`` rounds up to one update)."""
    suite = suite_of(argv)
    methods = flag_value(argv, "--methods") or ",".join(suite.get("methods") or ())
    if methods:
        argv = set_flag(argv, "--methods", methods.split(",")[0])
    if flag_value(argv, "--env") is None and suite.get("envs"):
        argv = [*argv, "--env", suite["envs"][0]]
    return argv


def small_argv(module: str, argv: list[str]) -> list[str]:
    """The documented argv under the budget rules. A command that already names the debug preset runs as
    written (its other flags are the author's choice at that size), one seed."""
    argv = list(argv)
    if "--help" in argv:
        return argv
    if has_debug_preset(module) and "debug" in preset_names(argv):
        return seeds_rule(argv)  # already small: as written
    if has_debug_preset(module):
        argv = debug_rule(module, argv)
    argv = budget_rule(module, argv)
    if module == "benchmarks.compare":
        argv = compare_rule(argv)
    return seeds_rule(argv)


# --------------------------------------------------------------------------------------------------
# Placeholders: variables, absolute paths, services
# --------------------------------------------------------------------------------------------------

#: Variables the docs expect from the reader (or set to a site's value), bound by the test. ``{...}``
#: values are filled in when the command runs (tests/test_docs_run_support.py).
TEST_VARIABLES = {
    "DATA": "/data",  # results.md keeps its datasets in a folder of the reader's choice
    "REDIS_PASSWORD": "",
    "LABELLING_REDIS_URL": "{REDIS_URL}",  # a cluster's Redis: the test's redis-server
}

#: Where the docs reach a running hidden-state server, replaced by the test's server (host:port).
SERVER_ADDRESSES = ("127.0.0.1:8000", "localhost:8000", "HOST:8000")

_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand(word: str, variables: dict[str, str]) -> str:
    """``$VAR`` and ``${VAR}`` replaced (repeatedly: values may name other variables)."""
    for _ in range(5):
        new = _VARIABLE.sub(lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), word)
        if new == word:
            break
        word = new
    return word


def reroot(word: str) -> str:
    """An absolute path outside the repository (``/data/x``, ``/shared/...``, ``/tmp/x``) as the same path
    inside the command's folder (``data/x``), so nothing is read or written outside the test's folders."""
    prefix, value = ("", word)
    if word.startswith("--") and "=" in word:
        prefix, value = word.split("=", 1)
        prefix += "="
    if value.startswith("/") and not value.startswith(str(REPO)):
        return prefix + value.lstrip("/")
    return word


def bind_addresses(word: str) -> str:
    for address in SERVER_ADDRESSES:
        word = word.replace(address, "{SERVER}")
    return word


def bound_argv(command: DocCommand) -> list[str]:
    """The documented argv with variables expanded, absolute paths rerooted and server addresses bound."""
    variables = {**dict(command.variables), **TEST_VARIABLES}
    argv = [bind_addresses(reroot(expand(word, variables))) for word in command.argv]
    if command.module == "servers.hidden_state_server" and "--help" not in argv:
        argv = set_flag(argv, "--port", "{FREE_PORT}")  # 8000 (the default) may be taken on a shared machine
    return argv


# --------------------------------------------------------------------------------------------------
# Inputs: which words name something the command reads, and what kind of artefact binds them
# --------------------------------------------------------------------------------------------------

#: Flags whose value is a path the command reads, by module ("*": any module), with the kind of
#: artefact that binds it when it does not exist yet. Flags of the same name that take no path
#: (``server_throughput --source synthetic``) are simply not listed for that module.
INPUT_FLAGS = {
    ("*", "--dataset"): "dataset",
    ("offline_rl.subset", "--source"): "dataset",
    ("*", "--run"): "run:online_rl/ppo",
    ("offline_rl.evaluate", "--run-dir"): "run:offline_rl/awr",
    ("*", "--from-run"): "run:online_rl/ppo",
    ("*", "--init-from"): "run:offline_rl/awr",
    ("*", "--model"): "llm",
    ("*", "--llm-model"): "llm",
    ("*", "--few-shot"): "recording",
    ("*", "--session"): "recording",
    ("*", "--transcript"): "run:online_rl_llm/llm_play",
    ("*", "--text"): "text",
}

#: Entry points whose positional arguments are paths they read, with the kind that binds them.
INPUT_POSITIONALS = {
    "tools.stats": "dataset",
    "tools.plot": "run:online_rl/ppo",
    "benchmarks.sweep": "sweep",
    "offline_rl.evaluate_many": "run:offline_rl/bc",
    "utils.llm.download": "llm",
}

_RUN_PATH = re.compile(r"(?:^|/)runs/(online_rl|offline_rl|world_models|online_rl_llm)/([\w.-]+)/")


#: Models the docs name whose shape utils.testing.tiny_llm also writes (its ``--preset``), without weights:
#: where the docs use them only their config is read (labelling.enqueue checks the layer a preset asks
#: for, 18 of Qwen3-4B's 36, which the 2-layer tiny model lacks).
MODEL_SHAPES = {"qwen3-4b"}


def kind_from_path(path: str, default: str) -> str:
    """The artefact kind a path asks for: a run of the algo its ``runs/<area>/<algo>/`` names, a tier of
    a tiers folder, a labelled dataset, a recording, a text file; else the flag's ``default``."""
    if default == "llm" and Path(path).name.lower() in MODEL_SHAPES:
        return f"llm:{Path(path).name.lower()}"
    if default == "llm" and "vlm" in Path(path).name.lower():
        return "vlm"  # a vision-language model (utils.testing.tiny_vlm), for features of frames
    if default in ("llm", "sweep", "text", "run:online_rl_llm/llm_play"):
        return default
    match = _RUN_PATH.search(path)
    if match and "*" not in match.group(2):
        return f"run:{match.group(1)}/{match.group(2)}"
    if path.endswith(".txt"):
        return "text"
    if re.search(r"(^|/)(recordings|play)/", path):
        return "recording"
    if re.search(r"(^|/)tiers/", path):
        return "tier"
    if "labelled" in path:
        return "labelled"
    return default


@dataclasses.dataclass(frozen=True)
class Input:
    """Word ``index`` of argv is a path the command reads; if nothing is there when it runs, an artefact
    of ``kind`` is put at ``path`` (the word, or the folder of a file inside an artefact)."""

    index: int
    path: str
    kind: str


def inputs_of(module: str, argv: list[str]) -> list[Input]:
    found = []
    for flag, start, end in flag_spans(argv):
        default = INPUT_POSITIONALS.get(module) if flag is None else (
            INPUT_FLAGS.get((module, flag)) or INPUT_FLAGS.get(("*", flag)))
        if default is None:
            continue
        for index in range(start if flag is None else start + 1, end):
            path = argv[index]
            if "{" in path or path.startswith(("http:", "https:")):
                continue
            kind = kind_from_path(path, default)
            folder = str(Path(path).parent) if kind.startswith("run:") and Path(path).suffix else path
            found.append(Input(index, folder, kind))
    return found


_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")


def fresh_outputs(argv: list[str], inputs: list[Input], line: int) -> list[str]:
    """An upper-case placeholder that is not an input (``--out DIR``) is an output the reader names: each
    command gets its own (``DIR_61``), as a reader would not write two commands' results to one folder."""
    read = {i.index for i in inputs}
    return [f"{w}_{line}" if _PLACEHOLDER.match(w) and i not in read else w for i, w in enumerate(argv)]


def preset_models(module: str, argv) -> list[str]:
    """Hub ids that the command's presets name as its model (``--preset qwen-0.5b``), when no flag
    replaces them: bound like a ``--model`` on the command line."""
    given = {f for f, _, _ in flag_spans(list(argv))}
    return [str(value) for field, value in preset_values(module, argv).items()
            if field in ("model", "llm_model") and not (flag_names(field) & given)]


# --------------------------------------------------------------------------------------------------
# What cannot run here, and why
# --------------------------------------------------------------------------------------------------

_GPU = "GPU only"
_SLURM_SITE = "a site's Slurm settings"

#: Documented commands that no test runs here, by the command as shown (``DocCommand.shown``), with the
#: reason the test reports as its skip. A stale entry (no documented command) fails a test below.
SKIPS = {
    # the test suite and the install it needs: CI runs these lines as written (.ci/run)
    'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest -n 2 --dist '
    'loadfile -m "not slow"': "the README's test command: CI (.ci/run) runs it as written "
                              "(test_ci_runs_the_readme_test_command_as_written)",
    'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest -n 2 --dist '
    'loadfile -m "not slow" --durations=60': "the README's test command on a fresh clone (a measurement); "
                                             "CI runs the same command",
    "git clone REPO fresh && cd fresh && export CRAFTAX_JAX_CACHE=/tmp/cold_cache":
        "a fresh clone of the repository, the setup of the measurement below it",
    ".venv/bin/python -m pytest -n 2 --dist loadfile --durations=60": "the whole test suite (it would run itself)",
    "python -m pytest -q -s tests/test_server.py -k huge_bodies": "a test of tests/test_server.py, run by the suite",
    "ruff check . && lint-imports": "tests/test_lint.py runs both on the repository",
    # GPU machines
    'pip install -e ".[cuda,llm,vllm]"': f"{_GPU}: installs the CUDA and vLLM extras (network, a GPU machine)",
    'pip install -e ".[cuda,llm,sglang]" --extra-index-url https://pypi.nvidia.com':
        f"{_GPU}: installs the CUDA and SGLang extras (network, a GPU machine); "
        "tests/test_llm_backends.py resolves the line",
    "bash benchmarks/gpu_check.sh": f"{_GPU}: vLLM and SGLang against transformers (tests/test_gpu_check.py "
                                    "runs it with stand-ins)",
    # the Hugging Face hub
    "python -m utils.llm.download Qwen/Qwen3-4B --to /shared/models/Qwen3-4B":
        "downloads from the Hugging Face hub (network); tests/test_llm_download.py covers the command",
    # Slurm lines that need a site's cluster (partitions, accounts, GPUs, several nodes)
    "sbatch --partition=gpu --account=myproj --qos=normal --time=04:00:00 scripts/sbatch/ppo_family.sbatch ppo":
        f"{_SLURM_SITE} (partition gpu, account myproj) and PPO's GPU-sized defaults",
    "sbatch --array=0-15 --partition=YOUR_GPU_PARTITION scripts/sbatch/labelling_worker.sbatch":
        f"{_SLURM_SITE} (a GPU partition) and a cluster's Redis; tests/test_slurm.py runs the worker script",
    "sbatch --nodes=2 --gres=gpu:4 -p PARTITION scripts/sbatch/ppo_multinode.sbatch --env Craftax-Symbolic-v1 "
    "--num-envs 4096": f"{_GPU}: two nodes of 4 GPUs (scripts/shell/ppo_multiprocess.sh is its local twin, run here)",
    'LABELLING_WORKER_SBATCH="--cpus-per-task=1" sbatch --cpus-per-task=1 scripts/sbatch/labelling_coordinator.sbatch'
    " ...": "its arguments are elided (...); tests/test_slurm.py runs the coordinator with these options",
    'LABELLING_WORKERS=16 LABELLING_WORKER_SBATCH="--partition=gpu --time=08:00:00" sbatch --partition=cpu '
    "scripts/sbatch/labelling_coordinator.sbatch --dataset /shared/data/ppo --out /shared/data/ppo-qwen "
    "--model /shared/models/Qwen2.5-7B-Instruct --backend vllm": f"{_GPU}: vLLM workers on {_SLURM_SITE}",
    "HIDDEN_STATE_URL_FILE=$PWD/runs/server_url sbatch scripts/sbatch/hidden_state_server.sbatch "
    "--model /shared/models/Qwen2.5-0.5B-Instruct": f"{_SLURM_SITE}: a GPU node serving a site's model folder; "
                                                    "tests/test_slurm.py runs the script with the tiny model",
    'sbatch --array=0-1 scripts/sbatch/ppo_llm.sbatch --preset qwen-0.5b --server-url "$(cat runs/server_url)"':
        f"{_SLURM_SITE}: needs the server job above on a GPU node; tests/test_slurm.py runs the script",
    "sbatch --array=0-3 scripts/sbatch/sweep_array.sbatch ppo --preset cpu --num-seeds 3 --sweep lr=1e-4,3e-4,1e-3 "
    "ent_coef=0.003,0.01": f"{_SLURM_SITE}: a GPU per task (the script's #SBATCH --gres) at the cpu preset; "
                           "tests/test_slurm.py runs the script at the debug preset",
    "JOB=$(sbatch --parsable --array=0-9 scripts/sbatch/offline_evaluate_many.sbatch runs/offline_tiers/classic_runs/*/* "
    "--episodes 64)": "a Slurm array over the tier runs of the page (64 episodes each); the local "
                      "evaluate_many line above it runs",
    "sbatch --dependency=afterok:${JOB%%_*} scripts/sbatch/offline_evaluate_many.sbatch runs/offline_tiers/classic_runs/*/*"
    " --episodes 64 --out runs/offline_tiers/classic_table": "depends on the array job above",
    "python -m benchmarks.offline_tiers --preset cpu --out runs/offline_tiers/classic":
        "at debug size it is the debug line above it (the rule appends --preset debug, which sets every size the "
        "cpu preset sets), and that line runs",
    "python -m benchmarks.offline_table runs/offline_tiers/classic_table.json --name offline_tiers_classic --title "
    "'Offline RL on the Craftax-Classic tiers' --baseline 'bc top_fraction=1.0'":
        "normalised scores need tiers whose expert beats random; at the debug preset PPO learns nothing (expert "
        "return = random return), so the table is refused, rightly; the evaluate_many line above it runs",
    "python -m benchmarks.offline_table runs/offline_tiers/classic_pixels_table.json --name "
    "offline_augment_classic_pixels --title 'Image augmentation for offline BC and AWR on Craftax-Classic-Pixels "
    "tiers' --baseline augment=none":
        "normalised scores need tiers whose expert beats random, which the debug PPO run's pixel tiers do not "
        "have, so the table is refused, rightly; the evaluate_many line above it runs",
    # run once per suite, not twice: two jax.distributed processes whose gloo connection times out when the
    # machine is so loaded that their compiles finish more than its connect timeout apart
    "XLA_FLAGS=--xla_force_host_platform_device_count=2 scripts/shell/ppo_multiprocess.sh --preset debug":
        "tests/test_devices.py::test_two_processes_match_one_process runs this script at this preset (two "
        "processes of two CPU devices) and checks it against one process",
    "python -m benchmarks.compare full_1m --slurm --partition gpu --account myproj --max-parallel 4":
        f"{_SLURM_SITE} (partition gpu, account myproj); the --dry-run line above prints the same array job",
}


_FULL_TWIN = ("compile budget: Craftax-Symbolic-v1 programs compile for minutes each on 2 cores; its "
              "Craftax-Classic twin ({}) and full-Craftax PPO (README.md) run; CRAFTAX_DOCS_FULL=1 runs it")

#: Full-Craftax commands left out for the time they take (set CRAFTAX_DOCS_FULL=1 to run them too): each has
#: a twin on Craftax-Classic that runs, and `online_rl.ppo --env Craftax-Symbolic-v1` runs from README.md.
FULL_CRAFTAX_BUDGET = {
    "python -m online_rl.ppo_rnn --preset cpu --env Craftax-Symbolic-v1 --total-steps 1000000 --num-seeds 2 "
    "--run-name compare-1m --no-progress": _FULL_TWIN.format("the compare-2m line of results.md"),
    "python -m online_rl.ppo --bonus rnd --preset cpu --env Craftax-Symbolic-v1 --total-steps 1000000 "
    "--num-seeds 2 --run-name compare-1m --no-progress": _FULL_TWIN.format("the compare-2m line of results.md"),
    "python -m online_rl.ppo --bonus icm --preset cpu --env Craftax-Symbolic-v1 --total-steps 1000000 "
    "--num-seeds 2 --run-name compare-1m --no-progress": _FULL_TWIN.format("the compare-2m line of results.md"),
    "python -m online_rl.ppo --bonus e3b --preset cpu --env Craftax-Symbolic-v1 --total-steps 1000000 "
    "--num-seeds 2 --run-name compare-1m --no-progress": _FULL_TWIN.format("the compare-2m line of results.md"),
    "python -m benchmarks.offline_tiers --env Craftax-Symbolic-v1 --out /data/tiers/craftax --ppo-steps 1000000000 "
    "--replay-every 8 --steps 1000000 --num-envs 256 --eval-episodes 128":
        _FULL_TWIN.format("the Craftax-Classic line above it").replace("and full-Craftax PPO (README.md) ", "")
        + " (over 20 minutes at the debug preset here)",
}


def gpu_reason(module: str, argv) -> str | None:
    """Why a command needs a GPU: a CUDA device or a GPU engine, on its command line or from a preset.
    ``labelling.enqueue`` only records the backend its workers will use, so it runs anywhere."""
    if module == "labelling.enqueue":
        return None
    asked = {**preset_values(module, argv)}
    for field in ("device", "backend"):
        value = flag_value(argv, f"--{field}")
        if value is not None:
            asked[field] = value
    if str(asked.get("device", "")).startswith("cuda"):
        return f"{_GPU}: --device {asked['device']}"
    if asked.get("backend") in ("vllm", "sglang"):
        return f"{_GPU}: the {asked['backend']} engine"
    return None


def skip_reason(command: DocCommand) -> str | None:
    """The reason a command does not run here, or None."""
    if command.shown in SKIPS:
        return SKIPS[command.shown]
    if command.shown in FULL_CRAFTAX_BUDGET and not os.environ.get("CRAFTAX_DOCS_FULL"):
        return FULL_CRAFTAX_BUDGET[command.shown]
    return gpu_reason(command.module, command.argv) if command.module else None


# --------------------------------------------------------------------------------------------------
# Lines of other programs that do run
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShellRun:
    """How a documented line of another program runs: through bash in the page's folder, in a site
    checkout (the scripts cd to the checkout they live in), or submitted to the local Slurm cluster."""

    where: str  # "page", "checkout" or "slurm"
    why: str
    jobs: int = 1  # Slurm tasks the submission makes


SHELL_RUNS = {
    "curl -s -X POST localhost:8000/v1/hidden_states -H 'content-type: application/json' "
    "-d '{\"texts\": [\"Health 9, food 9, drink 9, energy 9.\"]}'": ShellRun("page", "against the test's server"),
    "curl -s -X POST 'localhost:8000/v1/hidden_states?format=f16' -H 'content-type: application/json' "
    "-d '{\"texts\": [\"a\", \"b\"]}' -D - -o vectors.f16": ShellRun("page", "against the test's server"),
    "python -c \"import numpy as np; print(np.fromfile('vectors.f16', '<f2').reshape(2, 32))\"":
        ShellRun("page", "reads the file the curl line above wrote"),
    "CRAFTAX_DRY_RUN=1 SLURM_ARRAY_TASK_ID=2 bash scripts/sbatch/ppo_family.sbatch ppo_icm --preset cpu":
        ShellRun("checkout", "a dry run prints the command"),
    "sbatch --gres=none --cpus-per-task=2 --mem=4G --array=0-1 scripts/sbatch/ppo_family.sbatch ppo --preset debug":
        ShellRun("slurm", "the CPU-cluster recipe of docs/scripts.md", jobs=2),
    "sbatch --cpus-per-task=2 scripts/sbatch/dreamer.sbatch --version 3 --preset debug":
        ShellRun("slurm", "the CPU-cluster recipe, with the SBATCH_* variables of the line above it"),
}


# --------------------------------------------------------------------------------------------------
# Interactive commands and services
# --------------------------------------------------------------------------------------------------

#: Keys a headless ``tools.play`` session presses when the docs give no ``--script`` (more than 40
#: actions: docs/online_rl_llm.md queries step 40 of a recording), by the env family's key map.
PLAY_SCRIPTS = {
    "Craftax": ",".join(["w", "a", "space", "say:is that a tree?", "s", "d", "space", "tab"] * 6),
    "Tetris-Direct": ",".join(["left", "right", "up", "z", "down", "space", "c", "q"] * 6),
    "Tetris-Placement": ",".join(["left", "right", "up", "z", "space", "c"] * 8),
}

#: Long-running commands: the test waits for this line in their output. A server then serves the later
#: commands of its ``bash`` block (until the block starts another); ``labelling.status --watch`` gets SIGINT
#: (what a reader's Ctrl-C does) and must exit cleanly.
SERVICES = {"servers.hidden_state_server": r"serving on", "labelling.status": r"\w"}


def play_script(argv) -> str:
    env = flag_value(argv, "--env") or "Craftax-Classic-Symbolic-v1"
    return next(keys for family, keys in PLAY_SCRIPTS.items() if env.startswith(family))


def interactive_rule(module: str, argv: list[str]) -> tuple[list[str], dict[str, str], str | None, str | None]:
    """``(argv, env, stdin, ready)`` for commands that wait for a person or run until stopped: ``tools.play``
    plays a key script on a dummy display (``--reason`` reads an empty reasoning per action from stdin);
    ``online_rl_llm.query`` reads one empty line (one turn) and then the end of its input; services and
    ``--watch`` run until ready (SERVICES); ``--devices N`` gets N CPU devices, as docs/online_rl.md shows."""
    env, stdin, ready = {}, None, None
    if module == "tools.play":
        env["SDL_VIDEODRIVER"] = "dummy"
        if flag_value(argv, "--script") is None:
            argv = [*argv, "--script", play_script(argv)]
        if "--reason" in argv:
            stdin = "\n" * 200
    if module == "online_rl_llm.query" and flag_value(argv, "--once") is None:
        stdin = "\n"
    if module in SERVICES and (module != "labelling.status" or flag_value(argv, "--watch") is not None):
        ready = SERVICES[module]
    devices = flag_value(argv, "--devices")
    if devices and devices.isdigit() and int(devices) > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return argv, env, stdin, ready


# --------------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------------

#: Entry points that train (docs/design.md's algorithm files, LLM play aside): a run of one must leave a
#: complete run folder.
TRAINING_MODULES = {"online_rl.ppo", "online_rl.ppo_rnn", "online_rl.ppo_rnd", "online_rl.random_policy",
                    "world_models.dreamer",
                    "offline_rl.awr", "offline_rl.bc", "offline_rl.iql", "online_rl_llm.ppo_llm"}

#: Flags that change where and how a run is shown, never what it computes (utils.config's
#: PRESENTATION_FIELDS): commands that differ only in them compute the same thing.
PRESENTATION_FLAGS = {"--run-name", "--run-dir", "--no-progress", "--progress", "--checkpoint-every"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the test does with one documented command."""

    command: DocCommand
    argv: tuple[str, ...] = ()
    inputs: tuple[Input, ...] = ()
    models: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    stdin: str | None = None
    ready: str | None = None
    skip: str | None = None
    same_as: str | None = None
    shell: ShellRun | None = None

    @property
    def trains(self) -> bool:
        return self.command.module in TRAINING_MODULES and "--help" not in self.argv

    def key(self) -> tuple:
        """Equal for commands that compute the same thing under the rules (run once)."""
        module = self.command.module
        argv = list(self.argv)
        if module in TRAINING_MODULES:
            argv = drop_flags(argv, PRESENTATION_FLAGS)
        covered = set((presets_of(module).get("debug") or {})) if module and has_debug_preset(module) else set()
        kept = [p for p in preset_names(argv) if p == "debug" or not set(presets_of(module).get(p) or {}) <= covered]
        argv = [*drop_flags(argv, {"--preset"}), "--preset", *kept] if preset_names(argv) else argv
        spans = sorted(tuple(argv[start:end]) for flag, start, end in flag_spans(argv) if flag is not None)
        positional = tuple(argv[start] for flag, start, _ in flag_spans(argv) if flag is None)
        return module, positional, tuple(spans), self.env, self.stdin, self.ready


def weightless_rule(module: str, argv: list[str], inputs: list[Input]) -> list[str]:
    """An enqueue of a model whose shape alone stands in (MODEL_SHAPES: no weights) fills the test's own
    Redis, so the page's workers never take jobs no stand-in can compute."""
    shape_only = any(i.kind.split(":", 1)[-1] in MODEL_SHAPES for i in inputs if i.kind.startswith("llm:"))
    if module == "labelling.enqueue" and shape_only and flag_value(argv, "--redis-url") is None:
        argv = [*argv, "--redis-url", "{REDIS_URL}"]
    return argv


def plan_of(command: DocCommand) -> Plan:
    """The plan of one command, before deduplication."""
    skip = skip_reason(command)
    if command.module is None:
        shell = SHELL_RUNS.get(command.text)
        return Plan(command, skip=skip, shell=shell)
    module = command.module
    argv = small_argv(module, bound_argv(command))
    argv, env, stdin, ready = interactive_rule(module, argv)
    argv = weightless_rule(module, argv, inputs_of(module, argv))
    argv = fresh_outputs(argv, inputs_of(module, argv), command.line)
    return Plan(command, tuple(argv), tuple(inputs_of(module, argv)), tuple(preset_models(module, argv)),
                tuple({**dict(command.env), **env}.items()), stdin, ready, skip)


#: Entry points that work on what earlier commands left in a queue rather than on their arguments, with the
#: entry point that fills it: a repeated line still runs after a line of its page that filled the queue.
QUEUE_CONSUMERS = {"labelling.worker": "labelling.enqueue"}


def provides(plan: Plan) -> set[str]:
    """What a command makes that a later command of its page may read: the paths its argv names that are not
    its inputs (an output folder, a model or dataset written), and a server the address it serves."""
    if plan.command.module is None:
        return set()
    argv, inputs = list(plan.argv), {i.index for i in plan.inputs}
    made = set()
    for flag, start, end in flag_spans(argv):
        if flag is not None and "=" in argv[start]:
            made.add(argv[start].split("=", 1)[1])
        made.update(argv[i] for i in range(start if flag is None else start + 1, end) if i not in inputs)
    if plan.command.module == "servers.hidden_state_server" and plan.ready:
        made.add(f"{{SERVER}}@{plan.command.block}")
    return made


def needs(plan: Plan) -> set[str]:
    """The paths a command reads (its inputs), and ``{SERVER}`` when it reaches a server (its block's)."""
    server = {f"{{SERVER}}@{plan.command.block}"}
    if plan.command.module is None:
        shown = plan.shell is not None and plan.shell.where == "page"
        return server if shown and any(a in plan.command.text for a in SERVER_ADDRESSES) else set()
    read = {i.path for i in plan.inputs}
    return read | (server if any("{SERVER}" in w for w in plan.argv) else set())


def _covers(made: str, read: str) -> bool:
    return read == made or read.startswith(made.rstrip("/") + "/")


def rerun_what_the_page_needs(page: list[Plan]) -> list[Plan]:
    """A repeated command runs again in its page's folder when a later command of the page that runs reads
    what it makes (a dataset, a model, the server it starts; the copy elsewhere wrote into another page's
    folder), and a queue consumer runs again after a line of its page that filled the queue."""
    page, needed = list(page), set()
    for index in reversed(range(len(page))):
        plan = page[index]
        if plan.skip:
            continue
        made = provides(plan)
        if plan.same_as and any(_covers(m, r) for m in made for r in needed):
            plan = page[index] = dataclasses.replace(plan, same_as=None)
        if plan.same_as is None:
            needed = {r for r in needed if not any(_covers(m, r) for m in made)} | needs(plan)
    filled: set[str] = set()
    for index, plan in enumerate(page):
        if plan.skip or plan.command.module is None:
            continue
        if plan.same_as is None and plan.command.module in QUEUE_CONSUMERS.values():
            filled.add(plan.command.module)
        elif plan.command.module in QUEUE_CONSUMERS:
            if plan.same_as and QUEUE_CONSUMERS[plan.command.module] in filled:
                page[index] = dataclasses.replace(plan, same_as=None)
            filled.discard(QUEUE_CONSUMERS[plan.command.module])
    return page


@lru_cache(maxsize=1)
def plans() -> tuple[Plan, ...]:
    """Every documented command's plan, in page order. A command that computes what an earlier one
    computes is marked ``same_as`` that one (it is reported, not run again), or skipped like it, unless its
    page needs it to run again (:func:`rerun_what_the_page_needs`)."""
    ran: dict[tuple, str] = {}
    skipped: dict[tuple, str] = {}
    out: dict[str, list[Plan]] = {}
    for command in documented_commands():
        plan = plan_of(command)
        if plan.command.module:
            key = plan.key()
            if plan.skip:
                skipped.setdefault(key, f"the same as {command.id}, skipped: {plan.skip}")
            elif key in ran:
                plan = dataclasses.replace(plan, same_as=ran[key])
            elif key in skipped:
                plan = dataclasses.replace(plan, skip=skipped[key])
            else:
                ran[key] = command.id
        out.setdefault(command.page, []).append(plan)
    return tuple(plan for page in out.values() for plan in rerun_what_the_page_needs(page))


# --------------------------------------------------------------------------------------------------
# Fast checks: the rules do what docs/README.md says, and every documented command has a plan
# --------------------------------------------------------------------------------------------------


def test_every_documented_command_is_run_or_skipped():
    """A command is run (a project module, or a line of SHELL_RUNS), the same as one that runs, or skipped
    with a reason; a new line of another program fails here until it is added to SHELL_RUNS or SKIPS."""
    by_id = {p.command.id: p for p in plans()}
    unplanned = [p.command.id for p in plans()
                 if p.command.module is None and p.shell is None and not p.skip]
    assert not unplanned, "documented lines neither run nor skipped (add them to SHELL_RUNS or SKIPS):\n" + \
        "\n".join(unplanned)
    for plan in plans():
        if plan.same_as:
            assert by_id[plan.same_as].same_as is None and not by_id[plan.same_as].skip
        assert plan.skip is None or plan.skip.strip(), plan.command.id
    assert sum(p.skip is None and p.same_as is None for p in plans()) > 100, "too few commands run"


def test_the_tables_name_only_documented_commands():
    """No stale entry: every command a table names is still documented."""
    documented = {c.shown for c in documented_commands()} | {c.text for c in documented_commands()}
    stale = [key for key in (*SKIPS, *SHELL_RUNS, *FULL_CRAFTAX_BUDGET) if key not in documented]
    assert not stale, "entries for commands the docs no longer show:\n" + "\n".join(stale)


def test_every_command_with_presets_gets_the_debug_preset():
    """An entry point that takes ``--preset`` in the docs has a debug preset, so the budget rule applies
    (a new entry point with presets needs one, or a line in PRESET_FILES_ELSEWHERE)."""
    missing = sorted({c.module for c in documented_commands()
                      if c.module and preset_names(c.argv) and not has_debug_preset(c.module)})
    assert not missing, f"documented with --preset but no debug preset found: {missing}"


def test_fences_join_continuations_and_number_lines():
    page = "intro\n```bash\n# comment\npython -m a.b --x 1 \\\n    --y 2   # why\nA=1; B=$A/x\n```\n"
    assert fenced_lines(page) == [(0, 4, "python -m a.b --x 1 --y 2   # why"), (0, 6, "A=1; B=$A/x")]
    assert strip_comment("python -m a --s 'a # b' # why") == "python -m a --s 'a # b'"
    assert assignments("A=1; B=$A/x") == {"A": "1", "B": "$A/x"}
    assert assignments("for tier in random medium; do") == {"tier": "random"}
    assert assignments("export X=1 Y=2") == {"X": "1", "Y": "2"} and assignments("python -m a") is None


def test_debug_rule_appends_the_preset_and_drops_what_it_sets():
    assert small_argv("online_rl.ppo", ["--preset", "cpu", "--total-steps", "5000000", "--bonus", "rnd",
                                        "--num-seeds", "2"]) == ["--preset", "cpu", "--bonus", "rnd", "--preset",
                                                                 "debug", "--run-name", "cpu-s0"]
    assert small_argv("online_rl.ppo", ["--preset", "debug", "--layer-width", "32"]) == \
        ["--preset", "debug", "--layer-width", "32"], "a command at the debug preset runs as written"
    assert small_argv("benchmarks.offline_tiers", ["--out", "x", "--ppo-steps", "100", "--steps", "5",
                                                   "--num-envs", "256", "--replay-every", "4"]) == \
        ["--out", "x", "--replay-every", "4", "--preset", "debug"]
    assert small_argv("online_rl.ppo", ["--save-trajectories", "d", "--seed", "3"]) == \
        ["--save-trajectories", "d", "--seed", "3", "--preset", "debug", "--run-name", "default-s3", "--total-steps",
         DATASET_STEPS]
    assert small_argv("online_rl.ppo", ["--help"]) == ["--help"]


def test_debug_rule_keeps_the_network_flags_an_init_from_source_fixes():
    """``--init-from`` needs the source run's network: its flags stay, only the budget shrinks."""
    documented = ["--preset", "cpu", "--layer-width", "256", "--num-layers", "2", "--activation", "relu",
                  "--init-from", "RUN", "--critic-warmup", "10", "--total-steps", "5000000"]
    assert small_argv("online_rl.ppo", documented) == \
        ["--preset", "cpu", "--layer-width", "256", "--num-layers", "2", "--activation", "relu", "--init-from",
         "RUN", "--critic-warmup", "10", "--preset", "debug", "--run-name", "cpu-s0"]
    assert small_argv("online_rl.ppo", ["--preset", "cpu", "--layer-width", "256"]) == \
        ["--preset", "cpu", "--preset", "debug", "--run-name", "cpu-s0"], "without an input the preset wins"
    by_shown = {p.command.shown: p for p in plans() if p.command.module == "online_rl.ppo"}
    fine_tune = next(p for shown, p in by_shown.items() if "--init-from" in shown)
    assert [flag_value(fine_tune.argv, f) for f in ("--layer-width", "--num-layers", "--activation")] == \
        [flag_value(fine_tune.command.argv, f) for f in ("--layer-width", "--num-layers", "--activation")]


def test_budget_rule_gives_small_values_by_flag_name():
    assert small_argv("benchmarks.env_throughput", ["--num-steps", "1000", "--repeats", "3"]) == \
        ["--num-steps", SMALL_VALUES["--num-steps"], "--repeats", "1", "--num-envs", "8"]
    assert small_argv("benchmarks.compare", ["classic_2m", "--methods", "ppo_rnd,ppo", "--budget", "500000"]) == \
        ["classic_2m", "--methods", "ppo_rnd", "--budget", "1", "--seeds", "1", "--env",
         "Craftax-Classic-Symbolic-v1"]
    assert small_argv("benchmarks.compare", ["classic_2m"])[-4:] == ["--methods", "ppo", "--env",
                                                                     "Craftax-Classic-Symbolic-v1"]
    assert flag_value(small_argv("benchmarks.server_throughput", ["--items", "256", "--num", "1024"]), "--num") == \
        "256", "a request of --items needs that many observations"
    assert flag_value(small_argv("benchmarks.server_throughput", ["--items", "4"]), "--num") == SMALL_VALUES["--num"]


def test_placeholders_are_bound():
    command = DocCommand("p", 1, "", "offline_rl.bc", ("--dataset", "$TIERS/$tier", "--run-dir", "$RUNS/x"),
                         variables=(("TIERS", "/data/tiers/classic"), ("RUNS", "runs/t"), ("tier", "random")))
    assert bound_argv(command) == ["--dataset", "data/tiers/classic/random", "--run-dir", "runs/t/x"]
    assert bound_argv(DocCommand("p", 1, "", "labelling.status", ("--redis-url", "$LABELLING_REDIS_URL"))) == \
        ["--redis-url", "{REDIS_URL}"]
    assert bind_addresses("http://127.0.0.1:8000") == "http://{SERVER}"
    assert reroot("/shared/models/Qwen3-4B") == "shared/models/Qwen3-4B" and reroot(str(REPO)) == str(REPO)
    assert fresh_outputs(["--run", "RUN", "--out", "DIR"], [Input(1, "RUN", "run:online_rl/ppo")], 7) == \
        ["--run", "RUN", "--out", "DIR_7"]


def test_inputs_get_the_kind_their_path_or_flag_names():
    kinds = {i.path: i.kind for i in inputs_of("tools.render", ["--run", "runs/world_models/dreamer_v3/E/xs-s0"])}
    assert kinds == {"runs/world_models/dreamer_v3/E/xs-s0": "run:world_models/dreamer_v3"}
    assert [(i.path, i.kind) for i in inputs_of("online_rl_llm.query", ["--model", "MODEL", "--transcript",
                                                                        "RUN/transcript.jsonl"])] == \
        [("MODEL", "llm"), ("RUN", "run:online_rl_llm/llm_play")]
    assert [i.kind for i in inputs_of("labelling.enqueue", ["--model", "shared/models/Qwen3-4B"])] == ["llm:qwen3-4b"]
    shape = ["--preset", "qwen3-4b", "--model", "shared/models/Qwen3-4B"]
    assert weightless_rule("labelling.enqueue", shape, inputs_of("labelling.enqueue", shape))[-2:] == \
        ["--redis-url", "{REDIS_URL}"], "no local worker takes the jobs of a model without weights"
    assert weightless_rule("labelling.enqueue", ["--model", "M"], inputs_of("labelling.enqueue", ["--model", "M"])) \
        == ["--model", "M"]
    assert [i.kind for i in inputs_of("tools.stats", ["runs/play/classic-1"])] == ["recording"]
    assert [i.kind for i in inputs_of("tools.stats", ["data/x-labelled"])] == ["labelled"]
    assert [i.kind for i in inputs_of("offline_rl.bc", ["--dataset", "data/tiers/classic/random"])] == ["tier"]
    assert inputs_of("benchmarks.server_throughput", ["--source", "synthetic"]) == []
    assert preset_models("online_rl_llm.ppo_llm", ["--preset", "cpu", "qwen-0.5b"]) == ["Qwen/Qwen2.5-0.5B-Instruct"]


def test_gpu_commands_are_skipped_saying_why():
    assert gpu_reason("online_rl_llm.llm_play", ["--preset", "gpu"]) == f"{_GPU}: the vllm engine"
    assert gpu_reason("benchmarks.server_throughput", ["--device", "cuda"]) == f"{_GPU}: --device cuda"
    assert gpu_reason("labelling.enqueue", ["--backend", "vllm"]) is None
    assert gpu_reason("online_rl_llm.llm_play", ["--preset", "debug"]) is None


def test_interactive_commands_get_a_script_or_an_input():
    argv, env, stdin, ready = interactive_rule("tools.play", ["--env", "Tetris-Direct-Standard-v0", "--reason"])
    assert flag_value(argv, "--script") == PLAY_SCRIPTS["Tetris-Direct"] and env == {"SDL_VIDEODRIVER": "dummy"}
    assert stdin.count("\n") > len(PLAY_SCRIPTS["Tetris-Direct"].split(","))
    assert interactive_rule("online_rl_llm.query", ["--model", "M"])[2] == "\n"
    assert interactive_rule("labelling.status", [])[3] is None
    assert interactive_rule("labelling.status", ["--watch", "1"])[3] == SERVICES["labelling.status"]
    assert interactive_rule("online_rl.ppo", ["--devices", "2"])[1] == \
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def test_commands_that_compute_the_same_run_once():
    by_shown = {p.command.shown: p for p in plans()}
    rerun = by_shown["python -m online_rl.ppo --preset cpu --env Craftax-Classic-Symbolic-v1 --total-steps 2000000 "
                     "--num-seeds 2 --run-name compare-2m-rerun --no-progress"]
    assert rerun.same_as is not None, "differs from the compare-2m line only in its run name"


def _plan(line: int, module: str, argv: list[str], same_as: str | None = None) -> Plan:
    return dataclasses.replace(plan_of(DocCommand("p", line, "", module, tuple(argv))), same_as=same_as)


def test_a_repeated_command_runs_again_when_its_page_reads_what_it_makes():
    """What a repeated line wrote went to another page's folder: a later line of this page that reads it, or
    reaches the server it starts, makes it run here too; a worker runs again after an enqueue that ran."""
    page = [_plan(1, "utils.testing.tiny_vlm", ["runs/tiny_vlm"], same_as="x:1"),
            _plan(2, "online_rl.ppo", ["--env", "E", "--preset", "debug", "--save-trajectories", "runs/d"], "x:2"),
            _plan(3, "servers.hidden_state_server", ["--model", "runs/tiny_vlm", "--preset", "debug"], "x:3"),
            _plan(4, "offline_rl.bc", ["--dataset", "runs/d", "--preset", "debug"]),
            _plan(5, "online_rl_llm.ppo_llm", ["--preset", "debug", "--server-url", "http://127.0.0.1:8000"]),
            _plan(6, "labelling.worker", ["--preset", "debug"], same_as="x:6"),
            _plan(7, "labelling.enqueue", ["--dataset", "runs/d", "--out", "runs/l", "--model", "M"]),
            _plan(8, "labelling.worker", ["--preset", "debug"], same_as="x:6"),
            _plan(9, "offline_rl.evaluate", ["--run-dir", "runs/r", "--server-url", "http://localhost:8000"], "x:9")]
    assert [p.same_as for p in rerun_what_the_page_needs(page)] == [None] * 5 + ["x:6", None, None, "x:9"]
    assert [p.same_as for p in rerun_what_the_page_needs(page[:3])] == ["x:1", "x:2", "x:3"], "nothing reads them"
    on_page: dict[tuple, Plan] = {}
    for plan in plans():
        on_page.setdefault((plan.command.page, plan.command.shown), plan)  # a page's first such line
    pixels = "python -m online_rl.ppo --env Craftax-Classic-Pixels-v1 --preset debug --save-trajectories " \
        "runs/data/pixels_debug"
    assert on_page[("docs/offline_rl.md", pixels)].same_as is None, "its pixel dataset feeds the --augment lines"
    assert on_page[("docs/servers.md", "python -m servers.hidden_state_server --model runs/tiny_vlm --preset debug "
                    "--port 8000")].same_as is None, "its VLM server serves the frames line after it"



def small_commands() -> list[tuple[str, tuple[str, ...]]]:
    """``(module, argv)`` of what the slow tests run, placeholders filled with stand-ins: parsed by
    tests/test_docs_commands.py beside the documented commands (a budget flag an entry point does not take
    fails there in a minute, not in the slow lane)."""
    stand_ins = {"{SERVER}": "127.0.0.1:8000", "{REDIS_URL}": "redis://127.0.0.1:6379/0", "{FREE_PORT}": "8000"}

    def filled(word: str) -> str:
        for key, value in stand_ins.items():
            word = word.replace(key, value)
        return word

    return sorted({(p.command.module, tuple(filled(w) for w in p.argv)) for p in plans()
                   if p.command.module and not p.skip and not p.same_as})


def page_plans(pages: tuple[str, ...]) -> list:
    """The plans of ``pages`` as test parameters, duplicates left out (each runs once, under its first
    occurrence): tests/test_docs_run_front.py takes the front pages, tests/test_docs_run_a.py and
    tests/test_docs_run_b.py each take half of the others."""
    import pytest

    return [pytest.param(p, id=p.command.id) for p in plans() if p.command.page in pages and p.same_as is None]


def test_every_page_with_commands_runs_in_exactly_one_file():
    """The pages are split over three files (CI runs the front one, the others are `docs`); a page added
    to docs/ or dropped from every tuple would otherwise go untested without a word."""
    import test_docs_run_a
    import test_docs_run_b
    import test_docs_run_front

    files = (test_docs_run_front.PAGES, test_docs_run_a.PAGES, test_docs_run_b.PAGES)
    listed = [page for pages in files for page in pages]
    assert len(listed) == len(set(listed)), f"a page runs in two files: {sorted(listed)}"
    with_commands = {p.command.page for p in plans()}
    assert with_commands <= set(listed), f"pages whose commands no file runs: {sorted(with_commands - set(listed))}"
