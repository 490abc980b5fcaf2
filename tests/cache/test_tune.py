"""Threshold selection: the Clopper-Pearson bound, fixed-sequence selection, its coverage on a distribution whose
true false-hit rate is known in closed form, infeasibility, the F1 reference, and bad input."""

import numpy as np
import pytest
from scipy.stats import norm

from toolkit.cache import tune
from toolkit.errors import OptkitError

# A two-Gaussian world: reusable pairs' similarities ~ N(0.80, 0.08), non-reusable ~ N(0.45, 0.15).
POS, NEG, PRIOR = (0.80, 0.08), (0.45, 0.15), 0.4


def sample(n, rng):
    y = (rng.random(n) < PRIOR).astype(int)
    s = np.where(y == 1, rng.normal(*POS, n), rng.normal(*NEG, n))
    return s, y


def true_fhr(t):
    """P(label 0 | s >= t) in closed form."""
    neg = (1 - PRIOR) * norm.sf(t, *NEG)
    pos = PRIOR * norm.sf(t, *POS)
    return neg / (neg + pos)


def test_upper_bound_matches_closed_form_and_is_monotone():
    # With zero failures the one-sided Clopper-Pearson bound is 1 - (1 - confidence)^(1/n).
    for n in (10, 59, 300):
        assert tune.upper_bound(0, n, 0.95) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-9)
    ubs = tune.upper_bound(np.array([0, 1, 2, 5]), 100, 0.95)
    assert np.all(np.diff(ubs) > 0)
    assert tune.upper_bound(3, 3, 0.95) == 1.0 and tune.upper_bound(0, 0, 0.95) == 1.0
    lo, hi = tune.interval(5, 100)
    assert lo < 0.05 < hi and hi > tune.upper_bound(5, 100, 0.95)  # two-sided 95% is wider than one-sided 95%


def test_curve_convention_higher_similarity_is_served_first():
    s = np.array([0.9, 0.2, 0.5, 0.5, 0.7])
    y = np.array([1, 0, 0, 1, 1])
    c = tune.curve(s, y)
    assert list(c.thresholds) == [0.9, 0.7, 0.5, 0.2]  # decreasing: ties served together
    assert list(c.served) == [1, 2, 4, 5] and list(c.false_hits) == [0, 0, 1, 2]
    assert c.fhr[2] == pytest.approx(0.25) and c.hit_rate[2] == pytest.approx(0.8)


def test_selection_respects_the_bound_and_maximizes_hits():
    rng = np.random.default_rng(0)
    s, y = sample(3000, rng)
    sel = tune.select(s, y, epsilon=0.05, confidence=0.95)
    assert sel.feasible and sel.bound <= 0.05
    assert sel.served == int((s >= sel.threshold).sum())
    # Serving one more distinct similarity would either fail the bound or was never tested (sequence stopped).
    c = tune.curve(s, y)
    i = int(np.nonzero(c.thresholds == sel.threshold)[0][0])
    assert tune.upper_bound(c.false_hits[i + 1], c.served[i + 1], 0.95) > 0.05
    assert true_fhr(sel.threshold) <= 0.05


@pytest.mark.parametrize("method", ["scan", "fixed_sequence"])
def test_coverage_true_false_hit_rate_below_epsilon_in_95_percent_of_calibrations(method):
    rng = np.random.default_rng(1)
    held, hits = 0, []
    reps = 300
    for _ in range(reps):
        s, y = sample(800, rng)
        sel = tune.select(s, y, epsilon=0.05, confidence=0.95, method=method)
        if not sel.feasible or true_fhr(sel.threshold) <= 0.05:
            held += 1
        hits.append(sel.hit_rate)
    assert held / reps >= 0.95
    assert np.mean(hits) > 0.05  # not vacuous: the cache serves a real share of traffic
    if method == "scan":
        assert np.mean(hits) > 0.12


def test_fixed_sequence_stops_at_first_failure():
    # Clean top, one bad patch in the middle, clean again: scan may pass below the patch, fixed_sequence never.
    s = np.linspace(1.0, 0.0, 1000)
    y = np.ones(1000, int)
    y[400:425] = 0
    y[900:] = 0
    scan = tune.select(s, y, 0.05, method="scan")
    fixed = tune.select(s, y, 0.05, method="fixed_sequence")
    assert fixed.feasible and 400 <= fixed.served < 425  # stops inside the bad patch
    assert scan.served > fixed.served
    with pytest.raises(OptkitError, match="selection"):
        tune.select(s, y, 0.05, method="best")


