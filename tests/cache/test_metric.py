"""The learned cache similarity (toolkit/cache/metric.py, cache.metric): the fit, the cross-fitted choice against
the cosine, re-pairing under the metric, and the runtime scoring exactly as the tuner did.

Synthetic vectors here on purpose: they make the right answer known (which dimensions carry reuse). The cache
stage test (tests/cache/test_stage.py) runs the same code on real MiniLM embeddings of real data."""

import numpy as np
import pytest

from toolkit.cache import SemanticCache, metric, tune
from toolkit.cache.pairs import Pairs, nearest_pairs
from toolkit.cache.runtime import l2_normalize
from toolkit.cache.stage import choose_metric, pair_fn, split
from toolkit.config.cache import CacheConfig
from toolkit.errors import OptkitError


def grouped_texts(seed: int = 0, groups: int = 40, per: int = 25, signal: int = 8, dim: int = 48,
                  topic: float = 2.0, noise: float = 1.2):
    """Unit vectors whose first `signal` dimensions say which group (= reusable answer) a text belongs to, while
    the other dimensions carry a topic shared by pairs of groups plus noise. With a strong topic the cosine is
    dominated by it: its wrong neighbours (the sibling group) are spread over every cosine, so no cosine
    threshold keeps the false-hit share low."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, signal))
    topics = rng.normal(size=(groups // 2, dim - signal)) * topic
    rows, labels = [], []
    for g in range(groups):
        for _ in range(per):
            rows.append(np.concatenate([centres[g] + 0.35 * rng.normal(size=signal),
                                        topics[g // 2] + noise * rng.normal(size=dim - signal)]))
            labels.append(f"g{g}")
    return l2_normalize(np.array(rows)), labels


def grouped_pairs(vecs, groups):
    queries = list(range(len(vecs)))
    cached, labels = nearest_pairs(vecs, groups, queries)
    return Pairs([f"t{i}" for i in queries], np.array(queries), cached, labels, "synthetic", {}, groups)


def test_the_learned_metric_finds_the_dimensions_that_decide_reuse_and_serves_more_within_the_bound():
    vecs, groups = grouped_texts()
    pairs = grouped_pairs(vecs, groups)
    cal, held = split(pairs, 0.3, seed=0)
    cfg = CacheConfig(epsilon=0.05)  # metric auto, bound realized, selection grid: the defaults
    choice = choose_metric(cfg, 0, pairs, vecs, cal, len(held) / len(cal))
    weights, (s_cal, y_cal, c_cal), report = choice.weights, choice.calibration, choice.report
    # Cross-fitted on the calibration pairs the learned metric serves more of them within the bound: auto keeps it.
    served = report["calibration_served"]
    assert report["kind"] == "diagonal" and served["diagonal_crossfit"] > served["cosine"]
    assert str(served["diagonal_crossfit"]) in report["reason"] and weights.shape == (vecs.shape[1],)
    # It learned where reuse lives: the signal dimensions weigh more than the topic / noise ones.
    assert weights[:8].mean() > 2 * weights[8:].mean() and (weights >= 0).all()
    # The calibration pairs were re-paired under the fold models: labels are the groups of the new neighbours.
    g = np.array(groups)
    assert (y_cal == (g[pairs.query[cal]] == g[c_cal])).all() and (c_cal != pairs.query[cal]).all()
    assert (pairs.cached[cal] != c_cal).any()  # the metric changed some neighbours

    # Held-out, under the exported weights: the promise holds and more queries are served than by the cosine.
    sel = tune.select(s_cal, y_cal, 0.05, 0.95, "grid", "realized", len(held) / len(cal))
    assert choice.selection == sel  # the threshold the choice was made on is the one exported
    s_held, y_held, _ = pair_fn(pairs, vecs)(weights, held)
    learned = tune.evaluate(s_held, y_held, sel.threshold, 0.95)
    sel_cos = tune.select(metric.scores(vecs[pairs.query[cal]], vecs[pairs.cached[cal]], None), pairs.labels[cal],
                          0.05, 0.95, "grid", "realized", len(held) / len(cal))
    assert choice.cosine_selection == sel_cos
    cosine = tune.evaluate(metric.scores(vecs[pairs.query[held]], vecs[pairs.cached[held]], None),
                           pairs.labels[held], sel_cos.threshold, 0.95)
    assert learned["fhr"] <= 0.05 and learned["hit_rate"] > cosine["hit_rate"] + 0.5


def test_the_threshold_serves_under_the_final_metric_the_share_it_was_certified_for():
    """The threshold is chosen on cross-fitted scores (fold models fitted on 4/5 of the pairs) but applied to the
    final metric's. Here the fold models' scores run ~0.02 higher: copied across unshifted, the threshold served
    a third fewer queries than certified (on Banking77 pairs: 0.61 instead of 0.66). crossfit_shift moves the
    cross-fitted scores onto the final metric's scale first; the certified pairs and counts stay the same."""
    from toolkit.cache.pairs import mirror_groups

    vecs, groups = grouped_texts(seed=1, topic=3.0, noise=2.5)
    pairs = grouped_pairs(vecs, groups)
    cal, held = split(pairs, 0.3, seed=0)
    fn = pair_fn(pairs, vecs)
    choice = choose_metric(CacheConfig(metric="diagonal"), 0, pairs, vecs, cal, len(held) / len(cal))
    shift, (s_cal, y_cal, _) = choice.report["crossfit_shift"], choice.calibration
    raw, y_raw, _ = metric.crossfit(vecs[pairs.query], vecs[pairs.cached], pairs.labels, cal, fn, 0,
                                    groups=mirror_groups(pairs.query[cal], pairs.cached[cal]))
    final = fn(choice.weights, cal)[0]
    sel, unshifted = choice.selection, tune.select(raw, y_raw, 0.05, 0.95, "grid", "realized", len(held) / len(cal))
    assert shift == metric.crossfit_shift(raw, final, unshifted.threshold) > 0.01 and np.allclose(s_cal, raw - shift)
    assert (sel.served, sel.false_hits) == (unshifted.served, unshifted.false_hits)  # the same certificate
    assert sel.threshold == pytest.approx(unshifted.threshold - shift)
    assert (final >= sel.threshold).sum() == sel.served  # under the final metric: the very count certified
    certified, s_held = sel.hit_rate, fn(choice.weights, held)[0]
    assert 0.2 < certified < 0.8
    assert abs((s_held >= sel.threshold).mean() - certified) < 0.05  # held-out: the share certified
    assert (s_held >= unshifted.threshold).mean() < certified - 0.1  # what copying the threshold across served


