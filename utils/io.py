"""Small file helpers: every write that must survive a crash goes through a temp file and a rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from utils.errors import UserError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` so that readers see either the old file or the whole new one, never half."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Binary variant of ``atomic_write_text`` (e.g. a serialised PyTorch checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_write_yaml(path: str | Path, data: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=True))


def _json_default(value: Any):
    """numpy scalars and arrays appear in metrics; write them as plain numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file. A last line that is not valid JSON is dropped: it is what a process
    killed mid-write leaves (appends are not atomic), and everything before it is intact. A bad line
    anywhere else means the file was damaged some other way, a ``UserError`` naming the line."""
    with open(path) as f:
        lines = [(number, line.strip()) for number, line in enumerate(f, 1) if line.strip()]
    rows = []
    for index, (number, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if index == len(lines) - 1:
                break
            raise UserError(f"{path}, line {number}: not JSON ({error.msg}); fix or delete that line") from None
    return rows


def output_path_problem(path: str | Path, kind: str = "file") -> str | None:
    """Why ``path`` cannot be written as a ``kind`` ("file" or "dir"), or None if it can.

    Checked before any work starts, so a typo in an output flag costs a second, not a training run:
    the path must not be the other kind, no folder above it may be a file, and the nearest folder
    that exists must be writable (the rest is created). Writable is tried, not only asked: root passes
    every ``os.access`` test, yet cannot create anything in /proc or on a full or read-only mount, so an
    empty entry is made and removed again in the folder that would receive the new one."""
    path = Path(path)
    if path.exists():
        if kind == "dir" and not path.is_dir():
            return f"{path} is a file, not a folder"
        if kind == "file" and path.is_dir():
            return f"{path} is a folder, not a file"
        if not os.access(path, os.W_OK):
            return f"{path} is not writable"
        return _creation_problem(path, path) if kind == "dir" else None
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                return f"{parent} is a file, so {path} cannot be created under it"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{parent} is not writable, so {path} cannot be created"
            return _creation_problem(parent, path)
    return None


def _creation_problem(folder: Path, path: Path) -> str | None:
    """Why nothing can be created in ``folder`` (on the way to ``path``), found by creating an empty
    folder there and removing it; None if that worked."""
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".craftax-write-check-"))
    except OSError as error:
        where = f"{path} cannot be created" if folder != path else f"{path} cannot be written"
        return f"{where}: nothing can be created in {folder} ({error.strerror or error})"
    return None


def check_output_path(path: str | Path | None, flag: str, kind: str = "file") -> None:
    """Raise a ``UserError`` naming ``flag`` if ``path`` cannot be written (see ``output_path_problem``)."""
    if path is None or str(path) == "":
        return
    problem = output_path_problem(path, kind)
    if problem:
        raise UserError(f"{flag}: {problem}; pass a different {flag}")
