"""The route stage with N = 3 models (issue 5: labels "for N models, not only two").

Labels: the shipped real MMLU prompts with their two REAL correctness columns (Mixtral-8x7B, GPT-4), plus a
THIRD, SYNTHETIC column for a hypothetical tiny model: correct exactly where Mixtral is correct AND the prompt
is no longer than the median prompt (a cheap model that only copes with short questions). It is derived
deterministically from the real data, so the test is reproducible; it is not a measurement of any real model.
"""

import json
import os
import shutil

import numpy as np
import pytest

from toolkit.config import load_recipe
from toolkit.errors import OptkitError
from toolkit.io import read_jsonl, write_jsonl
from toolkit.pipeline import run_pipeline
from toolkit.route import Router

from .conftest import EXTRACT, file_recipe

SCORES = {"tiny": "tiny_correct", "mixtral_8x7b": "mixtral_8x7b_correct", "gpt4_1106": "gpt4_1106_correct"}
COSTS = {"tiny": 0.01, "mixtral_8x7b": 0.3, "gpt4_1106": 1.0}
# route.model -> the goal it is calibrated for (both goal kinds get an N-model check)
GOALS = {"mf": {"min_quality": 0.9}, "logreg": {"max_strong_fraction": 0.3}}
MAX_SEQ = 128  # shorter than the default truncation: half the embedding time, same code path


class MemoEmbedder:
    """The real MiniLM, encoding each distinct prompt once: both routers and their reloads route the same
    450 prompts, and re-embedding them four times would dominate the test's time."""

    def __init__(self):
        from toolkit.models import load_embedder

        self.model = load_embedder("minilm-l6")
        self.model.max_seq_length = MAX_SEQ
        self.memo = {}

    def encode(self, texts, **kw):
        new = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if new:
            self.memo.update(zip(new, self.model.encode(new, **kw)))
        return np.stack([self.memo[t] for t in texts])


def three_model_labels(path):
    rows = read_jsonl(EXTRACT)
    median = float(np.median([len(r["prompt"]) for r in rows]))
    for r in rows:  # synthetic third model: see the module docstring
        r["tiny_correct"] = bool(r["mixtral_8x7b_correct"] and len(r["prompt"]) <= median)
    write_jsonl(path, rows)
    return rows


def _run(tmp, model):
    recipe = file_recipe(tmp, name="route_n3", model=model, target=GOALS[model],
                         labels={"source": "file", "path": str(tmp / "labels3.jsonl"), "score_columns": SCORES},
                         costs=COSTS, bootstrap=50, max_seq_length=MAX_SEQ, select=[])  # this model, no selection
    outcomes = run_pipeline(load_recipe(recipe))
    assert outcomes[-1].status == "ran"
    # the same run dir for both models (the second reuses the cached embeddings); keep each router apart
    keep = tmp / f"router_{model}"
    shutil.copytree(tmp / "artifacts" / "route_n3" / "route", keep, ignore=shutil.ignore_patterns("work"))
    return keep


@pytest.fixture(scope="module")
def n3_runs(tmp_path_factory):
    """{model: route dir} of real runs (MiniLM embeddings) on the 3-model labels; MLflow in a private sqlite."""
    tmp = tmp_path_factory.mktemp("route_n3")
    three_model_labels(tmp / "labels3.jsonl")
    old, saved = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(tmp)
    try:
        return {m: _run(tmp, m) for m in GOALS}
    finally:
        os.chdir(old)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="module")
def embedder():
    return MemoEmbedder()


@pytest.mark.parametrize("model", list(GOALS))
def test_three_model_router(n3_runs, embedder, model):
    route_dir = n3_runs[model]
    spec = json.loads((route_dir / "router.json").read_text())
    assert spec["models"] == list(SCORES) and spec["strong"] == "gpt4_1106" and spec["model"] == model
    assert set(spec["costs"]) == set(SCORES)

    assert spec["features"]["max_seq_length"] == MAX_SEQ  # what MemoEmbedder reproduces
    router = Router.load(route_dir, embedder=embedder)
    assert router.models == list(SCORES)
    rows = read_jsonl(route_dir / "labels.jsonl")
    prompts = [r["prompt"] for r in rows]
    names = router.route_batch(prompts)
    assert set(names) <= set(SCORES)
    assert len(set(names)) >= 2, f"{model}: every prompt went to {names[0]}"
    assert "tiny" in names, f"{model}: the cheapest model gets no traffic"

    # cost ordering: a huge threshold prices every call out but the cheapest; a very negative one favours cost
    assert set(router.route_batch(prompts[:40], threshold=1e6)) == {"tiny"}
    assert set(router.route_batch(prompts[:40], threshold=-1e6)) == {"gpt4_1106"}

    # the goal holds on the calibration prompts, at the shipped threshold, as the stage recorded it
    cal = [(r, n) for r, n in zip(rows, names) if r["part"] == "cal"]
    assert len(cal) == spec["calibration"]["n"]
    q_routed = np.mean([r["scores"][n] for r, n in cal])
    q_strong = np.mean([r["scores"]["gpt4_1106"] for r, _ in cal])
    strong_frac = np.mean([n == "gpt4_1106" for _, n in cal])
    assert q_routed / q_strong == pytest.approx(spec["calibration"]["quality_ratio"])
    assert strong_frac == pytest.approx(spec["calibration"]["strong_fraction"])
    goal = GOALS[model]
    if "min_quality" in goal:
        assert spec["calibration"]["lower_bound"] >= goal["min_quality"]
        assert q_routed / q_strong >= goal["min_quality"]
    else:
        assert strong_frac <= goal["max_strong_fraction"]
    # routing saves cost against always-strong
    assert spec["calibration"]["cost"] < 1.0

    # a fresh load from the files (new Router, weights and threshold re-read) routes identically
    again = Router.load(route_dir / "router.json", embedder=embedder)
    assert again.route_batch(prompts) == names
    report = json.loads((route_dir / "report.json").read_text())
    assert set(report["at_threshold"]["model_share"]) == set(SCORES)


def test_cost_table_naming_an_unknown_model(tmp_path, workdir):
    three_model_labels(tmp_path / "labels3.jsonl")
    recipe = file_recipe(tmp_path, name="route_bad_cost",
                         labels={"source": "file", "path": str(tmp_path / "labels3.jsonl"), "score_columns": SCORES},
                         costs={**COSTS, "claude": 2.0})
    with pytest.raises(OptkitError, match=r"route\.costs\.claude.*unknown model"):
        run_pipeline(load_recipe(recipe))
