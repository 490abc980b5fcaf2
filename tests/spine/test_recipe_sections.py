"""Which shared sections a recipe needs follows from its stages: a route-only recipe (labels from a file) or a
cache-only one (pairs from a file) validates without `teacher` and `data`; a stage that reads a missing section is
refused by `optkit validate`, in one line naming the stage and the section. (The end-to-end runs of such recipes
live in tests/export/test_route_cache_only.py.)"""

from __future__ import annotations

import pytest
import yaml

from toolkit.cli import main
from toolkit.config import recipe_from_dict
from toolkit.config.recipe import missing_sections
from toolkit.errors import OptkitError

ROUTE = {"labels": {"source": "file", "path": "labels.jsonl", "score_columns": {"a": "a_ok", "b": "b_ok"}}}
TEACHER, DATA = {"model": "smollm2-135m-instruct"}, {"path": "prompts.jsonl"}


def _validate(tmp_path, capsys, recipe: dict) -> tuple[int, str]:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["validate", str(path)])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("recipe", [
    {"name": "r", "route": ROUTE},
    {"name": "r", "cache": {"pairs_path": "pairs.csv"}},
    {"name": "r", "route": ROUTE, "cache": {"pairs_path": "pairs.csv"}, "export": {}},
], ids=["route-only", "cache-only", "route+cache+export"])
def test_route_or_cache_only_recipes_need_no_teacher_or_data(tmp_path, capsys, recipe):
    code, out = _validate(tmp_path, capsys, recipe)
    assert code == 0, out
    r = recipe_from_dict(recipe)
    assert r.teacher is None and r.data is None and missing_sections(r) == []


@pytest.mark.parametrize("recipe, stage, section", [
    ({"name": "r", "data": DATA, "collect": {}}, "collect", "teacher"),
    ({"name": "r", "teacher": TEACHER, "collect": {}}, "collect", "data"),
    ({"name": "r", "teacher": TEACHER, "collect": {}, "distill": {"student": {"from_teacher": {"num_layers": 2}}}},
     "distill", "data"),
    ({"name": "r", "teacher": TEACHER, "quantize": {"model": "smollm2-135m-instruct"}}, "quantize", "data"),
    ({"name": "r", "cache": {"group_column": "intent"}}, "cache", "data"),
    ({"name": "r", "data": DATA, "collect": {"backend": "log"}, "evaluate": {}}, "evaluate", "teacher"),
])
def test_a_stage_without_the_section_it_reads_is_refused_naming_both(tmp_path, capsys, recipe, stage, section):
    code, out = _validate(tmp_path, capsys, recipe)
    assert code == 2
    line = next(ln for ln in out.splitlines() if f"{stage}: needs the '{section}' section" in ln)
    assert "r.yaml" in line  # which file
    with pytest.raises(OptkitError, match=f"{stage}: needs the '{section}' section"):
        recipe_from_dict(recipe)


def test_cache_error_points_at_pairs_path(tmp_path, capsys):
    _, out = _validate(tmp_path, capsys, {"name": "r", "cache": {}})
    assert "cache: needs the 'data' section" in out and "cache.pairs_path" in out
