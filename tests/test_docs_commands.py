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
