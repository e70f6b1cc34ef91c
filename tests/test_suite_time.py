"""benchmarks/suite_time.py: what it reads from the README, how it parses pytest, and a whole run on a
stand-in repository whose "install" and "tests" are echo commands."""

import json
import subprocess

import pytest

from benchmarks import suite_time


def test_it_times_the_readmes_own_command():
    command = suite_time.readme_test_command()
    assert command in (suite_time.REPO_ROOT / "README.md").read_text()
    install, tests = suite_time.split_install_and_tests(command)
    assert "pip install" in install and "pytest" not in install
    assert tests.startswith(".venv/bin/python -m pytest") and '-m "not slow"' in tests
    assert suite_time.SLOW_COMMAND in (suite_time.REPO_ROOT / ".ci" / "run").read_text()


def test_pytest_summaries_are_counted():
    out = "....\n==== 843 passed, 9 skipped, 2 deselected in 407.12s (0:06:47) ====\n"
    assert suite_time.pytest_counts(out) == {"passed": 843, "skipped": 9, "deselected": 2}
    assert suite_time.pytest_counts("= 1 failed, 20 passed, 3 errors in 9s =") == {
        "failed": 1, "passed": 20, "errors": 3}
    assert suite_time.pytest_counts("no summary") == {}
    with pytest.raises(SystemExit):
        suite_time.split_install_and_tests("pytest -q")


def make_repo(path, test_line):
    path.mkdir()
    (path / "README.md").write_text(f"# x\n\n```bash\n{test_line}\n```\n")
    for command in (["git", "init", "-q"], ["git", "add", "README.md"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(command, cwd=path, check=True)
    return path


def run_on_stand_in(tmp_path, monkeypatch, test_line: str):
    """suite_time on a one-file repository whose README's test line is ``test_line``: (result, table path)."""
    repo = make_repo(tmp_path / "repo", test_line)
    monkeypatch.setattr(suite_time, "REPO_ROOT", repo)
    monkeypatch.setattr(suite_time, "README", repo / "README.md")
    table = tmp_path / "suite.json"
    return suite_time.main(["--table", str(table), "--keep", str(tmp_path / "work")]), table


def test_a_whole_run_on_a_stand_in_repository_writes_its_table(tmp_path, monkeypatch):
    result, table = run_on_stand_in(tmp_path, monkeypatch,
                                    'echo pip install && echo "pytest == 3 passed, 1 skipped in 0.1s =="')
    assert not result["failed"]
    record = json.loads(table.read_text())
    assert record["schema"] == "craftax-baselines/table/1"
    steps = {row["step"]: row for row in record["rows"]}
    assert steps["tests (README command)"]["passed"] == 3 and steps["tests (README command)"]["skipped"] == 1
    assert steps["README command in all"]["minutes"][0] >= steps["install"]["minutes"][0]
    assert (tmp_path / "work" / "empty_jax_cache").is_dir() and not any((tmp_path / "work" / "empty_jax_cache").iterdir())


def test_a_failing_suite_records_its_failures_and_keeps_its_log(tmp_path, monkeypatch):
    result, table = run_on_stand_in(tmp_path, monkeypatch,
                                    'echo pip install && echo "pytest: 1 failed, 2 passed in 1s" && false')
    assert result["failed"] and result["rows"][1]["failed"] == 1
    record = json.loads(table.read_text())
    assert [row["failed"] for row in record["rows"] if row["step"] == "tests (README command)"] == [1]