def test_crossfit_shift_is_the_gap_where_the_threshold_operates():
    base = np.random.default_rng(0).normal(0.7, 0.1, 2000)
    assert metric.crossfit_shift(base + 0.02, base, float(np.quantile(base + 0.02, 0.6))) == pytest.approx(0.02, abs=1e-3)
    # The gap differs along the curve (0.02 in the middle, 0.005 in the top tenth): a high threshold is moved by
    # the top's gap, not the middle's, and either way serves exactly as many pairs under the final scores.
    bent = np.where(base > np.quantile(base, 0.9), base + 0.005, base + 0.02)
    for level, gap in ((0.97, 0.005), (0.5, 0.02)):
        t = float(np.quantile(bent, level))
        shift = metric.crossfit_shift(bent, base, t)
        assert shift == pytest.approx(gap, abs=1e-3) and (base >= t - shift).sum() == (bent >= t).sum()
    # Nothing certified (no threshold): the median gap over the quantiles; a threshold above every score: none.
    assert metric.crossfit_shift(bent, base, None) == pytest.approx(0.02)
    assert metric.crossfit_shift(bent, base, 9.0) == 0.0


def test_auto_keeps_the_cosine_when_learning_does_not_serve_more():
    # A weak topic: the cosine already finds the group's texts and serves as many as the learned metric.
    vecs, groups = grouped_texts(topic=1.2, noise=0.8)
    pairs = grouped_pairs(vecs, groups)
    cal, held = split(pairs, 0.3, seed=0)
    choice = choose_metric(CacheConfig(), 0, pairs, vecs, cal, len(held) / len(cal))
    weights, (s_cal, y_cal, c_cal), report = choice.weights, choice.calibration, choice.report
    assert report["kind"] == "cosine" and weights is None and choice.selection == choice.cosine_selection
    assert report["calibration_served"]["diagonal_crossfit"] <= report["calibration_served"]["cosine"]
    assert np.allclose(s_cal, metric.scores(vecs[pairs.query[cal]], vecs[pairs.cached[cal]], None))
    # cache.metric: cosine skips the fit altogether; diagonal keeps the fit whatever it serves.
    assert choose_metric(CacheConfig(metric="cosine"), 0, pairs, vecs, cal, 0.4).report == {
        "kind": "cosine", "reason": "cache.metric: cosine"}
    forced = choose_metric(CacheConfig(metric="diagonal"), 0, pairs, vecs, cal, 0.4)
    assert forced.weights is not None and forced.report["kind"] == "diagonal"