def test_f1_threshold_is_looser_and_wrong_more_often():
    rng = np.random.default_rng(2)
    s, y = sample(3000, rng)
    sel = tune.select(s, y, 0.05)
    t_f1 = tune.f1_threshold(s, y)
    assert t_f1 < sel.threshold
    assert true_fhr(t_f1) > 0.05 > true_fhr(sel.threshold)


def test_infeasible_reports_best_achievable_bound():
    rng = np.random.default_rng(3)
    s = rng.random(200)
    y = (rng.random(200) < 0.5).astype(int)  # similarity says nothing: every threshold errs ~50%
    sel = tune.select(s, y, epsilon=0.05)
    assert not sel.feasible and sel.threshold is None and sel.hit_rate == 0
    assert sel.best_bound > 0.05 and sel.best_bound_threshold is not None
    assert tune.evaluate(s, y, None)["served"] == 0


def test_small_calibration_set_cannot_promise_a_tight_bound():
    # 40 perfect pairs: even zero errors only bound the rate at 1 - 0.05^(1/n) > 0.05.
    s = np.linspace(0.5, 1.0, 40)
    y = (s > 0.7).astype(int)
    assert not tune.select(s, y, 0.05).feasible
    assert tune.select(s, y, 0.3).feasible


def test_hindsight_best_and_evaluate_agree():
    rng = np.random.default_rng(4)
    s, y = sample(1000, rng)
    best = tune.hindsight_best(s, y, 0.03)
    ev = tune.evaluate(s, y, best["threshold"])
    assert ev["fhr"] <= 0.03 and ev["hit_rate"] == pytest.approx(best["hit_rate"])
    lower = tune.evaluate(s, y, best["threshold"] - 0.05)
    assert lower["fhr"] > 0.03 or lower["hit_rate"] <= best["hit_rate"]


@pytest.mark.parametrize("eps", [0.0, 1.0, -0.1, 1.5])
def test_epsilon_outside_open_unit_interval(eps):
    with pytest.raises(OptkitError, match="epsilon"):
        tune.select(np.array([0.1, 0.9]), np.array([0, 1]), eps)


def test_one_class_and_empty_and_bad_labels():
    with pytest.raises(OptkitError, match="every label is 1"):
        tune.select(np.array([0.1, 0.9, 0.5]), np.array([1, 1, 1]), 0.05)
    with pytest.raises(OptkitError, match="no pairs"):
        tune.select(np.array([]), np.array([]), 0.05)
    with pytest.raises(OptkitError, match="0 or 1"):
        tune.select(np.array([0.1, 0.9]), np.array([0, 2]), 0.05)


def test_realized_bound_covers_the_heldout_check_more_often():
    """bound=realized adds the held-out batch's own noise: the realized held-out false-hit rate stays <= epsilon
    far more often than with the rate bound (whose promise is about the long-run rate, not one batch)."""
    assert tune.realized_bound(5, 200, 0.43, 0.95) > tune.upper_bound(5, 200, 0.95)
    rng = np.random.default_rng(5)
    ok = {"rate": 0, "realized": 0}
    for _ in range(150):
        s, y = sample(2000, rng)
        cal = rng.random(2000) < 0.7
        for bound in ok:
            sel = tune.select(s[cal], y[cal], 0.05, 0.95, bound=bound, batch_ratio=0.43)
            ok[bound] += tune.evaluate(s[~cal], y[~cal], sel.threshold)["fhr"] <= 0.05
    assert ok["realized"] / 150 >= 0.9 and ok["realized"] > ok["rate"] + 10


def test_audit_bound_makes_the_heldout_audit_certify_epsilon():
    """bound=audit: the held-out batch's own 95% upper bound (what an auditor states; Jeffreys) is <= epsilon on
    about 95% of fresh splits; with bound=realized only its point estimate is, so the audit fails far more often.
    The cost is hits: audit serves fewer than realized, which serves fewer than rate. (epsilon 0.15: in this
    world the false-hit rate never falls far below 0.02, so a small held-out set cannot certify 0.05.)"""
    from scipy.stats import beta

    assert tune.audit_bound(5, 200, 0.43, 0.95) > tune.realized_bound(5, 200, 0.43, 0.95)
    rng = np.random.default_rng(7)
    certified = {"realized": 0, "audit": 0}
    hits = {"rate": [], "realized": [], "audit": []}
    for _ in range(150):
        s, y = sample(3000, rng)
        cal = rng.random(3000) < 0.7
        for bound in hits:
            sel = tune.select(s[cal], y[cal], 0.15, 0.95, bound=bound, batch_ratio=0.43)
            held = tune.evaluate(s[~cal], y[~cal], sel.threshold)
            hits[bound].append(held["hit_rate"])
            if bound in certified:
                k, n = held["false_hits"], held["served"]
                certified[bound] += beta.ppf(0.95, k + 0.5, n - k + 0.5) <= 0.15
    assert certified["audit"] / 150 >= 0.93 and certified["audit"] > certified["realized"] + 20
    assert np.mean(hits["audit"]) < np.mean(hits["realized"]) < np.mean(hits["rate"])


