"""Cascade mode: the escalation threshold's quality bound on fresh batches (synthetic triples), the runtime
file's validation, and a real route run in cascade mode (real Bitext prompts, the SmolLM2 model as the student
scoring its own answers through toolkit.engines)."""

import json
import os

import numpy as np
import pytest

from toolkit.config import RouteTargetConfig
from toolkit.errors import OptkitError
from toolkit.route.cascade import (CASCADE_JSON, CONFIDENCE_JSONL, Cascade, at_threshold, calibrate_cascade,
                                   confidence_of, escalates, token_logprobs_of)


def _triples(rng, n: int, informative: float = 3.0):
    """(confidence, scores [n, 2] = student, teacher): the student is right more often when it is confident."""
    conf = rng.normal(-1.0, 0.5, n)
    p_student = 1 / (1 + np.exp(-(informative * (conf + 1.0) + 0.5)))
    student = (rng.random(n) < p_student).astype(float)
    teacher = (rng.random(n) < 0.85).astype(float)
    return conf, np.stack([student, teacher], axis=1)


def _ratio(conf, S, threshold):
    esc = np.array([escalates(c, threshold) for c in conf])
    return np.where(esc, S[:, 1], S[:, 0]).mean() / S[:, 1].mean(), esc.mean()


def test_threshold_meets_the_bound_on_fresh_batches():
    rng = np.random.default_rng(0)
    target = RouteTargetConfig(min_quality=0.9, confidence=0.9, eval_size=400)
    met, fractions = [], []
    for _ in range(60):
        conf, S = _triples(rng, 600)
        threshold, cal = calibrate_cascade(conf, S, 1, target)
        assert cal.lower_bound >= 0.9 and 0 < cal.strong_fraction < 1
        # the file's strict "<" rule takes the same calibration decisions as the router's ">=" on -confidence
        assert np.isclose(_ratio(conf, S, threshold)[0], cal.quality_ratio)
        fresh_conf, fresh_S = _triples(rng, 400)
        ratio, frac = _ratio(fresh_conf, fresh_S, threshold)
        met.append(ratio >= 0.9)
        fractions.append(frac)
    assert np.mean(met) >= 0.85, np.mean(met)  # (c, c) guarantee: >= 0.81 in theory, conservative in practice
    assert 0.05 < np.mean(fractions) < 0.95  # it does route: neither always nor never escalating


def test_uninformative_confidence_escalates_more():
    rng = np.random.default_rng(1)
    target = RouteTargetConfig(min_quality=0.85, confidence=0.9)
    good = calibrate_cascade(*_triples(rng, 2000, informative=4.0), 1, target)[1]
    flat = calibrate_cascade(*_triples(rng, 2000, informative=0.0), 1, target)[1]
    assert good.strong_fraction < flat.strong_fraction - 0.1


def test_infeasible_goal_says_so():
    rng = np.random.default_rng(2)
    conf, S = _triples(rng, 300, informative=0.0)
    S[:, 0] = 0.0  # the student is never right: only always-escalate keeps 0.99
    with pytest.raises(OptkitError, match="infeasible"):
        calibrate_cascade(conf, S, 1, RouteTargetConfig(min_quality=0.99))


def test_max_escalation_fraction_goal():
    rng = np.random.default_rng(3)
    conf, S = _triples(rng, 500)
    threshold, cal = calibrate_cascade(conf, S, 1, RouteTargetConfig(max_strong_fraction=0.3))
    assert _ratio(conf, S, threshold)[1] <= 0.3 and cal.strong_fraction > 0.2


def test_confidence_and_reply_parsing():
    assert confidence_of([-0.5, -1.5]) == -1.0 and confidence_of([-0.5, -1.5], "min_logprob") == -1.5
    assert confidence_of([]) == float("-inf") and escalates(float("nan"), -5.0) and not escalates(-1.0, -2.0)
    chat = {"choices": [{"logprobs": {"content": [{"token": "a", "logprob": -0.25}, {"token": "b", "logprob": -1.0}]}}]}
    comp = {"choices": [{"logprobs": {"tokens": ["a", "b"], "token_logprobs": [-0.5, -0.75]}}]}
    assert token_logprobs_of(chat) == [-0.25, -1.0] and token_logprobs_of(comp) == [-0.5, -0.75]
    assert token_logprobs_of({"choices": [{"logprobs": None}]}) is None and token_logprobs_of({}) is None


