"""The files around the code: LICENSE, the pre-commit hooks and the container recipe.

They are read by tools that the tests never run (pre-commit, docker), so what can drift is checked
here: the hooks run the linters tests/test_lint.py runs, the image's default command is the README's
quickstart, and its build context holds everything an editable install reads. The image itself is
built where a container runtime answers, and skipped with the reason otherwise.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def readme_quickstart() -> list[str]:
    """The python command of the README's quickstart line (the part after the install), as words."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"\*\*Quickstart\*\*.*?```bash\n(.*?)```", readme, re.DOTALL)
    assert block, "README.md has a **Quickstart** paragraph with a bash fence"
    (line,) = [line for line in block.group(1).splitlines() if line.strip()]
    command = shlex.split(line.split("&&")[-1])
    assert command[0].endswith("python") and command[1] == "-m", command
    return command


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, comments dropped and continued lines joined."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (REPO / "Dockerfile").read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(words[0].upper(), words[1].strip() if len(words) > 1 else "")
            for words in (line.strip().split(None, 1) for line in text.splitlines() if line.strip())]


def test_license_is_mit():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 Craftax Baselines contributors" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text


def test_pre_commit_runs_ruff_and_import_linter_without_downloads():
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    hooks = [hook for repo in config["repos"] for hook in repo["hooks"]]
    assert [repo["repo"] for repo in config["repos"]] == ["local"], "local hooks only: nothing to download"
    entries = {hook["entry"].split()[0]: hook for hook in hooks}
    assert {"ruff", "lint-imports"} <= set(entries)
    assert all(hook["language"] == "system" for hook in hooks), "the installed tools, not hook environments"
    assert entries["lint-imports"]["pass_filenames"] is False, "import contracts hold for the whole tree"
    for tool in entries:  # the test extra installs them beside this Python
        assert (Path(sys.executable).parent / tool).exists() or shutil.which(tool), f"{tool} is not installed"


def test_dockerfile_is_a_cpu_image_whose_default_command_is_the_quickstart():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    commands = [args for name, args in instructions if name == "CMD"]
    assert len(commands) == 1
    cmd = json.loads(commands[0])  # the exec form: signals reach Python, not a shell
    quickstart = readme_quickstart()
    assert cmd[0] == "python" and cmd[1:] == quickstart[1:], (cmd, quickstart)
    runs = " ".join(args for name, args in instructions if name == "RUN")
    assert re.search(r"pip install -e \"?\.", runs), "the project is installed editable (configs/ beside it)"


def test_docker_build_context_holds_what_the_install_reads():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    ignored = lambda name: any(fnmatch.fnmatch(name, p.removeprefix("**/")) for p in patterns)  # noqa: E731
    find = re.search(r"\[tool\.setuptools\.packages\.find\]\s*include = \[(.*?)\]",
                     (REPO / "pyproject.toml").read_text(), re.DOTALL)  # no tomllib on Python 3.10
    packages = re.findall(r'"(\w+)\*"', find.group(1))
    assert "utils" in packages and "online_rl" in packages, packages
    needed = packages + ["pyproject.toml", "README.md", "configs"]
    assert not [name for name in needed if ignored(name)], "the image would miss files the install reads"
    assert all(ignored(name) for name in (".venv", "runs", ".git", "__pycache__")), "no environments or outputs"


def _container_runtime() -> str | None:
    """docker or podman if one is installed and its daemon answers, else skip with the reason."""
    for name in ("docker", "podman"):
        path = shutil.which(name)
        if path is None:
            continue
        answer = subprocess.run([path, "info"], capture_output=True, text=True, timeout=60)
        if answer.returncode == 0:
            return path
        pytest.skip(f"{name} is installed but does not answer `{name} info` "
                    f"({(answer.stderr.strip().splitlines() or ['no reason given'])[-1]})")
    pytest.skip("no container runtime (docker or podman) on PATH")


@pytest.mark.slow  # minutes: pip installs JAX and the rest into the image
def test_docker_image_builds_and_its_default_command_is_the_quickstart():
    runtime = _container_runtime()
    tag = "craftax-baselines-test:latest"
    built = subprocess.run([runtime, "build", "-t", tag, str(REPO)], capture_output=True, text=True, timeout=3600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    try:
        inspected = subprocess.run([runtime, "image", "inspect", tag, "--format", "{{json .Config.Cmd}}"],
                                   capture_output=True, text=True, timeout=120)
        assert json.loads(inspected.stdout)[1:] == readme_quickstart()[1:], inspected.stdout
        helped = subprocess.run([runtime, "run", "--rm", tag, "python", "-m", "online_rl.ppo", "--help"],
                                capture_output=True, text=True, timeout=600)
        assert helped.returncode == 0 and "--preset" in helped.stdout, helped.stdout[-2000:] + helped.stderr[-2000:]
    finally:
        subprocess.run([runtime, "image", "rm", "-f", tag], capture_output=True, timeout=120)
