"""Never export a router worse than its baselines: choose the router model by cross-validation on the fit part.

Candidates: the configured `route.model`, the learned models in `route.select`, and the baselines of
toolkit.route.routers.BASELINES that can be exported as routers too (linear heads, so the runtime needs nothing
new): `length` (each model's quality from the prompt's log length alone, direction learned) and `constant` (no
routing signal: calibration makes it always-strong or always-weak, the random baseline's end points).
Each candidate is fit on K-1 folds of the fit part and scored by APGR on the held-out fold (the area under the
quality-vs-cost curve, toolkit/route/metrics.py); the highest mean wins, ties to the earlier candidate (the
configured model first). Calibration and test data are never seen here.
"""

from __future__ import annotations

import numpy as np

from toolkit.route import metrics as M
from toolkit.route import routers
from toolkit.route.models import fit, predict


def fit_candidate(name: str, x: np.ndarray, emb: np.ndarray, S: np.ndarray, cfg, seed: int) -> tuple[str, dict]:
    """(head, weights) of one candidate (a router model or a baseline of toolkit.route.routers) fit on (x, emb, S)."""
    return fit(name, x, emb, S, cfg, seed)


def candidates(cfg) -> list[str]:
    names = [cfg.model] + [c for c in cfg.select if c != cfg.model]
    if not cfg.text_features:  # e.g. the length baseline reads the log-length text feature
        names = [c for c in names if not getattr(routers.load(c), "NEEDS_TEXT", False)]
    return list(dict.fromkeys(names))


def _area(P: np.ndarray, S: np.ndarray, cost_norm: np.ndarray, strong: int) -> tuple[float, float]:
    """(area under the fold's quality curve - weak quality, strong - weak quality), each times the fold size."""
    weak = int(np.argmin(cost_norm))
    wq, sq = float(S[:, weak].mean()), float(S[:, strong].mean())
    if P.shape[1] == 2:
        xs, qs = M.curve_two(P[:, strong] - P[:, 1 - strong], S[:, weak], S[:, strong])
    else:
        xs, qs = M.curve_multi(P, S, cost_norm, grid=100)
    xs, qs = M._span(xs, qs, wq, sq)
    return len(P) * (float(np.trapezoid(qs, xs)) - wq), len(P) * (sq - wq)


def cross_validate(x: np.ndarray, emb: np.ndarray, S: np.ndarray, cost_norm: np.ndarray, strong: int, cfg,
                   seed: int) -> dict:
    """{"chosen", "reason", "cv": {name: {"apgr", "folds", "repeats"}}, "folds", "n"}."""
    names = candidates(cfg)
    if len(names) == 1:
        return {"chosen": names[0], "reason": "route.select is empty: the configured model is exported", "cv": {},
                "folds": 0, "n": int(len(x))}
    n = len(x)
    k = int(min(cfg.cv_folds, max(2, n // 10)))
    repeats = 3 if n <= 2000 else 1  # small fit sets: average over three fold assignments (cheap there)
    cv = {}
    for name in names:
        gained, gap = [], []
        for r in range(repeats):
            fold = np.random.default_rng(seed + r).permutation(n) % k
            for f in range(k):
                tr, te = fold != f, fold == f
                head, w = fit_candidate(name, x[tr], emb[tr], S[tr], cfg, seed)
                P = predict(name, {**w, "weighting": "distance"}, x[te], emb[te])
                a, g = _area(P, S[te], cost_norm, strong)
                gained.append(a)
                gap.append(g)
        # APGR of the pooled folds: gap recovered summed over folds / gap summed over folds (a per-fold ratio
        # is unstable when a small fold's two models score nearly the same). The denominator is the same for
        # every candidate (same folds, same labels), so candidates are ranked by the numerator: the mean quality
        # gained over always-weak across the cost range ("area"), which stays defined when the weak model scores
        # as well as the strong one on the fit part (APGR is then undefined, null).
        defined = sum(gap) > 1e-9 * n * repeats  # not float dust from equal mean scores
        cv[name] = {"apgr": float(sum(gained) / sum(gap)) if defined else None,
                    "area": float(sum(gained) / (n * repeats)), "folds": k, "repeats": repeats}
    ranked = sorted(cv, key=lambda c: -cv[c]["area"])  # stable: ties keep candidate order
    if len({round(v["area"], 12) for v in cv.values()}) == 1:
        return {"chosen": cfg.model, "reason": "cross-validation cannot tell the candidates apart (the models "
                "score the same on the fit part); the configured model is exported", "cv": cv, "folds": k,
                "n": int(n)}
    best = ranked[0]
    metric = "APGR" if cv[best]["apgr"] is not None else "area above always-weak"
    key = "apgr" if metric == "APGR" else "area"
    why = f"highest cross-validated {metric} {cv[best][key]:.3f} ({k} folds x {repeats} of the {n} fit prompts)"
    if len(ranked) > 1:
        why += "; next: " + ", ".join(f"{c} {cv[c][key]:.3f}" for c in ranked[1:])
    if metric != "APGR":
        why += " (APGR undefined: the strong model is no better on average on the fit part)"
    if best in routers.BASELINES:
        why += f". No learned router beat the {best} baseline: the baseline is exported as the router"
    return {"chosen": best, "reason": why, "cv": cv, "folds": k, "n": int(n)}
