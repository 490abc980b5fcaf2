"""Never export a router worse than its baselines: choose the router model by cross-validation on the fit part.

Candidates: the configured `route.model`, the learned models in `route.select`, and two baselines that can be
exported as routers too (linear heads, so the runtime needs nothing new):
- `length`: a logistic regression of each model's quality on the prompt's log length alone (the length
  heuristic, with its direction learned);
- `constant`: no routing signal (every prompt gets the same score; calibration then makes it always-strong or
  always-weak, the random baseline's end points).
Each candidate is fit on K-1 folds of the fit part and scored by APGR on the held-out fold (the area under the
quality-vs-cost curve, toolkit/route/metrics.py); the highest mean wins, ties to the earlier candidate (the
configured model first). Calibration and test data are never seen here.
"""

from __future__ import annotations

import numpy as np

from toolkit.route import metrics as M
from toolkit.route.models import FITTERS
from toolkit.route.runtime import PREDICTORS, TEXT_FEATURES

BASELINES = ("length", "constant")


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def fit_candidate(name: str, x: np.ndarray, emb: np.ndarray, S: np.ndarray, cfg, seed: int) -> tuple[str, dict]:
    """(head, weights) of one candidate fit on (x, emb, S)."""
    if name == "constant":
        return "linear", {"coef": np.zeros((x.shape[1], S.shape[1]), np.float32),
                          "intercept": _logit(S.mean(0)).astype(np.float32)}
    if name == "length":
        col = length_column(cfg, emb)
        head, w = FITTERS["logreg"](x[:, [col]], emb, S, cfg.model_copy(update={"model": "logreg"}), seed)
        coef = np.zeros((x.shape[1], S.shape[1]), np.float32)
        coef[col] = w["coef"][0]
        return "linear", {"coef": coef, "intercept": w["intercept"]}
    return FITTERS[name](x, emb, S, cfg.model_copy(update={"model": name}), seed)


def length_column(cfg, emb: np.ndarray) -> int:
    """Index of the log-length text feature in the scaled feature matrix (embedding first, then text)."""
    return emb.shape[1] + TEXT_FEATURES.index("log_chars")


def candidates(cfg) -> list[str]:
    names = [cfg.model] + [c for c in cfg.select if c != cfg.model]
    if not cfg.text_features:  # the length baseline reads the log-length text feature
        names = [c for c in names if c != "length"]
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
                P = PREDICTORS[head]({**w, "weighting": "distance"}, x[te], emb[te])
                a, g = _area(P, S[te], cost_norm, strong)
                gained.append(a)
                gap.append(g)
        # APGR of the pooled folds: gap recovered summed over folds / gap summed over folds (a per-fold ratio
        # is unstable when a small fold's two models score nearly the same)
        if sum(gap) > 0:
            cv[name] = {"apgr": float(sum(gained) / sum(gap)), "folds": k, "repeats": repeats}
    if not cv:
        return {"chosen": cfg.model, "reason": "cross-validation undefined (the models score the same on the fit "
                "part); the configured model is exported", "cv": {}, "folds": k, "n": int(n)}
    ranked = sorted(cv, key=lambda c: -cv[c]["apgr"])  # stable: ties keep candidate order
    best = ranked[0]
    why = (f"highest cross-validated APGR {cv[best]['apgr']:.3f} ({k} folds x {repeats} of the {n} fit prompts)")
    if len(ranked) > 1:
        why += "; next: " + ", ".join(f"{c} {cv[c]['apgr']:.3f}" for c in ranked[1:])
    if best in BASELINES:
        why += f". No learned router beat the {best} baseline: the baseline is exported as the router"
    return {"chosen": best, "reason": why, "cv": cv, "folds": k, "n": int(n)}