def test_unknown_bound_and_missing_batch_are_named():
    s, y = sample(500, np.random.default_rng(0))
    with pytest.raises(OptkitError, match="cache.bound"):
        tune.select(s, y, 0.05, bound="oracle")
    with pytest.raises(OptkitError, match="future batch"):
        tune.select(s, y, 0.05, bound="audit")


def test_realized_and_audit_bounds_are_finite_for_tiny_served_counts():
    """A threshold serving one or two calibration pairs makes a one-query future batch (m = 1), where the
    moment-matched beta does not exist: the bound was NaN and reached cache.json / report.json ("best achievable:
    nan"). Now the exact beta-binomial answers there, and every Selection field is strict JSON."""
    import json

    from toolkit.cache import tune

    k = np.array([0, 0, 1, 0, 1, 2, 0])
    n = np.array([0, 1, 1, 2, 2, 3, 50])
    for kind in ("realized", "audit"):
        ub = tune.bounds(k, n, 0.95, kind, batch_ratio=0.43)
        assert np.all(np.isfinite(ub)) and np.all((ub >= 0) & (ub <= 1))
        assert ub[1] > 0.99  # one served pair, no false hit: a one-query batch can still be 100% wrong
    rng = np.random.default_rng(3)
    sims = rng.uniform(0, 1, 400)
    labels = (rng.uniform(0, 1, 400) < sims).astype(int)
    for kind in ("realized", "audit"):
        sel = tune.select(sims, labels, 0.05, 0.95, "scan", kind, batch_ratio=0.43)
        assert np.isfinite(sel.best_bound)
        json.dumps(sel.to_dict(), allow_nan=False)


def test_interval_is_clopper_pearson():
    from scipy.stats import beta

    from toolkit.cache import tune

    lo, hi = tune.interval(3, 40)
    assert lo == pytest.approx(beta.ppf(0.025, 3, 38)) and hi == pytest.approx(beta.ppf(0.975, 4, 37))
    assert tune.interval(0, 10)[0] == 0.0 and tune.interval(10, 10)[1] == 1.0 and tune.interval(0, 0) == (0.0, 1.0)


def test_realized_bound_is_the_exact_beta_binomial_quantile():
    """The realized bound is the exact predictive quantile (Jeffreys posterior, then the batch's binomial noise),
    as a share of the batch: scipy's betabinom.ppf / m, at every count including zero and all-false."""
    from scipy.stats import betabinom

    k = np.array([0, 0, 1, 3, 5, 40, 200, 7])
    n = np.array([1, 5, 20, 60, 200, 400, 200, 2000])
    for ratio in (0.43, 1.0, 3.0):
        m = np.maximum(1, np.round(n * ratio))
        want = betabinom.ppf(0.95, m, k + 0.5, n - k + 0.5) / m
        assert np.allclose(tune.realized_bound(k, n, ratio, 0.95), want)
        q = tune.realized_bound(k, n, ratio, 0.95) * m
        assert np.allclose(q, np.round(q))  # whole false hits: "4.5 of 90" is not a share a batch can show


def test_realized_bounds_above_the_search_limit_are_skipped_and_the_rest_are_exact():
    """A large cache.batch makes the exact walk long (~m steps at thresholds serving mostly false hits), so a
    search computes only the bounds that can pass: `above` leaves every bound <= it exact and the others above it
    (1 where not computed). select() must give what the full computation gives, best_bound included when nothing
    passes."""
    rng = np.random.default_rng(5)
    s, y = sample(2000, rng)
    c = tune.curve(s, y)
    for ratio in (0.43, 10.0):
        full = tune.bounds(c.false_hits, c.served, 0.95, "realized", ratio)
        part = tune.bounds(c.false_hits, c.served, 0.95, "realized", ratio, above=0.05)
        low = full <= 0.05
        assert low.any() and (~low).any()
        assert np.array_equal(part[low], full[low]) and np.all(part[~low] > 0.05)
        assert (part == 1.0).sum() > (full == 1.0).sum()  # some were skipped
        for eps in (0.05, 0.0005):  # 0.0005: no threshold passes, best_bound must still be the lowest bound
            sel = tune.select(s, y, eps, 0.95, "scan", "realized", ratio)
            assert sel.best_bound == pytest.approx(full.min(), rel=1e-12)
            assert sel.feasible == (eps == 0.05)
            if sel.feasible:
                assert sel.bound == full[np.searchsorted(-c.thresholds, -sel.threshold)]