def test_repairing_takes_the_nearest_other_text_under_the_weights():
    vecs, groups = grouped_texts(seed=3, groups=6, per=5)
    pairs = grouped_pairs(vecs, groups)
    w = np.random.default_rng(0).uniform(0, 3, vecs.shape[1]).astype(np.float32)
    rows = np.arange(len(vecs))
    scores, labels, cached = pair_fn(pairs, vecs)(w, rows)
    brute = (vecs * w) @ vecs.T
    np.fill_diagonal(brute, -np.inf)
    assert (cached == brute.argmax(1)).all() and np.allclose(scores, brute.max(1), atol=1e-5)
    assert (labels == (np.array(groups) == np.array(groups)[cached])).all()
    # A pairs file's pairs are fixed: only their scores change with the metric.
    fixed = Pairs(pairs.texts, pairs.query, pairs.cached, pairs.labels, "file", {})
    s, y, c = pair_fn(fixed, vecs)(w, rows)
    assert (c == pairs.cached).all() and (y == pairs.labels).all()
    assert np.allclose(s, np.sum(vecs * w * vecs[pairs.cached], 1), atol=1e-5)


def test_the_runtime_scores_with_the_weights_and_checks_them():
    a, b = np.eye(4, dtype=np.float32)[0], np.eye(4, dtype=np.float32)[1]
    query = l2_normalize(np.array([0.8, 0.6, 0.0, 0.0]))  # cosine: closer to a (0.8) than to b (0.6)
    w = np.array([0.5, 2.0, 1.0, 1.0], np.float32)  # learned: dimension 1 matters 4x dimension 0
    cache = SemanticCache(1.1, weights=w)
    cache.insert_many(["a", "b"], ["answer a", "answer b"], vectors=np.stack([a, b]))
    hit = cache.lookup_vector(query)
    assert hit.answer == "answer b" and hit.similarity == pytest.approx(1.2)  # 2.0 x 0.6 >= 1.1
    with pytest.raises(OptkitError, match=r"threshold must be a cosine similarity in \[-1, 1\]"):
        SemanticCache(1.1)  # beyond any cosine
    with pytest.raises(OptkitError, match=r"threshold must be a similarity in \[-2, 2\]"):
        SemanticCache(2.5, weights=w)
    with pytest.raises(OptkitError, match="weights must be a non-empty vector of finite values >= 0"):
        SemanticCache(0.5, weights=[1.0, -1.0])
    with pytest.raises(OptkitError, match="embedding dim 3 != the metric's 4"):
        cache.lookup_vector(np.ones(3, np.float32))


