"""benchmarks.first_run: two processes share one fresh compilation cache; failures are one error line."""

import json

import pytest

from benchmarks import first_run

FAKE_ENTRY_POINT = """
import os, pathlib, sys
run_dir = pathlib.Path(sys.argv[sys.argv.index("--run-dir") + 1])
cache = pathlib.Path(os.environ["CRAFTAX_JAX_CACHE"])
cache.mkdir(parents=True, exist_ok=True)
warm = any(cache.iterdir())
(cache / "program").write_text("compiled")
run_dir.mkdir(parents=True)
(run_dir / "seen.json").write_text(__import__("json").dumps({"warm": warm, "argv": sys.argv[1:]}))
print("warm" if warm else "cold", file=sys.stderr)
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
    (tmp_path / "fake_entry.py").write_text(FAKE_ENTRY_POINT)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return "fake_entry"


def test_second_process_finds_the_cache_the_first_one_filled(fake_module, tmp_path, capsys):
    out = tmp_path / "first_run.json"
    rows = first_run.main(["--modules", fake_module, "--out", str(out)])
    assert rows[0]["module"] == fake_module and rows[0]["cold"]["seconds"] >= 0
    assert json.loads(out.read_text())["rows"] == rows
    assert "| fake_entry |" in capsys.readouterr().out
    seen = first_run.timed_run(fake_module, tmp_path / "cache", tmp_path / "a")
    again = first_run.timed_run(fake_module, tmp_path / "cache", tmp_path / "b")
    assert seen["seconds"] >= 0 and again["load_average_1m"] >= 0
    assert not json.loads((tmp_path / "a" / "seen.json").read_text())["warm"]
    assert json.loads((tmp_path / "b" / "seen.json").read_text())["warm"]
    assert json.loads((tmp_path / "b" / "seen.json").read_text())["argv"][:2] == ["--preset", "debug"]


def test_a_failing_entry_point_stops_with_one_error_line(fake_module, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_EXIT", "3")
    with pytest.raises(SystemExit, match=r"^error: .*fake_entry .* failed \(3\): cold"):
        first_run.timed_run(fake_module, tmp_path / "cache", tmp_path / "a")