def test_grid_selection_tests_label_free_thresholds_and_passes_the_bound():
    rng = np.random.default_rng(2)
    s, y = sample(2000, rng)
    c = tune.curve(s, y)
    grid = tune.grid_indices(c.served)
    # Geometric in served counts (~10% apart), fixed by the counts alone: other labels, same candidates.
    steps = c.served[grid][1:] / c.served[grid][:-1]
    assert 30 < len(grid) < 120 and np.all(steps[c.served[grid][:-1] > 50] < 1.25)
    assert np.array_equal(tune.grid_indices(tune.curve(s, 1 - y).served), grid)
    sel = tune.select(s, y, 0.05, 0.95, "grid", "realized", 0.43)
    assert sel.feasible and sel.bound <= 0.05 and sel.tested == len(grid)
    assert sel.threshold in set(c.thresholds[grid])
    later = [i for i in grid if c.thresholds[i] < sel.threshold]  # every lower grid threshold fails the bound
    assert np.all(tune.bounds(c.false_hits[later], c.served[later], 0.95, "realized", 0.43) > 0.05)
    scan = tune.select(s, y, 0.05, 0.95, "scan", "realized", 0.43)
    assert scan.threshold <= sel.threshold  # scan picks from a superset of candidates


def test_default_bound_keeps_the_realized_share_within_epsilon_on_95_percent_of_splits():
    """The recipe's default (cache.bound / cache.selection) promises the false-hit share a held-out batch
    actually shows: 2,000 calibration pairs, 857 held-out (what holdout 0.3 leaves), 300 fresh splits of the
    two-Gaussian world. The old default (rate, scan) keeps that promise far less often."""
    from toolkit.config.cache import CacheConfig

    default = CacheConfig()
    ok = {"default": 0, "old": 0}
    for _ in range(300):
        s, y = sample(2857, np.random.default_rng(100 + _))
        cal, held = slice(0, 2000), slice(2000, None)
        for name, (method, bound) in {"default": (default.selection, default.bound), "old": ("scan", "rate")}.items():
            sel = tune.select(s[cal], y[cal], 0.05, default.confidence, method, bound, 857 / 2000)
            ok[name] += tune.evaluate(s[held], y[held], sel.threshold)["fhr"] <= 0.05
    assert ok["default"] / 300 >= 0.94 and ok["default"] > ok["old"] + 15


def test_a_larger_traffic_batch_keeps_its_promise_with_more_hits():
    """cache.batch: the realized bound is about a batch of that many lookups. A 20,000-lookup batch averages out
    more of its own noise than an 857-pair held-out check, so the same epsilon allows a lower threshold (more
    hits), and the share realized on fresh 20,000-lookup batches still stays <= epsilon on >= 95% of them. As the
    batch grows the bound tends to the long-run rate bound, never below it."""
    hits = {857: [], 20_000: []}
    ok = 0
    for r in range(120):
        rng = np.random.default_rng(300 + r)
        s, y = sample(2000, rng)
        for batch in hits:
            sel = tune.select(s, y, 0.05, 0.95, "grid", "realized", batch / 2000)
            hits[batch].append(sel.hit_rate)
            if batch == 20_000:
                fresh_s, fresh_y = sample(batch, rng)
                ok += tune.evaluate(fresh_s, fresh_y, sel.threshold)["fhr"] <= 0.05
    assert ok / 120 >= 0.95
    assert np.mean(hits[20_000]) > np.mean(hits[857]) * 1.02
    assert all(big >= small for big, small in zip(hits[20_000], hits[857]))
    k, n = np.array([3, 10, 40]), np.array([100, 300, 900])
    rate = tune.bounds(k, n, 0.95, "rate")
    huge = tune.bounds(k, n, 0.95, "realized", 1e4)
    assert np.all(huge >= rate - 1e-12) and np.allclose(huge, rate, atol=2e-3)


def test_the_audit_bound_stops_its_walk_at_epsilon_and_agrees_where_it_matters():
    """The audit bound walked the predictive to ~m at every threshold (a million-lookup batch: 12 s a selection,
    200 selections in the stage's bootstrap). Below epsilon its values must stay exact; above, only 'above'."""
    import numpy as np

    from toolkit.cache import tune

    k, n = np.arange(0, 120), np.full(120, 1500.0)
    full = tune.bounds(k, n, 0.95, "audit", 40.0)
    fast = tune.bounds(k, n, 0.95, "audit", 40.0, above=0.05)
    assert (full <= 0.05).any() and (full > 0.05).any()
    assert np.array_equal(full <= 0.05, fast <= 0.05) and np.allclose(full[full <= 0.05], fast[full <= 0.05])
