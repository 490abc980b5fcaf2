"""constant baseline: no routing signal. Every prompt gets each model's mean training score, so calibration makes
it always-strong or always-weak (the random baseline's end points). A linear head with zero coefficients."""

from __future__ import annotations

import numpy as np

from toolkit.route.routers import logreg

HEAD, TENSORS, predict = logreg.HEAD, logreg.TENSORS, logreg.predict


def fit(x: np.ndarray, emb: np.ndarray, S: np.ndarray, cfg, seed: int) -> dict:
    return {"coef": np.zeros((x.shape[1], S.shape[1]), np.float32),
            "intercept": logreg.logit(S.mean(0)).astype(np.float32)}