def test_cascade_file_is_validated(tmp_path):
    good = {"format": "optkit-cascade/1", "confidence": "mean_logprob", "threshold": -1.25, "weak": "student",
            "strong": "teacher"}
    (tmp_path / CASCADE_JSON).write_text(json.dumps(good))
    c = Cascade.load(tmp_path)
    assert c.decide([-2.0, -1.0]) == (-1.5, True) and c.decide([-0.1]) == (-0.1, False)
    for bad in ({**good, "threshold": None}, {**good, "confidence": "vibes"}, {**good, "format": "x"},
                {**good, "weak": 3}, [1, 2]):
        (tmp_path / CASCADE_JSON).write_text(json.dumps(bad))
        with pytest.raises(OptkitError):
            Cascade.load(tmp_path)
    (tmp_path / CASCADE_JSON).write_text('{"format": "optkit-cascade/1", "threshold": NaN}')
    with pytest.raises(OptkitError, match="strict JSON"):
        Cascade.load(tmp_path)


def test_route_stage_in_cascade_mode(tmp_path, monkeypatch, smollm2_dir):
    """A real route run in cascade mode: the SmolLM2 checkpoint stands in for the distilled student and scores
    its (test-made) answers; cascade.json must be loadable and agree with the confidences and labels it wrote."""
    from tests.route.test_pipeline_labels import _fake_upstream, _recipe
    from toolkit.config import load_recipe
    from toolkit.io import read_jsonl
    from toolkit.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "artifacts/pipe"
    _fake_upstream(run, n=200)
    os.symlink(smollm2_dir, run / "distill/model")
    outcomes = run_pipeline(load_recipe(_recipe(tmp_path, mode="cascade", target={"max_strong_fraction": 0.4})),
                            only="route")
    assert outcomes[-1].status == "ran"
    route_dir = run / "route"
    cascade = Cascade.load(route_dir)
    report = json.loads((route_dir / "report.json").read_text())["cascade"]
    assert cascade.threshold == report["threshold"] and cascade.weak == "student" and cascade.strong == "teacher"
    conf = {r["id"]: r["confidence"] for r in read_jsonl(route_dir / CONFIDENCE_JSONL)}
    labels = [r for r in read_jsonl(route_dir / "labels.jsonl") if r["part"] in ("cal", "test")]
    assert {r["id"] for r in labels} == set(conf) and all(v is not None and v < 0 for v in conf.values())
    assert len(set(conf.values())) > len(conf) // 2  # real, varied log-probs, not a constant
    for part in ("cal", "test"):
        rows = [r for r in labels if r["part"] == part]
        c = np.array([conf[r["id"]] for r in rows])
        S = np.array([[r["scores"]["student"], r["scores"]["teacher"]] for r in rows])
        got = at_threshold(c, S, 1, cascade.threshold, {"student": 0.0, "teacher": 1.0}, ["student", "teacher"])
        want = report["calibration" if part == "cal" else "test"]
        assert got["escalation_fraction"] == pytest.approx(want["escalation_fraction"])
        assert got["quality_ratio"] == pytest.approx(want["quality_ratio"])
    assert report["calibration"]["escalation_fraction"] <= 0.4 and "router_test" in report


def test_evaluate_replays_the_cascade():
    """evaluate's replay in cascade mode (no cache, no router): the student always answers; the teacher too
    where the route stage's confidence is below the threshold or missing; cost and latency add up there."""
    from types import SimpleNamespace

    from toolkit.evaluate.system import replay

    rng = np.random.default_rng(4)
    n = 40
    ids = [f"p{i}" for i in range(n)]
    conf = {i: float(c) for i, c in zip(ids, rng.normal(-1.0, 0.5, n))}
    del conf["p7"]  # no confidence: escalates
    refs = {i: str(rng.choice(["REFUND", "ORDER"])) for i in ids}
    records = [{"id": i, "prompt": f"question {i}", "output": refs[i], "reference": refs[i]} for i in ids]
    answers = {"student": {i: {"output": "ORDER", "input_tokens": 5, "output_tokens": 1} for i in ids},
               "teacher": {i: {"output": refs[i], "input_tokens": 5, "output_tokens": 1} for i in ids}}
    rows = {"student": {"e2e_mean_s": 0.1}, "teacher": {"e2e_mean_s": 1.0, "ttft_mean_s": 0.4}}
    price = {"student": 0.001, "teacher": 0.01}
    ctx = SimpleNamespace(config=SimpleNamespace(system=SimpleNamespace(exact_cache=False, student="student",
                                                                        semantic_cache=False)),
                          recipe=SimpleNamespace(route=None, cache=None), has_upstream=lambda stage: False)
    cascade = Cascade({"format": "optkit-cascade/1", "confidence": "mean_logprob", "threshold": -1.0,
                       "weak": "student", "strong": "teacher"})
    row, log = replay(ctx, records, [], answers, rows, lambda name, r: price[name], 0.0, "gold",
                      ["ORDER", "REFUND"], cascade=cascade, confidence=conf)
    want = [i not in conf or conf[i] < -1.0 for i in ids]
    assert [r["served_by"] == "teacher-escalated" for r in log] == want and 0 < sum(want) < n
    for r, esc in zip(log, want):
        assert r["cost_usd"] == pytest.approx(0.011 if esc else 0.001)
        assert r["e2e_s"] - r["overhead_s"] == pytest.approx(1.1 if esc else 0.1)
        assert r["output"] == (refs[r["id"]] if esc else "ORDER")
    assert row["variant"] == "system-cascade" and row["escalation_fraction"] == pytest.approx(np.mean(want))
    assert row["quality"] == pytest.approx(np.mean([1.0 if e else float(refs[i] == "ORDER") for i, e in zip(ids, want)]))


