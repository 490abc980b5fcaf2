"""logreg: one L2 logistic regression per model on the scaled features (head "linear").

Soft labels: each row appears once as positive with weight s and once as negative with weight 1 - s (the exact
soft-label log loss), so graded scores (F1, judge grades) train it as well as 0/1 correctness.
"""

from __future__ import annotations

import numpy as np

HEAD = "linear"
TENSORS = {"coef": ("dim", "M"), "intercept": ("M",)}
# L2 penalty on the mean training loss, chosen on MMLU routing labels (eval/bench_route.py): routing labels are
# noisy, so the model wants strong regularization.
L2 = 1.0


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def logit(p):
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def predict(w: dict, x: np.ndarray, emb: np.ndarray) -> np.ndarray:
    return sigmoid(x @ w["coef"] + w["intercept"])


def fit(x: np.ndarray, emb: np.ndarray, S: np.ndarray, cfg, seed: int) -> dict:
    from sklearn.linear_model import LogisticRegression

    n, d = x.shape
    l2 = cfg.l2 if cfg.l2 is not None else L2
    coef = np.zeros((d, S.shape[1]), dtype=np.float32)
    intercept = np.zeros(S.shape[1], dtype=np.float32)
    xx = np.concatenate([x, x])
    yy = np.concatenate([np.ones(n), np.zeros(n)])
    for m in range(S.shape[1]):
        s = S[:, m]
        if s.min() == s.max():  # a model that is always right (or wrong): its quality is a constant
            intercept[m] = logit(float(s[0]))
            continue
        # l2 is the penalty on the mean loss; sklearn's C weighs the summed loss, hence the 1 / n
        clf = LogisticRegression(C=1.0 / (l2 * n), max_iter=2000, random_state=seed)
        clf.fit(xx, yy, sample_weight=np.concatenate([s, 1 - s]))
        coef[:, m] = clf.coef_[0]
        intercept[m] = clf.intercept_[0]
    return {"coef": coef, "intercept": intercept}
