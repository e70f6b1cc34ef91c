"""Every command of the two front pages runs, under the rules of docs/README.md ("How the docs are tested").

These are the commands a new user types first, so they run in CI's slow half; the other pages' commands
(tests/test_docs_run_a.py and tests/test_docs_run_b.py, marker ``docs``) take 40 minutes or more on
2 cores and run by hand before a change to the docs or to an entry point's flags lands.
"""

from __future__ import annotations

import pytest
from test_docs_run_rules import page_plans
from test_docs_run_support import artefacts, page_folder, pages_base, run_plan, services  # noqa: F401 - fixtures

PAGES = ("README.md", "docs/README.md")


@pytest.mark.parametrize("plan", page_plans(PAGES))
def test_documented_command_runs(plan, artefacts, services, pages_base):  # noqa: F811 - fixtures
    run_plan(plan, page_folder(pages_base, plan.command.page), artefacts, services)
