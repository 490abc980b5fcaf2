"""Per-cluster thresholds in a world where one global threshold must be wrong for someone: two regions of
embedding space, one where reusable and non-reusable pairs separate at low similarity, one where they only
separate high up. One threshold has to sit high for the hard region and loses the easy region's hits."""

import numpy as np

from toolkit.cache import adaptive, tune


def world(n, rng):
    region = rng.random(n) < 0.5  # True = easy region
    y = (rng.random(n) < 0.5).astype(int)
    pos = np.where(region, rng.normal(0.70, 0.05, n), rng.normal(0.88, 0.03, n))
    neg = np.where(region, rng.normal(0.45, 0.05, n), rng.normal(0.75, 0.04, n))
    sims = np.where(y == 1, pos, neg)
    centers = np.eye(8)[np.where(region, 0, 1)]
    vecs = centers + 0.05 * rng.standard_normal((n, 8))
    return sims, y, vecs


def test_per_cluster_thresholds_serve_more_at_the_same_bound():
    rng = np.random.default_rng(3)
    sims, y, vecs = world(6000, rng)
    cal = rng.random(6000) < 0.7
    held = ~cal
    glob = tune.select(sims[cal], y[cal], 0.05, 0.95)
    res = adaptive.calibrate(sims[cal], y[cal], vecs[cal], 0.05, 0.95, k=2)
    assert res.selection.feasible and res.certify_pairs == cal.sum()  # crossfit: tau certified on every pair
    g = tune.evaluate(sims[held], y[held], glob.threshold)
    a = tune.rates(res.served(sims[held], vecs[held]), y[held])
    assert a["fhr"] <= 0.05 and g["fhr"] <= 0.05
    assert a["hit_rate"] > g["hit_rate"] + 0.05  # the easy region is served down to its own threshold
    t_easy, t_hard = sorted(t for t in res.thresholds if t is not None)
    assert t_easy < glob.threshold <= t_hard + 0.02


def test_split_mode_certifies_on_half_and_audit_is_stricter():
    rng = np.random.default_rng(4)
    sims, y, vecs = world(4000, rng)
    split = adaptive.calibrate(sims, y, vecs, 0.05, 0.95, k=2, crossfit=False)
    assert split.certify_pairs == 2000 and split.fit_pairs == 2000
    rate = adaptive.calibrate(sims, y, vecs, 0.05, 0.95, k=2)
    audit = adaptive.calibrate(sims, y, vecs, 0.05, 0.95, k=2, bound="audit", batch_ratio=0.43)
    assert audit.selection.threshold > rate.selection.threshold  # a higher tau: fewer, safer hits
    assert audit.served(sims, vecs).sum() < rate.served(sims, vecs).sum()


def test_export_decision_never_sees_the_heldout_pairs(monkeypatch):
    """adaptive: cluster decides on the calibration pairs (cross-fitted) only, so the held-out check it then
    reports stays independent. Every array reaching the per-cluster code is a subset of the calibration pairs, and
    making every held-out pair wrong changes the reported check but not the decision (before, the decision was
    taken on those very held-out pairs and flipped)."""
    from types import SimpleNamespace

    from toolkit.cache import stage
    from toolkit.config.cache import CacheConfig

    rng = np.random.default_rng(5)
    sims, y, vecs = world(3000, rng)
    held_mask = rng.random(3000) < 0.3
    cal, held = np.nonzero(~held_mask)[0], np.nonzero(held_mask)[0]
    seen = []

    def spy(fn):
        def wrapped(s, *args, **kwargs):
            seen.append(np.asarray(s).copy())
            return fn(s, *args, **kwargs)
        return wrapped

    for name in ("calibrate", "decide", "fit"):
        monkeypatch.setattr(adaptive, name, spy(getattr(adaptive, name)))
    ctx = SimpleNamespace(config=CacheConfig(adaptive="cluster", clusters=2), recipe=SimpleNamespace(seed=0))

    def run(labels):
        glob = tune.select(sims[cal], labels[cal], 0.05, 0.95, bound="rate")
        return stage._adaptive(ctx, (sims[cal], labels[cal], vecs[cal]), (sims[held], labels[held], vecs[held]),
                               tune.evaluate(sims[held], labels[held], glob.threshold), len(held) / len(cal), 1.0,
                               None)

    ctx.config.bound = "rate"
    first = run(y)
    assert first["exported"] and first["decision"]["pairs"] == len(cal)
    touched = np.unique(np.concatenate(seen))
    assert set(touched) <= set(sims[cal]) and not set(touched) & set(sims[held])
    wrong = y.copy()
    wrong[held] = 0
    second = run(wrong)
    assert second["heldout"]["fhr"] == 1.0  # the independent check sees the damage ...
    assert second["exported"] and second["decision"] == first["decision"]  # ... the decision cannot


