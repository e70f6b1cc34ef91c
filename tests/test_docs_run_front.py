"""Every command of the two front pages runs, under the rules of docs/README.md ("How the docs are tested").

These are the commands a new user types first, so they run in CI's slow half; the other pages' commands
(tests/test_docs_run_a.py and tests/test_docs_run_b.py, marker ``docs``) take 40 minutes or more on
2 cores and run by hand before a change to the docs or to an entry point's flags lands.
"""

from __future__ import annotations

from test_docs_run_support import artefacts, documented_command_test, pages_base, services  # noqa: F401 - fixtures

PAGES = ("README.md", "docs/README.md")

test_documented_command_runs = documented_command_test(PAGES)
