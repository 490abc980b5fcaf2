"""Per-cluster thresholds: the idea of vCache (Schroeder et al., 2025: a threshold per cached entry, learned
from how similarity relates to correctness around that entry), implemented here from the idea, per region of
embedding space instead of per entry, and calibrated offline with the same bound as the global threshold.

1. Cluster the cached queries' embeddings (k-means on unit vectors; a runtime entry's cluster is its nearest
   centroid by cosine).
2. Model P(reusable | similarity, cluster) with one logistic regression whose per-cluster intercept/slope offsets
   are L2-shrunk toward a shared curve (small clusters borrow strength from the rest).
3. Serving "when the modelled P(reusable) >= tau" is a one-parameter policy: for each cluster it is a
   similarity threshold t_c(tau). tau is chosen with the same selection and bound (rate / realized / audit) as
   the global threshold, on scores the curves were not fit on: by default cross-fitted (fit on each half of the
   calibration pairs, score the other half), optionally fit on one half and certified on the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from toolkit.cache import tune
from toolkit.cache.runtime import l2_normalize


@dataclass
class ClusterModel:
    centroids: np.ndarray  # [K, dim], unit rows
    intercepts: np.ndarray  # [K] logit at standardized similarity 0
    slopes: np.ndarray  # [K] logit per standardized similarity unit
    mean: float  # similarity standardization
    std: float

    def assign(self, vecs: np.ndarray) -> np.ndarray:
        return np.argmax(l2_normalize(vecs) @ self.centroids.T, axis=1)

    def score(self, sims: np.ndarray, clusters: np.ndarray) -> np.ndarray:
        """Modelled P(reusable); -inf where a cluster's curve does not rise with similarity (never served)."""
        z = (np.asarray(sims) - self.mean) / self.std
        slope = self.slopes[clusters]
        p = 1 / (1 + np.exp(-(self.intercepts[clusters] + slope * z)))
        return np.where(slope > 0, p, -np.inf)

    def thresholds(self, tau: float, limit: float = 1.0) -> list[Optional[float]]:
        """Per-cluster similarity thresholds equivalent to 'score >= tau' (None = the cluster never serves).
        limit: the similarity's range is [-limit, limit] (1 for the cosine, the largest weight of a learned one)."""
        logit = np.log(tau / (1 - tau)) if 0 < tau < 1 else (np.inf if tau >= 1 else -np.inf)
        out = []
        for a, b in zip(self.intercepts, self.slopes):
            t = float(self.mean + self.std * (logit - a) / b) if b > 0 and np.isfinite(logit) else None
            # A flat curve puts the threshold past the similarity's range: above it nothing is served (None),
            # below it everything is (-limit). cache.json accepts only that range.
            out.append(None if t is None or t > limit else max(t, -limit))
        return out


