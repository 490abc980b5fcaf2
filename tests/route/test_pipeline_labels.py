"""Labels from the pipeline itself: teacher records (collect) + the student's generations (distill).

The collect and distill outputs here are built by the test (the real stages need minutes of LLM time): real
Bitext messages and gold categories, with a teacher that is right on 90% of prompts and a student that only
knows six of the eleven categories. The route stage, embedder and router are the real ones.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from toolkit.config import load_recipe
from toolkit.io import atomic_write_json, read_jsonl, write_jsonl
from toolkit.pipeline import run_pipeline
from toolkit.route import Router
from toolkit.route.labels import from_pipeline, hash_unit

ROOT = Path(__file__).resolve().parents[2]
BITEXT = ROOT / "recipes/data/bitext/bitext_cs_quickstart.jsonl"
KNOWN = {"ACCOUNT", "ORDER", "REFUND", "DELIVERY", "SHIPPING_ADDRESS", "CONTACT"}


def _fake_upstream(run_dir: Path, n: int = 500) -> list[dict]:
    rows = read_jsonl(BITEXT)
    rows = sorted(rows, key=lambda r: hash_unit(str(r["id"]), 7))[:n]
    records, student = [], []
    for i, r in enumerate(rows):
        split = "val" if hash_unit(str(r["id"]), 8) < 0.5 else "test"
        teacher = f"The category is {r['category']}." if i % 10 else "The category is FEEDBACK."
        records.append({"id": str(r["id"]), "split": split, "messages": [{"role": "user", "content": r["instruction"]}],
                        "prompt": r["instruction"], "reference": r["category"], "output": teacher,
                        "finish_reason": "stop", "input_tokens": 40, "output_tokens": 6, "latency_s": 0.1,
                        "cost_usd": 0.0, "model": "smollm2-135m-instruct"})
        said = r["category"] if r["category"] in KNOWN else "ACCOUNT"
        student.append({"id": str(r["id"]), "split": split, "output": f"{said}", "output_tokens": 2, "latency_s": 0.05})
    records.append({**records[0], "id": "train-only", "split": "train"})  # train prompts have no student output
    for stage, name, data in (("collect", "outputs.jsonl", records), ("distill", "student_outputs.jsonl", student)):
        write_jsonl(run_dir / stage / name, data)
        atomic_write_json(run_dir / stage / "manifest.json", {"stage": stage, "status": "done", "config_hash": "t",
                                                              "outputs": {}, "upstream": {}})
    return records


def _recipe(tmp: Path, **route) -> Path:
    section = {"labels": {"source": "pipeline", "metric": "gold"}, "target": {"max_strong_fraction": 0.5},
               "calibration": 0.4, "bootstrap": 0, **route}
    recipe = {"name": "pipe", "teacher": {"model": "smollm2-135m-instruct"},
              "data": {"path": str(BITEXT), "id_column": "id", "prompt_column": "instruction",
                       "reference_column": "category"},
              "collect": {"backend": "hf"}, "distill": {"student": {"from_teacher": {"num_layers": 10}}},
              "route": section}
    path = tmp / "pipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_gold_labels_and_gap(tmp_path):
    from toolkit.config import RouteConfig

    records = _fake_upstream(tmp_path / "run")
    table = from_pipeline(RouteConfig(), tmp_path / "run/collect", tmp_path / "run/distill", seed=0)
    assert table.models == ["student", "teacher"]
    assert len(table.ids) == len(records) - 1  # the train-only record has no student output
    by_id = {r["id"]: r for r in records}
    for i, rid in enumerate(table.ids):
        cat = by_id[rid]["reference"]
        student_right = cat in KNOWN
        teacher_right = not by_id[rid]["output"].endswith("FEEDBACK.") or cat == "FEEDBACK"
        assert table.scores[i].tolist() == [float(student_right), float(teacher_right)]
        assert table.extra["gap"][i] == float(teacher_right) - float(student_right)
        assert table.extra["student_suffices"][i] == (student_right >= teacher_right)
    assert set(table.part[[by_id[r]["split"] == "test" for r in table.ids]]) == {"test"}


def test_agreement_labels(tmp_path):
    from toolkit.config import RouteConfig

    _fake_upstream(tmp_path / "run", n=60)
    cfg = RouteConfig(labels={"metric": "agreement_f1"})
    table = from_pipeline(cfg, tmp_path / "run/collect", tmp_path / "run/distill", seed=0)
    assert np.all(table.scores[:, 1] == 1.0)  # the teacher agrees with itself
    # "REFUND" vs "The category is REFUND." (articles dropped: 3 tokens): F1 = 2 * (1 * 1/3) / (1 + 1/3) = 0.5;
    # a wrong category shares no token: 0
    assert set(np.round(table.scores[:, 0], 6)) == {0.0, 0.5}


def test_route_stage_on_a_pipeline_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fake_upstream(tmp_path / "artifacts/pipe")
    outcomes = run_pipeline(load_recipe(_recipe(tmp_path)), only="route")
    assert outcomes[-1].status == "ran"
    route_dir = tmp_path / "artifacts/pipe/route"
    report = json.loads((route_dir / "report.json").read_text())
    assert report["models"] == ["student", "teacher"] and report["strong"] == "teacher"
    # categories are easy to tell apart from the message: the router finds the ones the student lacks
    assert report["router"]["apgr"] > 0.8
    assert report["beats_baselines"]["random"] and report["beats_baselines"]["length"]
    assert report["at_threshold"]["strong_fraction"] <= 0.6
    router = Router.load(route_dir)
    assert router.route("I want a refund for my order, how do I get my money back?") == "student"
    assert router.route("please unsubscribe me from the newsletter emails") == "teacher"
    rows = read_jsonl(route_dir / "labels.jsonl")
    assert {"student_suffices", "gap", "scores", "part"} <= set(rows[0])


def test_pipeline_labels_need_the_distill_outputs(tmp_path, monkeypatch):
    from toolkit.errors import OptkitError

    monkeypatch.chdir(tmp_path)
    _fake_upstream(tmp_path / "artifacts/pipe", n=40)
    (tmp_path / "artifacts/pipe/distill/student_outputs.jsonl").unlink()
    with pytest.raises(OptkitError, match="student_outputs.jsonl is missing"):
        run_pipeline(load_recipe(_recipe(tmp_path)), only="route")
