"""The cache's similarity: plain cosine, or a learned per-dimension reweighting of it.

score(q, c) = sum_i w_i q_i c_i for unit vectors q and c, with w >= 0 (w = 1 is the cosine). Fitted on the
calibration pairs by logistic regression (label = the cached answer may be reused) with an L2 pull toward w = 1,
so few pairs leave it near the cosine. Why this form: one embedding dimension can carry topic ("card" vs
"account") while another carries the detail that decides reuse ("lost" vs "arrived"); reweighting lets the
threshold separate the two where one cosine cannot (eval/bench_cache.py --parts bound --learned measures it).
It stays cheap to serve: the query vector times w, dotted with stored unit vectors, so the stores (memory,
Redis) and an inner-product index keep the same unit vectors and only the lookup changes.

The threshold on the learned score is chosen with the same bound as the cosine's, on cross-fitted scores
(each calibration pair scored by a model that never saw it), so the bound is not spent on the fit's optimism.
The fold models' scores run on a slightly different scale than the final metric's (fitted on 4/5 of the pairs,
they sit ~0.01 higher on Banking77), so a threshold copied across served fewer queries than it was certified for;
the cross-fitted scores are first moved onto the final metric's scale (crossfit_shift).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

# Features scaled so that w = 1 gives logits 20 x cosine: a sensible start for the optimizer (cosines of
# reusable and not-reusable pairs differ by ~0.1, i.e. ~2 logits).
TEMPERATURE = 20.0
# Strength of the pull toward the cosine (w = 1). Chosen on CLINC150 / Banking77 / SNIPS pairs at 2,000
# calibration pairs (eval/bench_cache.py --learned); weaker let single dimensions run away on a few pairs.
LAMBDA = 0.3
FOLDS = 5

# (weights or None for the cosine, pair indices) -> (scores, labels, cached rows) of those pairs under w. For
# a pairs file the pairs are fixed; for pairs built from groups the nearest neighbour depends on the metric.
PairFn = Callable[[Optional[np.ndarray], np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def scores(query_vecs: np.ndarray, cached_vecs: np.ndarray, weights: Optional[np.ndarray]) -> np.ndarray:
    """score of each (query, cached) row pair; the cosine when weights is None."""
    q = query_vecs if weights is None else query_vecs * weights
    return np.sum(q * cached_vecs, axis=1).astype(np.float64)


def fit(query_vecs: np.ndarray, cached_vecs: np.ndarray, labels: np.ndarray, lam: float = LAMBDA) -> np.ndarray:
    """w >= 0 of the reweighted cosine, by L-BFGS-B on the penalized logistic loss."""
    from scipy.optimize import minimize

    feats = (query_vecs * cached_vecs).astype(np.float64) * TEMPERATURE
    y = labels.astype(np.float64)
    d = feats.shape[1]

    def loss(p):
        w, b = p[:d], p[d]
        z = feats @ w + b
        g = 1.0 / (1.0 + np.exp(-z)) - y
        return (float(np.sum(np.logaddexp(0.0, z) - y * z) + lam * np.sum((w - 1.0) ** 2)),
                np.append(feats.T @ g + 2 * lam * (w - 1.0), g.sum()))

    res = minimize(loss, np.append(np.ones(d), 0.0), jac=True, method="L-BFGS-B",
                   bounds=[(0.0, None)] * d + [(None, None)], options={"maxiter": 200})
    return res.x[:d].astype(np.float32)


def crossfit_shift(crossfit_scores: np.ndarray, final_scores: np.ndarray, threshold: Optional[float]) -> float:
    """How much higher the cross-fitted scores of the calibration pairs run than the final metric's scores of the
    same pairs, where the threshold operates: `threshold` (chosen on the cross-fitted scores) minus the final score
    that serves as many calibration pairs. Subtracted from the cross-fitted scores, the threshold serves under the
    final metric the share of queries it was certified for. The gap is not constant along the curve (measured at
    one point, not averaged, so a high threshold is not moved by the middle's gap). No threshold (nothing
    certified): the median gap over the 5%..95% quantiles. The final scores are in-sample, but only their
    distribution is used, never their labels: the fit separates labels, it barely moves the marginal (held-out
    pairs under the final metric have the same quantiles within ~0.01 on Banking77 and SNIPS)."""
    if threshold is None:
        levels = np.linspace(0.05, 0.95, 19)
        return float(np.median(np.quantile(crossfit_scores, levels) - np.quantile(final_scores, levels)))
    served = int((np.asarray(crossfit_scores) >= threshold).sum())
    if served == 0:
        return 0.0
    return float(threshold - np.sort(final_scores)[::-1][served - 1])


def crossfit(query_vecs: np.ndarray, cached_vecs: np.ndarray, labels: np.ndarray, rows: np.ndarray,
             pair_fn: PairFn, seed: int, folds: int = FOLDS,
             groups: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Out-of-fold (scores, labels, cached rows) of the pairs `rows`: each fold paired and scored by weights
    fitted on the other folds' pairs (their cosine pairs: what the data gives before any metric exists).
    `groups` (pairs.mirror_groups of `rows`): a pair and its mirror fall in one fold."""
    from toolkit.cache.pairs import fold_ids

    units = len(rows) if groups is None else len(np.unique(groups))
    if units < 2:
        groups, units = None, len(rows)  # one pair and its mirror: nothing to keep apart
    folds = max(2, min(folds, units))  # a handful of pairs: fewer folds, never an empty one
    rng = np.random.default_rng(seed)
    if groups is None:
        parts = np.array_split(rng.permutation(len(rows)), folds)
    else:
        fold = fold_ids(len(rows), folds, rng, groups)
        parts = [np.flatnonzero(fold == k) for k in range(folds)]
    s, y, c = np.empty(len(rows)), np.empty(len(rows), np.int64), np.empty(len(rows), np.int64)
    for k, part in enumerate(parts):
        train = rows[np.concatenate([p for j, p in enumerate(parts) if j != k])]
        w = fit(query_vecs[train], cached_vecs[train], labels[train])
        s[part], y[part], c[part] = pair_fn(w, rows[part])
    return s, y, c