def default_clusters(n_fit: int) -> int:
    return int(np.clip(n_fit // 150, 2, 32))


class Unfit(ValueError):
    """Too few pairs, or one label class, to fit per-cluster curves."""


def fit(sims: np.ndarray, labels: np.ndarray, cached_vecs: np.ndarray, k: int, seed: int = 0) -> ClusterModel:
    from sklearn.cluster import KMeans
    from sklearn.linear_model import LogisticRegression

    if len(sims) < k:
        raise Unfit(f"{len(sims)} pairs cannot be split into {k} clusters")
    if len(np.unique(labels)) < 2:
        raise Unfit(f"all {len(sims)} pairs have one label")

    vecs = l2_normalize(cached_vecs)
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(vecs)
    centroids = l2_normalize(km.cluster_centers_)
    clusters = np.argmax(vecs @ centroids.T, axis=1)
    mean, std = float(np.mean(sims)), float(np.std(sims) or 1.0)
    z = (np.asarray(sims) - mean) / std
    onehot = np.eye(k)[clusters]
    # Shared intercept + slope, plus per-cluster offsets; the L2 penalty pulls offsets toward the shared curve.
    features = np.column_stack([z, onehot, onehot * z[:, None]])
    lr = LogisticRegression(C=1.0, max_iter=2000).fit(features, labels)
    w = lr.coef_[0]
    return ClusterModel(centroids, lr.intercept_[0] + w[1:k + 1], w[0] + w[k + 1:], mean, std)


@dataclass
class AdaptiveResult:
    model: ClusterModel
    selection: tune.Selection  # on the certify half, in score units (tau)
    thresholds: list[Optional[float]]  # per cluster, similarity units
    fit_pairs: int
    certify_pairs: int

    def served(self, sims: np.ndarray, cached_vecs: np.ndarray) -> np.ndarray:
        if not self.selection.feasible:
            return np.zeros(len(sims), bool)
        t = np.array([np.inf if x is None else x for x in self.thresholds])
        return np.asarray(sims) >= t[self.model.assign(cached_vecs)]

    def export(self) -> dict:
        return {"kind": "cluster", "clusters": int(len(self.thresholds)), "tau": self.selection.threshold,
                "thresholds": self.thresholds, "centroids": np.round(self.model.centroids, 5).tolist(),
                "fit_pairs": self.fit_pairs, "certify_pairs": self.certify_pairs,
                "certify": self.selection.to_dict()}


def calibrate(sims: np.ndarray, labels: np.ndarray, cached_vecs: np.ndarray, epsilon: float, confidence: float,
              k: Optional[int] = None, seed: int = 0, method: str = "scan", bound: str = "rate",
              batch_ratio: Optional[float] = None, crossfit: bool = True, limit: float = 1.0,
              groups: Optional[np.ndarray] = None) -> AdaptiveResult:
    """Per-cluster curves and one tau, chosen with the same kind of bound as the global threshold. batch_ratio is
    relative to the whole calibration set.

    crossfit (default): fit on each half and score the other, choose tau on all the out-of-fold scores (twice the
    pairs behind the bound), then serve with curves fit on all pairs. The served curves are not exactly the ones
    that were certified, so the bound is approximate (cross-conformal style); measured in eval/bench_cache.py
    against crossfit=False (fit on one half, certify on the other: exact, but half the pairs behind the bound,
    which costs hits). `groups` (pairs.mirror_groups): a pair and its mirror fall in one half."""
    from toolkit.cache.pairs import fold_ids

    sims, labels = np.asarray(sims), np.asarray(labels)
    rng = np.random.default_rng(seed)
    if groups is None:
        perm = rng.permutation(len(sims))
        halves = [perm[: len(perm) // 2], perm[len(perm) // 2:]]
    else:
        half = fold_ids(len(sims), 2, rng, groups)
        halves = [np.flatnonzero(half == 0), np.flatnonzero(half == 1)]
        perm = np.concatenate(halves)
    k = k or default_clusters(len(halves[0]))
    if crossfit:
        scores = np.empty(len(sims))
        for fit_idx, out_idx in (halves, halves[::-1]):
            m = fit(sims[fit_idx], labels[fit_idx], cached_vecs[fit_idx], k, seed)
            scores[out_idx] = m.score(sims[out_idx], m.assign(cached_vecs[out_idx]))
        cert_idx, n_fit = perm, len(sims)
        scores = scores[cert_idx]
        model = fit(sims, labels, cached_vecs, k, seed)
    else:
        (fit_idx, cert_idx), n_fit = halves, len(halves[0])
        model = fit(sims[fit_idx], labels[fit_idx], cached_vecs[fit_idx], k, seed)
        scores = model.score(sims[cert_idx], model.assign(cached_vecs[cert_idx]))
    scores = np.where(np.isfinite(scores), scores, -1.0)  # never-served clusters sort below every tau in (0, 1)
    ratio = batch_ratio * len(sims) / len(cert_idx) if batch_ratio else None  # relative to the certified pairs
    sel = tune.select(scores, labels[cert_idx], epsilon, confidence, method, bound, ratio)
    if sel.feasible and sel.threshold <= 0:  # the sequence reached never-served pairs: cap tau inside (0, 1)
        sel.threshold = 1e-9
    thresholds = model.thresholds(sel.threshold, limit) if sel.feasible else [None] * k
    return AdaptiveResult(model, sel, thresholds, n_fit, len(cert_idx))


DECISION_FOLDS = 3


def decide(sims: np.ndarray, labels: np.ndarray, cached_vecs: np.ndarray, epsilon: float, confidence: float,
           k: Optional[int] = None, seed: int = 0, method: str = "scan", bound: str = "rate",
           batch_ratio: Optional[float] = None, folds: int = DECISION_FOLDS, limit: float = 1.0,
           groups: Optional[np.ndarray] = None) -> dict:
    """Should per-cluster thresholds replace the global one? Judged on these (calibration) pairs only, by
    cross-fitting: each fold is served by both policies calibrated on the other folds, and per-cluster wins when
    its out-of-fold hit rate is higher with an out-of-fold false-hit share <= epsilon. Whatever pairs the stage
    then reports as its independent check never enter the decision. batch_ratio is relative to all these pairs
    (the future batch keeps its size when a fold is left out). `groups` (pairs.mirror_groups): a pair and its
    mirror fall in one fold."""
    from toolkit.cache.pairs import fold_ids

    sims, labels = np.asarray(sims), np.asarray(labels)
    fold = fold_ids(len(sims), folds, np.random.default_rng(seed + 1), groups)
    served = {"cluster": np.zeros(len(sims), bool), "global": np.zeros(len(sims), bool)}
    for f in range(folds):
        tr, te = fold != f, fold == f
        if len(np.unique(labels[tr])) < 2:
            return {"exported": False, "reason": f"not exported: fold {f} leaves one label class", "folds": folds}
        ratio = batch_ratio * len(sims) / tr.sum() if batch_ratio else None
        g = tune.select(sims[tr], labels[tr], epsilon, confidence, method, bound, ratio)
        served["global"][te] = sims[te] >= g.threshold if g.feasible else False
        try:
            res = calibrate(sims[tr], labels[tr], cached_vecs[tr], epsilon, confidence, k, seed, method, bound,
                            ratio, limit=limit, groups=None if groups is None else groups[tr])
        except Unfit as exc:
            return {"exported": False, "reason": f"not exported: fold {f}: {exc}", "folds": folds}
        served["cluster"][te] = res.served(sims[te], cached_vecs[te])
    rates = {name: tune.rates(mask, labels, confidence) for name, mask in served.items()}
    better = rates["cluster"]["hit_rate"] > rates["global"]["hit_rate"]
    within = rates["cluster"]["fhr"] <= epsilon
    reason = ("exported: higher cross-fitted hit rate within epsilon on the calibration pairs" if better and within
              else "not exported: " + ("cross-fitted hit rate not above the global threshold's" if not better else
                                       "cross-fitted false-hit share above epsilon"))
    return {"exported": bool(better and within), "reason": reason, "folds": folds, "pairs": int(len(sims)),
            "cluster": rates["cluster"], "global": rates["global"]}
