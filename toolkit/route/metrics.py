"""Routing metrics on held-out data (numpy only), following RouteLLM (Ong et al., 2024, arXiv:2406.18665):

- the curve: quality of the routed system vs the fraction of calls sent to the strong model (with more than
  two models: vs the mean normalized cost, cheapest = 0, strong = 1);
- PGR(x) = (quality(x) - weak) / (strong - weak), the performance gap recovered;
- APGR = the area under PGR over x in [0, 1] (RouteLLM integrates with the trapezoid rule over 10 threshold
  quantiles; we use every distinct threshold, which is the same quantity measured finer);
- CPT(p) = the smallest fraction of strong calls whose quality reaches weak + p * (strong - weak)
  (RouteLLM interpolates linearly between curve points; we take the first crossing, which is well defined
  when the curve is not monotone).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from toolkit.route.runtime import decide


def curve_two(score: np.ndarray, weak: np.ndarray, strong: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact curve of a two-model router: (strong fraction, mean quality) at every distinct threshold.
    Prompts are sent to the strong model in decreasing score order; tied scores move together, so the
    straight segment between tie boundaries is the expected curve under random tie-breaking."""
    n = len(score)
    order = np.argsort(-score, kind="stable")
    gain = (strong - weak)[order]
    cum = np.concatenate([[0.0], np.cumsum(gain)])
    sorted_scores = score[order]
    # indices k where the first k prompts are strong and k falls on a tie boundary
    bounds = np.flatnonzero(np.diff(sorted_scores) != 0) + 1
    ks = np.concatenate([[0], bounds, [n]])
    return ks / n, (weak.sum() + cum[ks]) / n


def curve_multi(P: np.ndarray, S: np.ndarray, cost_norm: np.ndarray, grid: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Curve of an N-model router: (mean normalized cost, mean quality) over a sweep of thresholds."""
    pairs = [(P[:, a] - P[:, b]) / (cost_norm[a] - cost_norm[b])
             for a in range(P.shape[1]) for b in range(P.shape[1]) if cost_norm[a] > cost_norm[b]]
    ratios = np.concatenate(pairs) if pairs else np.zeros(1)
    lams = np.concatenate([[ratios.min() - 1], np.quantile(ratios, np.linspace(0, 1, grid)), [ratios.max() + 1]])
    xs, qs = [], []
    rows = np.arange(len(P))
    for lam in lams:
        choice = decide(P, cost_norm, lam)
        xs.append(cost_norm[choice].mean())
        qs.append(S[rows, choice].mean())
    order = np.argsort(xs, kind="stable")
    return np.asarray(xs)[order], np.asarray(qs)[order]


def apgr(xs: np.ndarray, qs: np.ndarray, weak_q: float, strong_q: float) -> float:
    """Average performance gap recovered: area under PGR over cost in [0, 1]."""
    if strong_q == weak_q:
        return float("nan")
    xs, qs = _span(xs, qs, weak_q, strong_q)
    return float((np.trapezoid(qs, xs) - weak_q) / (strong_q - weak_q))


def _span(xs: np.ndarray, qs: np.ndarray, weak_q: float, strong_q: float) -> tuple[np.ndarray, np.ndarray]:
    # A curve that does not reach x = 0 or x = 1 is extended by the single-model end points.
    if xs[0] > 0:
        xs, qs = np.concatenate([[0.0], xs]), np.concatenate([[weak_q], qs])
    if xs[-1] < 1:
        xs, qs = np.concatenate([xs, [1.0]]), np.concatenate([qs, [strong_q]])
    return xs, qs


def cost_to_reach(xs: np.ndarray, qs: np.ndarray, target: float) -> Optional[float]:
    """Smallest x at which the curve first reaches `target` (linear between points); None if never."""
    hit = np.flatnonzero(qs >= target - 1e-12)
    if not len(hit):
        return None
    i = hit[0]
    if i == 0:
        return float(xs[0])
    x0, x1, q0, q1 = xs[i - 1], xs[i], qs[i - 1], qs[i]
    return float(x0 + (target - q0) / (q1 - q0) * (x1 - x0))


def cpt(xs: np.ndarray, qs: np.ndarray, weak_q: float, strong_q: float, p: float) -> Optional[float]:
    """Call-performance threshold: strong-call fraction needed to recover p of the weak-strong gap."""
    xs, qs = _span(xs, qs, weak_q, strong_q)
    return cost_to_reach(xs, qs, weak_q + p * (strong_q - weak_q))


def summarize(xs: np.ndarray, qs: np.ndarray, weak_q: float, strong_q: float,
              min_quality: Optional[float]) -> dict:
    """APGR, CPT(50%), CPT(80%) and (with a quality goal) the cost at which quality >= goal * strong."""
    out = {"apgr": apgr(xs, qs, weak_q, strong_q), "cpt50": cpt(xs, qs, weak_q, strong_q, 0.5),
           "cpt80": cpt(xs, qs, weak_q, strong_q, 0.8)}
    if min_quality is not None:
        sx, sq = _span(xs, qs, weak_q, strong_q)
        out["cost_at_target"] = cost_to_reach(sx, sq, min_quality * strong_q)
    return out


def bootstrap_guarantee(routed: np.ndarray, strong: np.ndarray, min_quality: float, resamples: int,
                        seed: int) -> dict:
    """Fraction of bootstrap resamples of held-out prompts on which the routed quality stays >= the goal
    (quality relative to always-strong on the same resample)."""
    n = len(routed)
    if n == 0:  # nothing held out: no evidence either way (it read "holds on 100% of resamples")
        return {"resamples": 0, "holds_fraction": None, "ratio_p05": None, "ratio_median": None}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    r, s = routed[idx].sum(1), strong[idx].sum(1)
    ratio = np.divide(r, s, out=np.ones_like(r), where=s > 0)
    # Compare sums, not a ratio of means: with 0/1 scores a resample often meets the goal exactly (27 of 30 at
    # 0.9), and the rounded ratio of two means can land just below it. The slack is far below one score unit.
    holds = r >= min_quality * s - 1e-9 * n
    return {"resamples": resamples, "holds_fraction": float(holds.mean()),
            "ratio_p05": float(np.quantile(ratio, 0.05)), "ratio_median": float(np.median(ratio))}
