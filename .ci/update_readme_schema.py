"""Regenerate the recipe reference in README.md from the schema (tests/spine/test_readme.py checks it)."""

import re
from pathlib import Path

from toolkit.config import schema_reference

readme = Path(__file__).resolve().parents[1] / "README.md"
table = "| key | type | default | description |\n|---|---|---|---|\n" + "\n".join(schema_reference())
text = re.sub(r"<!-- schema:start -->.*?<!-- schema:end -->",
              lambda m: f"<!-- schema:start -->\n{table}\n<!-- schema:end -->", readme.read_text(), flags=re.S)
readme.write_text(text)
print(f"updated {readme}")