def test_a_handful_of_calibration_pairs_still_cross_fits():
    # 4 calibration pairs: fewer folds than metric.FOLDS, none empty; every pair gets an out-of-fold score.
    vecs, groups = grouped_texts(seed=2, groups=4, per=3)
    pairs = grouped_pairs(vecs, groups)
    cal = np.array([0, 3, 6, 9])
    choice = choose_metric(CacheConfig(metric="diagonal"), 0, pairs, vecs, cal, 1.0)
    weights, (s_cal, y_cal, c_cal), report = choice.weights, choice.calibration, choice.report
    assert weights.shape == (vecs.shape[1],) and len(s_cal) == len(y_cal) == len(c_cal) == 4
    assert np.isfinite(s_cal).all() and report["kind"] == "diagonal"


def test_a_mutual_nearest_pair_and_its_mirror_fall_on_the_same_side_of_the_split():
    """A's nearest text is B and B's is A: two pairs, one similarity, one label. Hashed in order, a quarter of
    the held-out check on real intent data was the mirror of a calibration pair."""
    vecs, groups = grouped_texts()
    pairs = grouped_pairs(vecs, groups)
    cal, held = split(pairs, 0.3, seed=0)
    side = {}
    for part, rows in (("cal", cal), ("held", held)):
        for r in rows:
            side[(int(pairs.query[r]), int(pairs.cached[r]))] = part
    mirrors = [(a, b) for (a, b) in side if (b, a) in side and a < b]
    assert len(mirrors) > 20  # the synthetic groups have many mutual nearest neighbours
    assert all(side[(a, b)] == side[(b, a)] for a, b in mirrors)
    assert 0.2 < len(held) / len(pairs.query) < 0.4


def test_cross_fitted_folds_keep_a_pair_and_its_mirror_together():
    """Nearest-neighbour pairs come in mirrors (A's nearest is B and B's is A: one similarity, one label). Split
    across folds, a pair was scored by weights fitted on its own mirror, so the cross-fitted scores the threshold
    is certified on (and adaptive's export decision) looked better than fresh traffic's. The held-out split
    already grouped them; the folds did not."""
    from toolkit.cache.pairs import fold_ids, mirror_groups

    vecs, groups = grouped_texts(seed=3)
    pairs = grouped_pairs(vecs, groups)
    rows = np.arange(len(pairs.labels))
    ids = mirror_groups(pairs.query, pairs.cached)
    assert len(np.unique(ids)) < len(rows) * 0.9  # the data has many mirrors to keep together (151 here)
    scored = []

    def recording(weights, idx):
        scored.append(set(idx.tolist()))
        return pair_fn(pairs, vecs)(weights, idx)

    metric.crossfit(vecs[pairs.query], vecs[pairs.cached], pairs.labels, rows, recording, seed=0, groups=ids)
    fold_of = {r: k for k, part in enumerate(scored) for r in part}
    assert len(scored) == metric.FOLDS and len(fold_of) == len(rows)
    for g in np.unique(ids):
        members = rows[ids == g]
        assert len({fold_of[r] for r in members}) == 1, members
    sizes = np.bincount(fold_ids(len(rows), 3, np.random.default_rng(1), ids), minlength=3)
    assert sizes.min() > 0.25 * len(rows)  # still about even


def test_a_pair_and_its_mirror_count_once():
    """A->B and B->A with one label are one observation; counted twice, the bound's n overstated the evidence and
    the realized false-hit share exceeded epsilon on more held-out batches than promised. Differing labels (a
    pairs file that disagrees with itself) are two observations and stay."""
    from toolkit.cache.pairs import drop_mirrors

    pairs = Pairs(["a", "b", "c", "d"], np.array([0, 1, 2, 3, 0, 2]), np.array([1, 0, 3, 2, 1, 0]),
                  np.array([1, 1, 0, 1, 1, 0]), "test", {"test_split_rows": 0})
    once = drop_mirrors(pairs)
    assert [(int(q), int(c), int(y)) for q, c, y in zip(once.query, once.cached, once.labels)] == [
        (0, 1, 1), (2, 3, 0), (3, 2, 1), (2, 0, 0)]
    assert once.excluded == {"test_split_rows": 0, "mirrored_duplicate_pairs": 2}
    assert drop_mirrors(once) is once
