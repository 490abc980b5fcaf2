"""The README's promises stay true: the two set-up commands match what CI runs, and the recipe reference
is exactly what the schema generates (`optkit schema`)."""

import re
from pathlib import Path

from toolkit.config import schema_reference

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def _setup_commands():
    block = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", block, re.S)


def test_exactly_two_setup_commands_and_ci_runs_the_test_one():
    cmds = _setup_commands()
    assert len(cmds) == 2, cmds
    quickstart, tests = cmds
    assert "bash .ci/install.sh" in quickstart and "optkit run recipes/quickstart.yaml" in quickstart
    assert "bash .ci/install.sh dev" in tests
    ci = (REPO / ".ci" / "run").read_text()
    test_cmd = tests.split("&&")[-1].strip().replace(".venv/bin/", "")
    assert test_cmd in ci, (test_cmd, ci)


def test_recipe_reference_is_generated_from_the_schema():
    block = README.split("<!-- schema:start -->", 1)[1].split("<!-- schema:end -->", 1)[0]
    rows = [line for line in block.strip().splitlines() if line.startswith("| `")]
    assert rows == schema_reference(), "README recipe reference is stale: run `python .ci/update_readme_schema.py`"
