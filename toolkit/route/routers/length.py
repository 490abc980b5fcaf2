"""length baseline: a logistic regression of each model's quality on the prompt's log length alone (the length
heuristic, with its direction learned). Written as a linear head (zero weight on every other feature), so the
runtime needs nothing new."""

from __future__ import annotations

import numpy as np

from toolkit.route.routers import logreg

HEAD, TENSORS, predict = logreg.HEAD, logreg.TENSORS, logreg.predict
NEEDS_TEXT = True  # reads the log-length text feature


def length_column(emb: np.ndarray) -> int:
    """Index of the log-length text feature in the scaled feature matrix (embedding first, then text)."""
    from toolkit.route.runtime import TEXT_FEATURES

    return emb.shape[1] + TEXT_FEATURES.index("log_chars")


def fit(x: np.ndarray, emb: np.ndarray, S: np.ndarray, cfg, seed: int) -> dict:
    col = length_column(emb)
    w = logreg.fit(x[:, [col]], emb, S, cfg, seed)
    coef = np.zeros((x.shape[1], S.shape[1]), np.float32)
    coef[col] = w["coef"][0]
    return {"coef": coef, "intercept": w["intercept"]}
