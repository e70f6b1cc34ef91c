"""Parse, but do not run, documented commands: ``python tests/docs_args_driver.py < commands.json``.

Reads ``[[module, argv], ...]`` on stdin and, for each, runs the module as ``__main__`` with ``argv``
until its command line has been parsed: ``tyro.cli`` (every ``parse_config`` entry point) and
``argparse``'s ``parse_args`` raise :class:`Parsed` as soon as they return, so no env is built and
nothing compiles. A flag, preset or subcommand that the module no longer accepts ends in its one-line
``error:`` and exit status 2, which is reported. Prints one JSON line per command:
``{"module", "argv", "status": "parsed" | "help" | "error", "message"}``. Run by
``tests/test_docs_commands.py`` in a subprocess, so the patches never touch the test session.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import runpy
import signal
import sys


class Parsed(BaseException):
    """Raised right after a successful parse; a BaseException so no ``except Exception`` swallows it."""


def _patch() -> None:
    import tyro

    original_cli = tyro.cli

    def cli(*args, **kwargs):
        original_cli(*args, **kwargs)
        raise Parsed

    tyro.cli = cli
    original_parse_args = argparse.ArgumentParser.parse_args

    def parse_args(self, *args, **kwargs):
        original_parse_args(self, *args, **kwargs)
        raise Parsed

    argparse.ArgumentParser.parse_args = parse_args


def _timeout(signum, frame):
    raise TimeoutError("the module did work after parsing its arguments (no parse to stop at)")


def check(module: str, argv: list[str]) -> dict:
    sys.argv = [module, *argv]
    stderr = io.StringIO()
    signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(120)
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        status, message = "error", "finished without parsing a command line"
    except Parsed:
        status, message = "parsed", ""
    except SystemExit as stop:
        status = "help" if stop.code in (0, None) else "error"
        message = stderr.getvalue().strip().splitlines()[-1:] if status == "error" else ""
        message = message[0] if message else ""
    except BaseException as error:  # noqa: BLE001 - reported, not raised: one bad line must not hide the rest
        status, message = "error", f"{type(error).__name__}: {error}"
    finally:
        signal.alarm(0)
    return {"module": module, "argv": argv, "status": status, "message": message}


def main() -> None:
    _patch()
    for module, argv in json.load(sys.stdin):
        print(json.dumps(check(module, argv)), flush=True)


if __name__ == "__main__":
    main()
