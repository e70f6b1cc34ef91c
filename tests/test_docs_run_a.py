"""Every documented command of these pages runs, under the rules of docs/README.md ("How the docs are tested").

The pages are split over tests/test_docs_run_a.py and tests/test_docs_run_b.py so that
`pytest -n 2 --dist loadfile` runs the halves side by side; a page's commands run in order in one folder.
Both carry the ``docs`` marker (tests/conftest.py): CI leaves them out, the front pages' commands
(tests/test_docs_run_front.py) stay in it.
"""

from __future__ import annotations

from test_docs_run_support import artefacts, documented_command_test, pages_base, services  # noqa: F401 - fixtures

PAGES = ("docs/results.md", "docs/online_rl.md", "docs/world_models.md", "docs/tetris.md")

test_documented_command_runs = documented_command_test(PAGES)
