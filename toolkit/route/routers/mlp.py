"""mlp: a one-hidden-layer ReLU MLP regressing all models' scores at once, output clipped to [0, 1]."""

from __future__ import annotations

import numpy as np

HEAD = "mlp"
TENSORS = {"w1": ("dim", "H"), "b1": ("H",), "w2": ("H", "M"), "b2": ("M",)}
L2 = 1.5e-3  # chosen on MMLU routing labels (eval/bench_route.py)


def predict(w: dict, x: np.ndarray, emb: np.ndarray) -> np.ndarray:
    h = np.maximum(x @ w["w1"] + w["b1"], 0.0)
    return np.clip(h @ w["w2"] + w["b2"], 0.0, 1.0)


def fit(x: np.ndarray, emb: np.ndarray, S: np.ndarray, cfg, seed: int) -> dict:
    from sklearn.neural_network import MLPRegressor

    l2 = cfg.l2 if cfg.l2 is not None else L2
    # sklearn divides alpha by n: alpha = l2 * n puts the penalty on the mean loss
    reg = MLPRegressor(hidden_layer_sizes=(cfg.hidden,), alpha=l2 * len(x), early_stopping=len(x) >= 200,
                       max_iter=300, random_state=seed)
    reg.fit(x, S)
    w2, b2 = reg.coefs_[1], reg.intercepts_[1]
    return {"w1": reg.coefs_[0], "b1": reg.intercepts_[0], "w2": w2.reshape(cfg.hidden, S.shape[1]),
            "b2": b2.reshape(S.shape[1])}
