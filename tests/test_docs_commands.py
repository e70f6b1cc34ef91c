"""The commands the front pages show run as written.

Every line of a fenced ``bash`` block in ``README.md`` and ``docs/README.md`` that asks for ``--help``
or a ``debug`` preset is run through bash, exactly as printed, in a fresh temporary folder (so the run
folders it writes land there) with the repository's ``.venv/bin`` first on ``PATH`` (so ``python``
is the project's interpreter). ``--help`` must list the shared flags; a ``debug`` run must exit 0
and leave a complete run folder. Docs that drift from the code fail here instead of in a user's
terminal. Debug runs compile a training program (seconds with a warm persistent compilation cache,
which the entry points share with the test session; minutes on a cold one), so they are ``slow``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = ("README.md", "docs/README.md")
_FENCE = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
HELP_TIMEOUT_S = 300
DEBUG_TIMEOUT_S = 1200


def fenced_bash_lines(text: str) -> list[str]:
    """Non-empty, non-comment lines of the ``bash`` fences of a Markdown page."""
    lines = []
    for block in _FENCE.findall(text):
        lines += [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    return lines


def _words(line: str) -> list[str]:
    return shlex.split(line, comments=True)


def preset_names(line: str) -> list[str]:
    """Values given to ``--preset`` anywhere on the line (``--preset a b``, ``--preset=a``)."""
    names, collecting = [], False
    for word in _words(line):
        if word == "--preset":
            collecting = True
        elif word.startswith("--preset="):
            names.append(word.split("=", 1)[1])
            collecting = False
        elif word.startswith("-") or word in ("&&", "||", ";", "|"):
            collecting = False
        elif collecting:
            names.append(word)
    return names


def kind_of(line: str) -> str | None:
    """``help``, ``debug`` or None (a command this test does not run)."""
    if "--help" in _words(line):
        return "help"
    if "debug" in preset_names(line):
        return "debug"
    return None


def doc_commands() -> list[tuple[str, str, str]]:
    """(page, kind, line) for every command of the pages that this test runs."""
    found = []
    for page in PAGES:
        for line in fenced_bash_lines((REPO / page).read_text()):
            kind = kind_of(line)
            if kind is not None:
                found.append((page, kind, line))
    return found


def _bin_dir() -> Path:
    venv = REPO / ".venv" / "bin"
    return venv if (venv / "python").exists() else Path(sys.executable).parent


def run_as_written(line: str, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{_bin_dir()}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _params():
    params = []
    for page, kind, line in doc_commands():
        marks = [pytest.mark.slow] if kind == "debug" else []
        params.append(pytest.param(kind, line, marks=marks, id=f"{page}: {line.split('#')[0].strip()}"))
    return params


# --------------------------------------------------------------------------------------------------
# The extraction itself (fast)
# --------------------------------------------------------------------------------------------------


def test_extraction_reads_fences_presets_and_comments():
    page = "text `python -m a --help` outside a fence\n```bash\n# a comment\npython -m a --help   # why\n" \
           "python -m b --preset cpu debug --seed 1\npython -m c --preset=debug\npython -m d classic_debug\n" \
           "python -m e --preset cpu --run-name debug\n```\n```python\nprint('--help')\n```\n"
    lines = fenced_bash_lines(page)
    assert lines == ["python -m a --help   # why", "python -m b --preset cpu debug --seed 1",
                     "python -m c --preset=debug", "python -m d classic_debug",
                     "python -m e --preset cpu --run-name debug"]
    assert [kind_of(line) for line in lines] == ["help", "debug", "debug", None, None]


def test_front_pages_show_help_and_debug_commands():
    """The pages keep at least one of each, so this test cannot pass by finding nothing."""
    kinds = {(page, kind) for page, kind, _ in doc_commands()}
    assert ("README.md", "help") in kinds
    assert ("README.md", "debug") in kinds


# --------------------------------------------------------------------------------------------------
# Running them
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,line", _params())
def test_doc_command_runs_as_written(kind, line, tmp_path):
    timeout = HELP_TIMEOUT_S if kind == "help" else DEBUG_TIMEOUT_S
    result = run_as_written(line, tmp_path, timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"`{line}` exited {result.returncode}:\n{output[-3000:]}"
    if kind == "help":
        assert "usage" in output.lower(), output[-2000:]
        assert "--preset" in output, f"`{line}` does not document --preset"
        return
    configs = sorted(tmp_path.glob("runs/**/config.yaml"))
    assert configs, f"`{line}` wrote no run folder under runs/:\n{output[-2000:]}"
    for config in configs:
        run = config.parent
        rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if r.strip()]
        assert rows and all("step" in r for r in rows), f"{run}: metrics.jsonl has no rows with a step"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["complete"] is True, f"{run}: summary.json says the run did not finish"
        assert (run / "learning_curve.png").stat().st_size > 0
        assert any((run / "checkpoints").iterdir()), f"{run}: no checkpoint saved"


def test_ci_runs_the_readme_test_command_as_written():
    """CI must run what the README tells a new user to run, not a variant of it."""
    readme = fenced_bash_lines((REPO / "README.md").read_text())
    test_commands = [line for line in readme if "pytest" in line]
    assert len(test_commands) == 1, test_commands
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_commands[0] in ci_lines
    assert '-m "not slow"' in test_commands[0], "the README's command is the fast half"
    slow = '.venv/bin/python -m pytest -n 2 --dist loadfile -m "slow and not docs"'
    assert slow in ci_lines and f"`{slow}`" in (REPO / "README.md").read_text(), \
        "CI runs the slow half as its second command, and the README says so"


# --------------------------------------------------------------------------------------------------
# Every documented python command parses (all pages)
# --------------------------------------------------------------------------------------------------

ALL_PAGES = ("README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")))
PROJECT_PACKAGES = {"utils", "online_rl", "world_models", "offline_rl", "labelling", "online_rl_llm", "servers",
                    "benchmarks", "tools"}
_SEPARATORS = {"&&", "||", ";", "|", "&"}
_WRAPPERS = {"nohup", "srun", "time", "exec"}


def joined_lines(text: str) -> list[str]:
    """Commands of the ``bash`` fences, with ``\\`` continuations joined and comment lines dropped."""
    commands = []
    for block in _FENCE.findall(text):
        pending = ""
        for raw in block.splitlines():
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            commands.append(pending + line)
            pending = ""
        if pending:
            commands.append(pending)
    return commands


def shell_segments(words: list[str]) -> list[list[str]]:
    """A shell line's words split at ``&&``, ``||``, ``;`` and ``|``: one list per command, empty ones dropped."""
    segments, current = [], []
    for word in words:
        if word in _SEPARATORS:
            segments.append(current)
            current = []
        else:
            current.append(word)
    segments.append(current)
    return [s for s in segments if s]


