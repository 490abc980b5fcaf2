"""A labeled file (route.labels.source = file) is user input: damage anywhere in it is one line naming the row."""

import json

import pytest

from toolkit.config import load_recipe
from toolkit.errors import OptkitError
from toolkit.io import read_jsonl
from toolkit.route.labels import from_file

from .conftest import EXTRACT, MODELS, file_recipe


def _labels_error(tmp_path, content: bytes, name: str = "labels.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(content)
    labels = {"source": "file", "path": str(path), "score_columns": dict(MODELS)}
    recipe = load_recipe(file_recipe(tmp_path, labels=labels))
    with pytest.raises(OptkitError) as info:
        from_file(recipe.route, recipe, 0)
    assert "\n" not in str(info.value)
    return str(info.value)


def _rows(n=20):
    return read_jsonl(EXTRACT)[:n]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.mark.parametrize("column, field", [("gpt4_1106_correct", "score_columns.gpt4_1106"),
                                           ("prompt", "prompt_column")])
def test_a_later_row_without_a_column_names_row_and_field(tmp_path, column, field):
    rows = _rows()
    del rows[12][column]
    msg = _labels_error(tmp_path, _jsonl(rows))
    assert f"row 13: no column '{column}' (route.labels.{field})" in msg


def test_non_utf8_labels_name_the_line(tmp_path):
    content = _jsonl(_rows()).replace(b'"prompt": "', b'"prompt": "\xff', 1)
    assert "labels.jsonl:1: not UTF-8 text (byte 0xff" in _labels_error(tmp_path, content)


def test_a_plain_directory_is_not_a_labels_file(tmp_path):
    (tmp_path / "labels.jsonl").mkdir()
    (tmp_path / "labels.jsonl" / "x.jsonl").write_bytes(_jsonl(_rows()))
    labels = {"source": "file", "path": str(tmp_path / "labels.jsonl"), "score_columns": dict(MODELS)}
    recipe = load_recipe(file_recipe(tmp_path, labels=labels))
    with pytest.raises(OptkitError, match=r"route.labels.path is a directory but not one saved by datasets"):
        from_file(recipe.route, recipe, 0)


def test_no_held_out_prompts_is_an_error_not_a_guarantee_that_holds_everywhere():
    """With an empty test part the report said the goal held on 100% of bootstrap resamples (of nothing)."""
    import numpy as np

    from toolkit.route.labels import LabelTable, check_learnable
    from toolkit.route.metrics import bootstrap_guarantee

    parts = np.array(["fit"] * 6 + ["cal"] * 4, dtype=object)
    scores = np.array([[0.0, 1.0], [1.0, 1.0]] * 5)
    table = LabelTable([str(i) for i in range(10)], ["p"] * 10, scores, ["weak", "strong"], parts)
    with pytest.raises(OptkitError, match=r"no labeled prompts fall in the 'test' part"):
        check_learnable(table, 1)
    assert bootstrap_guarantee(np.zeros(0), np.zeros(0), 0.9, 200, 0)["holds_fraction"] is None


def test_copies_of_one_prompt_under_other_ids_share_a_part(tmp_path):
    rows = read_jsonl(EXTRACT)[:200]
    rows += [{**r, "id": f"copy-{i}-{r['id']}", "prompt": f"  {r['prompt']} "} for i, r in enumerate(rows[:60])]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(file_recipe(tmp_path, labels={"source": "file", "path": str(path),
                                                       "score_columns": dict(MODELS)}))
    table, _ = from_file(recipe.route, recipe, recipe.seed)
    part = dict(zip(table.ids, table.part))
    assert all(part[f"copy-{i}-{r['id']}"] == part[r["id"]] for i, r in enumerate(rows[:60]))
    assert {"fit", "cal", "test"} == set(table.part)
