"""Prompts from data: formats, template, system prompt, dedupe, ids, deterministic sample and split."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.collect.conftest import BITEXT
from pydantic import ValidationError

from toolkit.collect.prompts import load_prompts, messages_id, split_of, template_problem
from toolkit.config import DataConfig
from toolkit.errors import OptkitError


def data_cfg(**kw) -> DataConfig:
    return DataConfig(path="unused", **kw)


BITEXT_CFG = dict(prompt_column="instruction", reference_column="category", id_column="id")


def test_template_system_prompt_reference_and_ids():
    cfg = data_cfg(**BITEXT_CFG, prompt_template="Message: {instruction}\nWhich {category}?", system_prompt="Be brief.")
    prompts = load_prompts(cfg, BITEXT, seed=0)
    assert len(prompts) == 800
    p = prompts[0]
    assert p.id == "5" and p.reference == "ORDER" and p.prompt == "assistance cancelling purchase 00123842"
    assert p.messages == [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Message: assistance cancelling purchase 00123842\nWhich ORDER?"}]


def test_default_ids_hash_the_messages_and_dedupe_keeps_the_first(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = load_prompts(data_cfg(), path, seed=0)
    assert [p.prompt for p in prompts] == ["a", "b"]
    assert prompts[0].id == messages_id([{"role": "user", "content": "a"}])
    with pytest.raises(OptkitError, match="row 3: id .* repeats row 1"):
        load_prompts(data_cfg(dedupe=False), path, seed=0)


def test_csv_parquet_and_datasets_give_the_same_prompts(tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in BITEXT.read_text().splitlines()[:30]]
    rows = [{k: str(v) for k, v in r.items()} for r in rows]
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = [p.to_dict() for p in load_prompts(data_cfg(**BITEXT_CFG), tmp_path / "d.jsonl", seed=0)]
    assert len(expected) == 30
    for name in ("d.csv", "d.parquet"):
        got = [p.to_dict() for p in load_prompts(data_cfg(**BITEXT_CFG), tmp_path / name, seed=0)]
        assert got == expected, name
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    got = [p.to_dict() for p in load_prompts(data_cfg(**BITEXT_CFG, split_name="train"), tmp_path / "ds", seed=0)]
    assert got == expected
    with pytest.raises(OptkitError, match="set data.split_name"):
        load_prompts(data_cfg(**BITEXT_CFG), tmp_path / "ds", seed=0)


def test_split_is_deterministic_stable_and_near_the_fractions():
    cfg = data_cfg(**BITEXT_CFG, splits={"train": 0.6, "val": 0.2, "test": 0.2})
    a = {p.id: p.split for p in load_prompts(cfg, BITEXT, seed=0)}
    assert a == {p.id: p.split for p in load_prompts(cfg, BITEXT, seed=0)}
    counts = Counter(a.values())
    assert abs(counts["train"] / 800 - 0.6) < 0.06 and abs(counts["test"] / 800 - 0.2) < 0.05
    # A prompt's split depends only on (seed, id): dropping other rows never moves it.
    assert all(split_of(pid, 0, 0.6, 0.2) == s for pid, s in a.items())
    other_seed = {p.id: p.split for p in load_prompts(cfg, BITEXT, seed=1)}
    assert sum(a[k] != other_seed[k] for k in a) > 200


def test_limit_is_a_hash_sample_not_the_head_of_a_sorted_file():
    prompts = load_prompts(data_cfg(**BITEXT_CFG, limit=100), BITEXT, seed=0)
    assert len(prompts) == 100
    assert len({p.reference for p in prompts}) == 11  # the file is sorted by label; its head has 1-2 labels
    ids = [int(p.id) for p in prompts]
    assert ids == sorted(ids)  # file order is kept
    again = load_prompts(data_cfg(**BITEXT_CFG, limit=100), BITEXT, seed=0)
    assert [p.id for p in again] == [p.id for p in prompts]


def test_template_errors_name_the_field():
    with pytest.raises(OptkitError, match=r"column 'text' \(data.prompt_template\)"):
        load_prompts(data_cfg(**BITEXT_CFG, prompt_template="{text}"), BITEXT, seed=0)
    # what no row can fix is refused by the recipe schema itself (so `optkit validate` reports it)
    with pytest.raises(ValidationError, match="use named fields"):
        data_cfg(**BITEXT_CFG, prompt_template="{}")
    with pytest.raises(ValidationError, match="invalid format string"):
        data_cfg(**BITEXT_CFG, prompt_template="{instruction")
    # ... and by the loader, for a config built without validation
    cfg = data_cfg(**BITEXT_CFG).model_copy(update={"prompt_template": "{instruction:.2f}"})
    with pytest.raises(OptkitError, match=r"data.prompt_template: bad format spec ':.2f' in \{instruction\}"):
        load_prompts(cfg, BITEXT, seed=0)


@pytest.mark.parametrize("template", ["{a}", "{a!r} {b:>10} {{literal}}", "{a[0]}", "{a:{b}}", "{a:>>}"])
def test_templates_python_accepts_pass(template):
    assert template_problem(template) is None


@pytest.mark.parametrize("template, problem", [
    ("{a:>>>}", "bad format spec"), ("{a:.2f}", "bad format spec"), ("{a:=10}", "bad format spec"),
    ("{a!x}", "unknown conversion"), ("{0}", "named fields"), ("{}", "named fields"), ("{a", "invalid format"),
    ("}", "invalid format"),
])
def test_templates_no_row_can_fill_are_refused(template, problem):
    """template_problem agrees with Python itself: whatever it refuses, str.format refuses on string values."""
    assert problem in template_problem(template)
    with pytest.raises((ValueError, IndexError, KeyError)):
        template.format_map({"a": "x", "b": "5"})