def python_commands(line: str) -> list[tuple[str, list[str]]]:
    """``(module, argv)`` of every ``python -m <project module>`` on a shell line (env assignments,
    ``nice``/``nohup`` wrappers and redirections removed); other programs are not this test's."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return []
    found = []
    for segment in shell_segments(words):
        while segment and (re.fullmatch(r"\w+=\S*", segment[0]) or segment[0] in _WRAPPERS):
            segment = segment[1:]
        if segment[:1] == ["nice"]:
            segment = segment[3:] if segment[1:2] == ["-n"] else segment[1:]
        if len(segment) < 3 or not re.search(r"(^|/)python3?$", segment[0]) or segment[1] != "-m":
            continue
        module, argv = segment[2], []
        for word in segment[3:]:
            if re.match(r"^\d?>|^<", word):  # a redirection ends the command's own arguments
                break
            argv.append(word)
        if module.split(".")[0] in PROJECT_PACKAGES:
            found.append((module, argv))
    return found


def documented_python_commands() -> list[tuple[str, str, list[str]]]:
    return [(page, module, argv) for page in ALL_PAGES for line in joined_lines((REPO / page).read_text())
            for module, argv in python_commands(line)]


def test_command_extraction_joins_continuations_and_strips_wrappers():
    page = ("```bash\nnohup nice -n 10 CRAFTAX_X=1 python -m a.b --x 1 \\\n    --y 2 > log 2>&1 &\n"
            "python -m benchmarks.c d && .venv/bin/python -m pip install x\nSDL_VIDEODRIVER=dummy python -m tools.p"
            " --s 'w,w'\n```\n")
    commands = [c for line in joined_lines(page) for c in python_commands(line)]
    assert commands == [("benchmarks.c", ["d"]), ("tools.p", ["--s", "w,w"])]
    assert python_commands("python -m online_rl.ppo --preset cpu | tee log") == [("online_rl.ppo", ["--preset", "cpu"])]


def test_every_documented_python_command_parses():
    """Every ``python -m`` command of the README and docs/*.md, results.md's reproduction commands
    included, is parsed by its own module (flags, presets, subcommands), with no training: a renamed
    flag or a removed preset fails here. Every one of them also runs, at a small budget, in
    tests/test_docs_run_front.py, tests/test_docs_run_a.py and tests/test_docs_run_b.py (slow; the rules: docs/README.md, "How the docs
    are tested"); what those run is parsed here too, so a rule that breaks a command line fails fast."""
    from test_docs_run_rules import small_commands

    commands = documented_python_commands()
    assert len(commands) > 100, "the extraction found too few commands to be checking the docs"
    origin = {(module, tuple(argv)): page for page, module, argv in reversed(commands)}
    for module, argv in small_commands():
        origin.setdefault((module, argv), "under the rules of tests/test_docs_run_rules.py")
    unique = sorted(origin)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "docs_args_driver.py")],
                          input=json.dumps([[m, list(a)] for m, a in unique]), capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(unique), done.stderr[-3000:]
    failures = [f"{origin[(r['module'], tuple(r['argv']))]}: python -m {r['module']} {shlex.join(r['argv'])}"
                f"\n    {r['message']}" for r in results if r["status"] not in ("parsed", "help")]
    assert not failures, f"{len(failures)} commands do not parse:\n" + "\n".join(failures)


def test_parse_driver_reports_bad_flags_and_presets_and_accepts_good_lines():
    """The check above can fail: a removed flag or preset is an error, a good line parses, --help is help."""
    cases = [["online_rl.ppo", ["--preset", "cpu", "--total-steps", "100"]], ["online_rl.ppo", ["--no-such-flag", "1"]],
             ["online_rl.ppo", ["--preset", "no_such_preset"]], ["benchmarks.report", ["--check"]],
             ["benchmarks.report", ["--bogus"]], ["offline_rl.awr", ["--help"]]]
    done = subprocess.run([sys.executable, str(REPO / "tests" / "docs_args_driver.py")], input=json.dumps(cases),
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
    statuses = [json.loads(line)["status"] for line in done.stdout.splitlines() if line.startswith("{")]
    assert statuses == ["parsed", "error", "error", "parsed", "error", "help"], done.stdout + done.stderr[-2000:]
