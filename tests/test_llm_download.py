"""Qwen3-4B for offline nodes: the ``qwen3-4b`` labelling preset and ``python -m utils.llm.download``.

No network: ``huggingface_hub.snapshot_download`` is replaced by stand-ins that record their arguments
or raise the hub client's own errors, so the argument handling and every one-line error are checked
as a user would see them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from labelling.enqueue import EnqueueConfig
from utils.config import parse_config
from utils.errors import UserError
from utils.llm import check_spec
from utils.llm import download as download_module
from utils.testing.tiny_llm import PRESETS, build_tiny_llm

REPO = Path(__file__).resolve().parents[1]
hub = pytest.importorskip("huggingface_hub")
errors = pytest.importorskip("huggingface_hub.errors")


# ----------------------------------------------------------------------------------------------
# The qwen3-4b preset
# ----------------------------------------------------------------------------------------------


def test_qwen3_4b_preset_takes_the_middle_layer_with_qwen_0_5b_prompt(tmp_path):
    cfg = parse_config(EnqueueConfig, "labelling", "enqueue", ["--preset", "qwen3-4b"])
    small = parse_config(EnqueueConfig, "labelling", "enqueue", ["--preset", "qwen-0.5b"]).spec()
    spec = cfg.spec()
    assert spec.model == "Qwen/Qwen3-4B" and spec.pooling == "last" and not spec.thinking
    assert spec.layer == PRESETS["qwen3-4b"]["num_hidden_layers"] // 2 == 18
    assert (spec.system_prompt, spec.template) == (small.system_prompt, small.template)
    # The layer is in range for Qwen3-4B's config (36 layers, hidden 2560), checked like enqueue does.
    shaped = build_tiny_llm(tmp_path / "qwen3-4b", "qwen3-4b", weights=False)
    assert check_spec(spec.replace(model=shaped)) == (36, 2560)
    # Single-field flags still win over the preset (SGLang needs the last layer).
    assert parse_config(EnqueueConfig, "labelling", "enqueue",
                        ["--preset", "qwen3-4b", "--layer", "-1"]).spec().layer == -1


# ----------------------------------------------------------------------------------------------
# python -m utils.llm.download
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def calls(monkeypatch):
    """snapshot_download replaced by a stand-in that writes a config and records its arguments."""
    recorded: list[dict] = []

    def fake_snapshot_download(repo_id, **kwargs):
        recorded.append({"repo_id": repo_id, **kwargs})
        folder = Path(kwargs["local_dir"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        return str(folder)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    return recorded


def test_download_passes_model_folder_and_revision(calls, tmp_path, capsys):
    target = tmp_path / "models" / "Qwen3-4B"
    assert download_module.main(["Qwen/Qwen3-4B", "--to", str(target), "--revision", "abc123"]) == 0
    assert calls == [{"repo_id": "Qwen/Qwen3-4B", "revision": "abc123", "local_dir": str(target)}]
    out = capsys.readouterr().out
    assert "downloaded Qwen/Qwen3-4B at revision abc123" in out and f"--model {target}" in out
    download_module.main(["Qwen/Qwen3-4B", "--to", str(target)])  # again: resumes into the same folder
    assert calls[-1]["revision"] is None


def test_download_arguments_are_checked(calls, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        download_module.main(["Qwen/Qwen3-4B"])  # --to is required
    assert exit_info.value.code == 2 and "--to" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        download_module.main(["Qwen/Qwen3-4B", "--to", str(a_file)])
    assert exit_info.value.code == 2 and "is a file; give a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        download_module.main([str(tmp_path), "--to", str(tmp_path / "copy")])  # a local folder, not a hub id
    assert "is already a local path" in capsys.readouterr().err
    assert calls == []


def _hub_error(cls, message: str) -> Exception:
    """One of the hub client's exceptions without an HTTP response (their constructors want one)."""
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


@pytest.mark.parametrize("raised,expected", [
    (lambda: _hub_error(errors.RepositoryNotFoundError, "404 Client Error.\n\nRepository Not Found"),
     "no model 'Qwen/Qwen3-4B' on the Hugging Face hub"),
    (lambda: _hub_error(errors.GatedRepoError, "403 Client Error.\n\nCannot access gated repo"),
     "is gated: accept its terms"),
    (lambda: _hub_error(errors.RevisionNotFoundError, "404 Client Error.\n\nRevision Not Found"),
     "has no revision 'v9'"),
    (lambda: errors.LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub"),
     "cannot reach the Hugging Face hub to download Qwen/Qwen3-4B at revision v9"),
    (lambda: errors.OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled"),
     "run this on a machine with network"),
    (lambda: PermissionError(13, "Permission denied"), "could not write Qwen/Qwen3-4B at revision v9 into"),
])
def test_download_failures_are_one_line(monkeypatch, tmp_path, capsys, raised, expected):
    def failing(repo_id, **kwargs):
        raise raised()

    monkeypatch.setattr(hub, "snapshot_download", failing)
    with pytest.raises(SystemExit) as exit_info:
        download_module.main(["Qwen/Qwen3-4B", "--to", str(tmp_path / "m"), "--revision", "v9"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_download_says_when_offline_mode_is_the_cause(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kwargs: (_ for _ in ()).throw(
        errors.LocalEntryNotFoundError("no cached files")))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set: unset it"):
        download_module.download("Qwen/Qwen3-4B", tmp_path / "m")


def test_download_keeps_the_traceback_of_a_bug(monkeypatch, tmp_path):
    """Only what a user can fix becomes one line; anything else is a bug and keeps its traceback."""
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        download_module.download("Qwen/Qwen3-4B", tmp_path / "m")


def test_download_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "utils.llm.download", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--to DIR" in result.stdout and "--revision" in result.stdout