def test_a_flat_clusters_threshold_stays_in_the_similarity_range_so_cache_json_loads():
    """Where reuse barely depends on similarity the curve is nearly flat and its threshold landed at 3.8: the
    stage wrote it and cachefile (the gateway, evaluate) refused the file it had just produced."""
    from toolkit.cache import cachefile
    from toolkit.cache.runtime import PROBES

    rng = np.random.default_rng(0)
    n, dim = 1200, 16
    vecs = rng.normal(0, 0.3, (n, dim))
    vecs[: n // 2, 0] += 3
    vecs[n // 2:, 0] -= 3
    sims = rng.uniform(0.5, 0.95, n)
    y = np.empty(n, int)
    y[: n // 2] = rng.random(n // 2) < 0.15 + 0.1 * (sims[: n // 2] - 0.5)  # reuse rare, hardly by similarity
    y[n // 2:] = sims[n // 2:] + rng.normal(0, 0.05, n // 2) > 0.7
    res = adaptive.calibrate(sims, y, vecs, 0.05, 0.95, k=2, method="grid", bound="rate")
    assert res.selection.feasible and None in res.thresholds  # the flat cluster never serves
    assert all(-1 <= t <= 1 for t in res.thresholds if t is not None)
    spec = {"format": "optkit-cache/1", "similarity": {"kind": "cosine"}, "threshold": 0.8,
            "embedder": {"model": "m", "dim": dim, "probe_vectors": [[1.0] + [0.0] * (dim - 1)] * len(PROBES)},
            "adaptive": {**res.export(), "exported": True}}
    cachefile.validate(spec, "cache.json")


def test_too_few_pairs_or_one_label_is_a_reason_not_an_sklearn_traceback():
    rng = np.random.default_rng(1)
    sims, y, vecs = world(60, rng)
    decision = adaptive.decide(sims, y, vecs, 0.05, 0.95, k=32)
    assert decision["exported"] is False and "cannot be split into 32 clusters" in decision["reason"]
    try:
        adaptive.calibrate(sims, np.ones_like(y), vecs, 0.05, 0.95, k=2)
    except adaptive.Unfit as exc:
        assert "one label" in str(exc)
    else:
        raise AssertionError("one label class was fitted")


def test_with_a_learned_similarity_the_thresholds_range_is_its_own():
    """A learned diagonal metric scores in [-max(w), max(w)]: clamping to the cosine's [-1, 1] dropped valid
    thresholds above 1 (those clusters never served) and kept invalid ones below max(w) < 1."""
    model = adaptive.ClusterModel(np.eye(2), np.array([-10.0, -10.0]), np.array([8.0, 8.0]), 1.0, 0.1)
    wide = model.thresholds(0.5, limit=1.5)
    assert all(t is not None and 1.0 < t <= 1.5 for t in wide)
    assert model.thresholds(0.5, limit=1.0) == [None, None]
    narrow = adaptive.ClusterModel(np.eye(2), np.array([5.0, 5.0]), np.array([0.5, 0.5]), 0.0, 1.0)
    assert narrow.thresholds(0.5, limit=0.8) == [-0.8, -0.8]