def test_export_ships_the_cascade_file(tmp_path):
    from toolkit.export.build import Part, copy_part

    src = tmp_path / "route"
    src.mkdir()
    for name in ("router.json", "router.safetensors", "report.json", CASCADE_JSON, CONFIDENCE_JSONL):
        (src / name).write_text("{}")
    copy_part(Part("router", "router", src, "route"), tmp_path / "bundle")
    shipped = sorted(p.name for p in (tmp_path / "bundle/route").iterdir())
    assert shipped == sorted(["router.json", "router.safetensors", CASCADE_JSON])  # runtime files only


def test_evaluate_and_export_in_cascade_mode(tmp_path_factory, smollm2_dir):
    """The shared small real run (tests/evaluate/fakerun.py) with the route stage's cascade files added: evaluate
    reports the cascade row beside the router's system row, and export ships cascade.json in the bundle."""
    from tests.evaluate import fakerun
    from toolkit.bundle import Bundle
    from toolkit.config import recipe_from_dict
    from toolkit.io import read_jsonl, write_jsonl
    from toolkit.pipeline import run_pipeline
    from toolkit.route.labels import hash_unit

    root = tmp_path_factory.mktemp("cascade_eval")
    run = fakerun.copy_run(fakerun.built(tmp_path_factory, smollm2_dir), root)
    test_ids = [r["id"] for r in read_jsonl(run / "collect/outputs.jsonl") if r["split"] == "test"]
    conf = {i: -3 * hash_unit(i, 5) for i in test_ids[1:]}  # the first has none: it must escalate
    threshold = float(np.median(list(conf.values())))
    write_jsonl(run / "route" / CONFIDENCE_JSONL, [{"id": i, "part": "test", "confidence": c} for i, c in conf.items()])
    (run / "route" / CASCADE_JSON).write_text(json.dumps({
        "format": "optkit-cascade/1", "confidence": "mean_logprob", "threshold": threshold, "weak": "student",
        "strong": "teacher"}))
    recipe = recipe_from_dict(fakerun.recipe_dict(root, evaluate=fakerun.EVALUATE))
    (outcome,) = run_pipeline(recipe, only="evaluate")
    assert outcome.status == "ran"
    rows = {r["variant"]: r for r in json.loads((run / "evaluate/variants.json").read_text())}
    assert {"system", "system-cascade"} <= set(rows)
    log = read_jsonl(run / "evaluate/outputs/system-cascade.jsonl")
    misses = [r for r in log if r["served_by"] not in ("exact", "semantic")]
    assert misses and all((r["served_by"] == "teacher-escalated") == (conf.get(r["id"], -1e9) < threshold)
                          for r in misses)
    assert rows["system-cascade"]["escalation_fraction"] == pytest.approx(
        sum(r["served_by"] == "teacher-escalated" for r in log) / len(log))
    assert "system-cascade" in (run / "evaluate/report.md").read_text()
    (outcome,) = run_pipeline(recipe_from_dict(fakerun.recipe_dict(root, evaluate=fakerun.EVALUATE, export={})),
                              only="export")
    bundle = Bundle.open(next(p for p in (run / "export").iterdir() if (p / "manifest.json").is_file()))
    assert bundle.manifest["cascade"] == "route/cascade.json"
    assert Cascade.load(bundle.path(bundle.manifest["cascade"])).threshold == threshold
