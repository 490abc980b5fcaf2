"""Shift guard, model selection against baselines, distance-weighted kNN and the embedding cache (issue 15)."""

import json

import numpy as np
import pytest

from toolkit.errors import OptkitError
from toolkit.io import read_jsonl
from toolkit.route import Router
from toolkit.route.shift import conformal_threshold, knn_distance

from .conftest import GSM8K


def _unit(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def test_embedding_cache_encodes_each_text_once(tmp_path):
    from toolkit.route.embcache import cached_embed

    calls = []

    def encode(texts):
        calls.append(list(texts))
        return _unit(np.array([[len(t), t.count("a") + 1.0] for t in texts]))

    a = cached_embed(["aa", "b", "aa"], encode, "e", "r1", 128, root=tmp_path)
    b = cached_embed(["b", "aa", "ccc"], encode, "e", "r1", 128, root=tmp_path)
    assert calls == [["aa", "b"], ["ccc"]]  # duplicates and cached texts are not re-encoded
    np.testing.assert_array_equal(a[0], b[1])
    cached_embed(["b"], encode, "e", "r2", 128, root=tmp_path)  # another revision: another key
    assert calls[-1] == ["b"]


def test_conformal_threshold_flags_about_alpha_in_distribution():
    rng = np.random.default_rng(0)
    assert conformal_threshold(np.arange(50.0), 0.01) is None  # n + 1 < 1 / alpha: cannot flag at that level
    rates = []
    for _ in range(200):
        held, fresh = rng.normal(size=300), rng.normal(size=2000)
        rates.append(np.mean(fresh > conformal_threshold(held, 0.05)))
    assert 0.035 < np.mean(rates) <= 0.05 + 0.004  # conformal: <= alpha on average, and not far below


def test_knn_distance_separates_far_prompts():
    rng = np.random.default_rng(1)
    keys = _unit(rng.normal(size=(200, 8)) + np.array([4.0] + [0] * 7))
    near = _unit(rng.normal(size=(20, 8)) + np.array([4.0] + [0] * 7))
    far = _unit(rng.normal(size=(20, 8)) - np.array([4.0] + [0] * 7))
    assert knn_distance(far, keys, 5).min() > knn_distance(near, keys, 5).max()


def test_distance_weighted_knn_scores_are_continuous():
    from toolkit.route.routers.knn import predict as _predict_knn

    rng = np.random.default_rng(2)
    keys, q = _unit(rng.normal(size=(300, 16))), _unit(rng.normal(size=(400, 16)))
    values = rng.integers(0, 2, size=(300, 2)).astype(np.float32)
    w = {"keys": keys, "values": values, "k": np.array([10])}
    uniform = _predict_knn(w, q, q)
    weighted = _predict_knn({**w, "weighting": "distance"}, q, q)
    assert len(np.unique(uniform[:, 0])) <= 11  # steps of 1/k
    assert len(np.unique(weighted[:, 0])) > 300
    assert np.all((weighted >= 0) & (weighted <= 1))
    # continuity: a tiny move of the query moves the prediction a little
    moved = _predict_knn({**w, "weighting": "distance"}, _unit(q + 1e-4), _unit(q + 1e-4))
    assert np.abs(moved - weighted).max() < 0.05


def _select(x, S, **over):
    from toolkit.config import RouteConfig
    from toolkit.route.select import cross_validate

    cfg = RouteConfig(**over)
    return cross_validate(x, x[:, :-10], S, np.array([0.0, 1.0]), 1, cfg, 0)


def test_selection_exports_the_length_baseline_when_only_length_matters():
    """Labels where the strong model helps exactly on long prompts, embeddings that are noise: no learned
    model can beat the length baseline, and the selection says so."""
    from toolkit.route.runtime import text_features

    rng = np.random.default_rng(3)
    prompts = ["word " * int(n) for n in rng.integers(1, 200, size=300)]
    long = np.array([len(p) > 500 for p in prompts])
    S = np.stack([np.where(long, rng.random(300) < 0.2, rng.random(300) < 0.8),
                  rng.random(300) < 0.85], axis=1).astype(float)
    x = np.concatenate([rng.normal(size=(300, 16)), text_features(prompts)], axis=1).astype(np.float32)
    x = (x - x.mean(0)) / np.where(x.std(0) > 1e-6, x.std(0), 1)
    out = _select(x, S, select=["knn", "length", "constant"])
    assert out["chosen"] == "length", out["reason"]
    assert "baseline is exported" in out["reason"] and out["cv"]["length"]["apgr"] > out["cv"]["constant"]["apgr"]


def test_route_run_reports_selection_and_shift(mmlu_run):
    route_dir, outcomes = mmlu_run
    report = json.loads((route_dir / "report.json").read_text())
    spec = json.loads((route_dir / "router.json").read_text())
    sel = report["selection"]
    assert spec["model"] == sel["chosen"] == report["router"]["model"]
    assert set(sel["cv"]) >= {"logreg", "length", "constant"} and sel["reason"]
    assert sel["cv"][sel["chosen"]]["apgr"] == max(v["apgr"] for v in sel["cv"].values())
    sh = report["shift"]
    assert spec["shift"]["alpha"] == 0.02 and spec["shift"]["text_threshold"] is not None and spec["shift"]["n_calibration"] == spec["labels"]["n"]["cal"]
    assert sh["in_domain"]["flagged"] <= 0.07  # alpha = 2%: a few of the ~110 test prompts at most
    shifted = sh["shifted"]
    assert shifted["n"] == 120 and shifted["flagged"] >= 0.8  # GSM8K word problems are far from MMLU
    assert shifted["with_guard"]["strong_fraction"] >= max(shifted["flagged"], shifted["without_guard"]["strong_fraction"])
    assert shifted["with_guard"]["quality_ratio"] >= shifted["without_guard"]["quality_ratio"]
    assert outcomes[-1].metrics["shift_flagged_eval"] == shifted["flagged"]
    # the headline test figures are what the runtime routes: the guard's in-domain escalations included
    guarded, m = sh["in_domain"]["with_guard"], outcomes[-1].metrics
    assert sh["action"] == "strong" and report["at_threshold"]["with_shift_guard"] == guarded
    assert (m["test_cost"], m["test_strong_fraction"]) == (guarded["cost"], guarded["strong_fraction"])
    assert m["test_cost_without_guard"] == report["at_threshold"]["cost"] <= m["test_cost"]


def test_loaded_router_guard_and_reasons(mmlu_run):
    route_dir, _ = mmlu_run
    router = Router.load(route_dir)
    gsm = [r["question"] for r in read_jsonl(GSM8K)][:20]
    labels = read_jsonl(route_dir / "labels.jsonl")
    cal = [r["prompt"] for r in labels if r["part"] == "cal"][:20]
    out = router.route_batch(gsm + cal, explain=True)
    flagged = [m for m, why in out[:20] if why.startswith("shift:")]
    assert len(flagged) >= 15 and set(flagged) == {router.strong}
    assert all(why.startswith("score") for _, why in out[20:])  # calibration prompts lie within the threshold
    assert router.route(gsm[0]) == router.strong
    # the gateway's hook
    assert router.shift_guard.check(gsm[0]) == "teacher"
    assert router.shift_guard.check(cal[0], router.embed([cal[0]])[0]) is None


def test_router_json_shift_tensor_is_checked(mmlu_run, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    route_dir, _ = mmlu_run
    for name in ("router.json", "router.safetensors"):
        shutil.copy(route_dir / name, tmp_path / name)
    w = load_file(str(tmp_path / "router.safetensors"))
    w["shift.keys"] = w["shift.keys"][:, :100].copy()
    save_file(w, str(tmp_path / "router.safetensors"))
    with pytest.raises(OptkitError, match=r"shift\.keys"):
        Router.load(tmp_path)


def test_selection_still_ranks_when_the_weak_model_is_as_good_on_average():
    """The weak model is right on half the prompts (feature 0 above its median), the strong one on the other half: equal mean
    quality, so APGR is undefined (null), but routing on feature 0 is worth everything. The selection ranks by the
    cross-validated area above always-weak and exports the learned model over the constant baseline."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    weak_right = x[:, 0] > np.median(x[:, 0])  # exactly 150 each
    S = np.stack([weak_right, ~weak_right], axis=1).astype(float)
    out = _select(np.concatenate([x, np.zeros((300, 10), np.float32)], axis=1), S, select=["logreg", "constant"],
                  text_features=False)
    assert out["chosen"] == "logreg", out["reason"]
    assert out["cv"]["logreg"]["apgr"] is None and out["cv"]["logreg"]["area"] > out["cv"]["constant"]["area"]
    assert "APGR undefined" in out["reason"]
