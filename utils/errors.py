"""Errors a user can cause, and how entry points report them.

A ``UserError`` is something the person at the keyboard can fix (a wrong env name, a run folder that
belongs to another config, a missing file). Entry points print its one-line message and exit with
status 2 instead of showing a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(ValueError):
    """A mistake in the input that the message explains how to fix."""


def exit_on_user_error(main: F) -> F:
    """Wrap an entry point so a ``UserError`` ends the program with one clear line."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
