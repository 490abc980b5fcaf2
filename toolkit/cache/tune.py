"""Choosing a semantic-cache threshold with a stated false-hit bound.

Definitions (used the same way in the stage, the report, the benchmark and the README):

- similarity s: cosine similarity of the two L2-normalized embeddings, in [-1, 1], higher = closer.
- a pair (query, cached query, label) is *served* (a cache hit) at threshold t when s >= t.
- false-hit rate FHR(t) = P(label = 0 | s >= t): among served hits, the fraction whose cached answer may
  NOT be reused (1 - precision). This is what a user of the cache experiences as "wrong answers from cache".
- hit rate HR(t) = P(s >= t): the fraction of all queries answered from the cache.
- recall(t) = P(s >= t | label = 1): the fraction of reusable pairs that the cache actually serves.

Selection: among thresholds t, maximize the hit rate subject to FHR(t) <= epsilon, where FHR(t) is replaced by
a one-sided upper bound at the given confidence (`bound`, below). Three ways to search:

- grid (default): the lowest threshold whose bound is <= epsilon among thresholds whose calibration served
  counts grow by ~10% from one to the next (GRID_LOG_STEP; the grid depends on counts only, never on labels).
  Picking the lowest passing threshold out of thousands picks the luckiest calibration noise; out of ~70 the
  pick is less lucky: on CLINC150 / Banking77 / SNIPS pairs the realized held-out share stays <= epsilon on
  95-99% of splits with bound realized, where scan gives 93-96% (eval/bench_cache.py --parts bound). The price:
  a grid step is up to 10% of the served count, about 5% of the hits on average.
- scan: the same over every distinct similarity. Each bound is exact for its threshold; the search is not
  multiplicity-corrected.
- fixed_sequence: the "Learn then Test" recipe: thresholds are tested from high to low in an order fixed before
  looking at labels and the search stops at the first threshold whose bound exceeds epsilon. Valid with no
  correction when the false-hit curve falls with the threshold; nearest-neighbour pairs often have near-duplicate
  non-reusable pairs at the top, so one early failure ends the search and it serves far fewer hits.

What the bound is on (`bound`):

- realized (default): the false-hit share *realized* on a future batch of traffic (by default as large as the
  held-out set): the exact beta-binomial predictive, which adds that batch's own sampling noise. This is what a
  held-out check, or a day of traffic, shows.
- rate: the long-run false-hit rate, Clopper-Pearson on the calibration counts. Most hits, but a batch of the
  held-out set's size then exceeds epsilon on up to 18% of splits (the rate is <= epsilon, the batch's share is
  noisy around it).
- audit: the upper bound an audit of such a batch would itself state (its own Jeffreys bound). This is the
  strictest: it is what "the held-out check certifies epsilon at 95%" needs. Fewest hits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from toolkit.errors import OptkitError

# fixed_sequence starts at the highest threshold whose served count could pass even with this many false hits.
# Starting where a single early false hit would end the scan (k = 0) makes the test fail by bad luck far too
# often; the start depends only on epsilon, confidence and counts, never on labels, so the test stays valid.
START_FALSE_HITS = 2
# grid selection tests only thresholds whose calibration served counts grow by this factor (log step) from one to
# the next: ~70 candidates over 2,000 pairs instead of every distinct similarity.
GRID_LOG_STEP = 0.1
SELECTIONS = ("scan", "grid", "fixed_sequence")


def check_inputs(sims: np.ndarray, labels: np.ndarray, epsilon: float, confidence: float, what: str = "pairs"):
    if not 0 < epsilon < 1:
        raise OptkitError(f"cache.epsilon must be in (0, 1), got {epsilon}")
    if not 0.5 < confidence < 1:
        raise OptkitError(f"cache.confidence must be in (0.5, 1), got {confidence}")
    if len(sims) != len(labels):
        raise OptkitError(f"{what}: {len(sims)} similarities but {len(labels)} labels")
    if len(sims) == 0:
        raise OptkitError(f"{what}: no pairs")
    classes = set(np.unique(labels).tolist())
    if not classes <= {0, 1}:
        raise OptkitError(f"{what}: labels must be 0 or 1, got {sorted(classes)}")
    if len(classes) < 2:
        raise OptkitError(f"{what}: every label is {classes.pop()}; the threshold needs both reusable (1) and "
                          "non-reusable (0) pairs")


def upper_bound(k, n, confidence: float):
    """One-sided Clopper-Pearson upper bound on a binomial rate after k failures in n trials (1 when n = 0)."""
    from scipy.stats import beta

    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        ub = beta.ppf(confidence, k + 1, np.maximum(n - k, 1e-12))
    return np.where((n <= 0) | (k >= n), 1.0, ub)


def realized_bound(k, n, batch_ratio: float, confidence: float, above: Optional[float] = None):
    """Upper `confidence` quantile of the false-hit share *realized* on a future batch whose served count is
    m = n * batch_ratio, given k false hits among n served now: the exact beta-binomial predictive (Jeffreys
    prior on the rate, then the batch's own binomial noise), as a multiple of 1/m. Wider than the rate bound: it
    adds the future batch's sampling noise, which a held-out check also sees. Exact, not a moment-matched beta
    (which treated the batch's false-hit count as continuous: at epsilon 0.05 and ~90 served, "4.5 false hits"
    could pass where only 4 keep the share <= epsilon). With `above`, a bound known to exceed it is returned as
    inf instead of computed (see predictive_quantile)."""
    k, n = np.broadcast_arrays(np.asarray(k, dtype=float), np.asarray(n, dtype=float))
    m = np.maximum(1, np.round(n * batch_ratio))
    stop = None if above is None else above * m
    q = predictive_quantile(k + 0.5, np.maximum(n - k, 0) + 0.5, m, confidence, stop)
    return np.where(n <= 0, 1.0, q / m)


def predictive_quantile(a, b, m, confidence: float, stop=None) -> np.ndarray:
    """Smallest x with P(X <= x) >= confidence for X ~ BetaBinomial(m, a, b), elementwise. Walks the pmf
    upward from x = 0 in log space (pmf(x+1) / pmf(x) = (m - x)(x + a) / ((x + 1)(m - x - 1 + b))), vectorized
    over the elements still below `confidence`: fast where scipy's generic betabinom.ppf takes about a second
    per thousand thresholds. The walk is as long as the largest quantile, i.e. ~m at thresholds that serve mostly
    false hits; with `stop` (a count, per element or one for all) an element whose quantile is known to exceed it
    leaves the walk as inf, so a batch of a million lookups costs ~epsilon * m steps, not ~m."""
    from scipy.special import betaln

    a, b, m = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (a, b, m)))
    shape = m.shape
    a, b, m = a.ravel(), b.ravel(), m.ravel()
    stop = np.full(len(m), np.inf) if stop is None else np.broadcast_to(np.asarray(stop, dtype=float), shape).ravel()
    out = m.copy()  # the quantile never exceeds m
    idx = np.arange(len(m))
    logp = betaln(a, m + b) - betaln(a, b)  # log pmf(0)
    cdf = np.exp(logp)
    x = 0
    while len(idx):
        done = (cdf >= confidence - 1e-12) | (x >= m[idx])
        out[idx[done]] = x
        beyond = ~done & (x > stop[idx])  # quantile > x > stop: known to exceed it
        out[idx[beyond]] = np.inf
        keep = ~done & ~beyond
        idx, logp, cdf = idx[keep], logp[keep], cdf[keep]
        if not len(idx):
            break
        ai, bi, mi = a[idx], b[idx], m[idx]
        logp = logp + np.log((mi - x) * (x + ai)) - np.log((x + 1) * (mi - x - 1 + bi))
        cdf = cdf + np.exp(logp)
        x += 1
    return out.reshape(shape)


def audit_bound(k, n, batch_ratio: float, confidence: float, above: Optional[float] = None):
    """Upper `confidence` quantile of the bound an *audit* would state: a future batch of n * batch_ratio served
    queries is labelled and its own one-sided Clopper-Pearson upper bound (at `confidence`) is computed. Keeping
    this <= epsilon means the audit itself certifies epsilon with probability `confidence` (what the held-out
    bootstrap check in eval/bench_cache.py measures), not only that its point estimate lands under epsilon.
    The bound is monotone in the audit's false-hit count, so its quantile is the bound at the count's quantile
    (from realized_bound's predictive). With `above`, the predictive walk stops where the realized share already
    exceeds it (the audit's bound, at or above that share, exceeds it too): a large batch costs ~above * m steps,
    not ~m (a million-lookup batch took 12 s per selection, 200 of them in the stage's bootstrap)."""
    from scipy.stats import beta

    n = np.asarray(n, dtype=float)
    m = np.maximum(1, np.round(n * batch_ratio))
    k_future = np.minimum(m, np.ceil(realized_bound(k, n, batch_ratio, confidence, above) * m - 1e-9))
    # The auditor's bound: Jeffreys (Brown, Cai & DasGupta's recommendation; close to a bootstrap percentile bound,
    # where Clopper-Pearson at zero false hits would still claim 3/m).
    return np.where(n <= 0, 1.0, beta.ppf(confidence, k_future + 0.5, m - k_future + 0.5))


def interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval of a binomial rate."""
    from scipy.stats import binomtest

    if n == 0:
        return 0.0, 1.0
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")  # exact = Clopper-Pearson
    return float(ci.low), float(ci.high)


@dataclass
class Curve:
    """Served counts at every distinct similarity, thresholds in decreasing order."""

    thresholds: np.ndarray  # distinct similarities, decreasing; serving s >= thresholds[i]
    served: np.ndarray  # pairs with s >= t
    false_hits: np.ndarray  # of those, label 0
    n: int
    positives: int

    @property
    def fhr(self) -> np.ndarray:
        return self.false_hits / np.maximum(self.served, 1)

    @property
    def hit_rate(self) -> np.ndarray:
        return self.served / self.n

    @property
    def recall(self) -> np.ndarray:
        return (self.served - self.false_hits) / max(self.positives, 1)

    @property
    def precision(self) -> np.ndarray:
        return 1 - self.fhr


def curve(sims: np.ndarray, labels: np.ndarray) -> Curve:
    sims = np.asarray(sims, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(-sims, kind="stable")
    s, y = sims[order], labels[order]
    served = np.arange(1, len(s) + 1)
    false = np.cumsum(1 - y)
    # Keep the last index of each run of equal similarities: a threshold serves all ties at once.
    last = np.r_[s[1:] != s[:-1], True]
    return Curve(s[last], served[last], false[last], len(s), int(y.sum()))


@dataclass
class Selection:
    feasible: bool
    threshold: Optional[float]  # None = no threshold meets the bound: serve exact matches only
    epsilon: float
    confidence: float
    n: int  # calibration pairs
    served: int
    false_hits: int
    fhr: Optional[float]  # point estimate at the threshold
    bound: Optional[float]  # one-sided upper bound at the threshold (<= epsilon when feasible)
    hit_rate: float
    recall: float
    best_bound: float  # the lowest upper bound any threshold reaches (what is achievable)
    best_bound_threshold: Optional[float]
    tested: int  # thresholds tested before the sequence stopped

    def to_dict(self) -> dict:
        return asdict(self)


def start_count(epsilon: float, confidence: float, n: int, bound: str = "rate",
                batch_ratio: Optional[float] = None) -> int:
    """Smallest served count whose bound (of the kind `bound`) would pass with START_FALSE_HITS false hits (fewer
    when n is small). With the rate bound's start, a realized / audit sequence would begin where even zero false
    hits fail its wider bound, and stop at once."""
    for k in (START_FALSE_HITS, 1, 0):
        counts = np.arange(k + 1, n + 1)
        if len(counts):
            ok = np.nonzero(bounds(np.full(len(counts), k), counts, confidence, bound, batch_ratio) <= epsilon)[0]
            if len(ok):
                return int(counts[ok[0]])
    return n + 1


BOUNDS = ("rate", "realized", "audit")


def bounds(false_hits, served, confidence: float, bound: str = "rate", batch_ratio: Optional[float] = None,
           above: Optional[float] = None):
    """Per-threshold upper bound of the kind `bound` names (rate / realized / audit, see the module doc). With
    `above` (realized, audit), a bound known to exceed it comes back as 1 without being computed exactly: every
    bound <= `above` is exact, which is all a search against epsilon needs."""
    ub = upper_bound(false_hits, served, confidence)
    if bound == "rate":
        return ub
    if bound not in BOUNDS:
        raise OptkitError(f"cache.bound must be one of {', '.join(BOUNDS)}, got '{bound}'")
    if not batch_ratio or batch_ratio <= 0:
        raise OptkitError(f"cache.bound={bound} needs the size of the future batch (a held-out fraction > 0)")
    # Never looser than the rate bound (the Jeffreys predictive can be, at k = 0).
    if bound == "realized":
        out = np.maximum(ub, realized_bound(false_hits, served, batch_ratio, confidence, above))
    else:
        out = np.maximum(ub, audit_bound(false_hits, served, batch_ratio, confidence, above))
    return np.where(np.isfinite(out), out, 1.0)  # no number is no bound: 1 is the one always true


def select(sims: np.ndarray, labels: np.ndarray, epsilon: float, confidence: float = 0.95,
           method: str = "scan", bound: str = "rate", batch_ratio: Optional[float] = None) -> Selection:
    """The lowest threshold whose false-hit upper bound is <= epsilon (see the module doc for `method` and
    `bound`). realized / audit need batch_ratio: the future batch's size relative to the calibration set."""
    check_inputs(sims, labels, epsilon, confidence, "calibration pairs")
    c = curve(sims, labels)
    # Bounds above `above` are not computed exactly (the realized bound's cost grows with the batch); widen it
    # until some threshold is under it, so the lowest bound (best_bound: what is achievable) is exact.
    above = epsilon
    ub = bounds(c.false_hits, c.served, confidence, bound, batch_ratio, above=above)
    while not (ub <= above).any() and above < 1:
        above = min(1.0, 2 * above)
        ub = bounds(c.false_hits, c.served, confidence, bound, batch_ratio, above=above)
    best = int(np.argmin(ub))
    if method == "scan":
        ok = np.nonzero(ub <= epsilon)[0]
        chosen, tested = (int(ok[-1]) if len(ok) else None), len(ub)
    elif method == "grid":
        grid = grid_indices(c.served)
        ok = grid[ub[grid] <= epsilon]
        chosen, tested = (int(ok[-1]) if len(ok) else None), len(grid)
    elif method == "fixed_sequence":
        first = int(np.searchsorted(c.served, start_count(epsilon, confidence, c.n, bound, batch_ratio)))
        fails = np.nonzero(ub[first:] > epsilon)[0]
        stop = first + (int(fails[0]) if len(fails) else len(ub) - first)  # index of the first failing test
        chosen, tested = (stop - 1 if stop > first else None), min(stop + 1, len(ub)) - first
    else:
        raise OptkitError(f"cache.selection must be one of {', '.join(SELECTIONS)}, got '{method}'")
    common = dict(epsilon=epsilon, confidence=confidence, n=c.n, best_bound=float(ub[best]),
                  best_bound_threshold=float(c.thresholds[best]), tested=int(tested))
    if chosen is None:
        return Selection(False, None, served=0, false_hits=0, fhr=None, bound=None, hit_rate=0.0, recall=0.0,
                         **common)
    i = chosen
    return Selection(True, float(c.thresholds[i]), served=int(c.served[i]), false_hits=int(c.false_hits[i]),
                     fhr=float(c.fhr[i]), bound=float(ub[i]), hit_rate=float(c.hit_rate[i]),
                     recall=float(c.recall[i]), **common)


def grid_indices(served: np.ndarray, log_step: float = GRID_LOG_STEP) -> np.ndarray:
    """Indices of the thresholds `grid` selection tests: the first whose served count reaches each point of a
    geometric grid (factor exp(log_step)). The grid depends on counts only, never on labels."""
    targets = np.unique(np.ceil(np.exp(np.arange(0, np.log(max(served[-1], 1)) + log_step, log_step))))
    return np.unique(np.minimum(np.searchsorted(served, targets), len(served) - 1))


def evaluate(sims: np.ndarray, labels: np.ndarray, threshold: Optional[float], confidence: float = 0.95) -> dict:
    """Realized rates of a fixed threshold on other pairs (None = nothing served)."""
    sims = np.asarray(sims, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    served_mask = sims >= threshold if threshold is not None else np.zeros(len(sims), bool)
    return rates(served_mask, labels, confidence)


def rates(served_mask: np.ndarray, labels: np.ndarray, confidence: float = 0.95) -> dict:
    served = int(served_mask.sum())
    false = int(((labels == 0) & served_mask).sum())
    positives = int((labels == 1).sum())
    lo, hi = interval(false, served)
    return {"n": int(len(labels)), "served": served, "false_hits": false,
            "fhr": false / served if served else 0.0, "fhr_ci95": [lo, hi],
            "fhr_upper": float(upper_bound(false, served, confidence)),
            "hit_rate": served / len(labels) if len(labels) else 0.0,
            "recall": (served - false) / positives if positives else 0.0}


def f1_threshold(sims: np.ndarray, labels: np.ndarray) -> float:
    """The F1-maximizing threshold (what RedisVL's optimizer picks), reported only as a reference."""
    c = curve(sims, labels)
    tp = c.served - c.false_hits
    f1 = 2 * tp / (c.served + c.positives)
    return float(c.thresholds[int(np.argmax(f1))])


def hindsight_best(sims: np.ndarray, labels: np.ndarray, max_fhr: float) -> dict:
    """The best single static threshold chosen knowing the labels: max hit rate with realized FHR <= max_fhr."""
    c = curve(sims, labels)
    ok = np.nonzero(c.fhr <= max_fhr + 1e-12)[0]
    if not len(ok):
        return {"threshold": None, "hit_rate": 0.0, "fhr": 0.0}
    i = ok[np.argmax(c.served[ok])]
    return {"threshold": float(c.thresholds[i]), "hit_rate": float(c.hit_rate[i]), "fhr": float(c.fhr[i])}


def bootstrap_threshold(sims: np.ndarray, labels: np.ndarray, epsilon: float, confidence: float,
                        method: str = "scan", bound: str = "rate", batch_ratio: Optional[float] = None,
                        rounds: int = 200,
                        seed: int = 0) -> Optional[list[float]]:
    """95% percentile interval of the selected threshold over bootstrap resamples of the calibration pairs
    (how much the threshold itself would move with other calibration data). None if mostly infeasible."""
    rng = np.random.default_rng(seed)
    sims = np.asarray(sims)
    labels = np.asarray(labels)
    picks = []
    for _ in range(rounds):
        idx = rng.integers(0, len(sims), len(sims))
        if len(np.unique(labels[idx])) < 2:
            continue
        sel = select(sims[idx], labels[idx], epsilon, confidence, method, bound, batch_ratio)
        if sel.feasible:
            picks.append(sel.threshold)
    if len(picks) < rounds / 2:
        return None
    return [float(np.percentile(picks, 2.5)), float(np.percentile(picks, 97.5))]


def curve_table(sims: np.ndarray, labels: np.ndarray, confidence: float, points: int = 101) -> dict:
    """Precision / recall / hit rate / FHR and its upper bound on an even threshold grid (for plots and logs)."""
    sims = np.asarray(sims, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    lo, hi = float(np.floor(sims.min() * 100) / 100), float(np.ceil(sims.max() * 100) / 100)
    grid = np.linspace(lo, hi, points)
    served = (sims[None, :] >= grid[:, None])
    n_served = served.sum(1)
    false = (served & (labels[None, :] == 0)).sum(1)
    positives = max(int(labels.sum()), 1)
    fhr = np.where(n_served > 0, false / np.maximum(n_served, 1), 0.0)
    return {"threshold": grid.tolist(), "precision": (1 - fhr).tolist(), "fhr": fhr.tolist(),
            "fhr_upper": upper_bound(false, n_served, confidence).tolist(),
            "recall": ((n_served - false) / positives).tolist(), "hit_rate": (n_served / len(sims)).tolist()}
