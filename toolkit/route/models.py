"""Router model fitters (training side: sklearn / torch allowed, imported inside functions).

Every fitter learns each model's expected quality per prompt from the per-model scores S [n, M] in [0, 1]
and returns (head name, weights): plain numpy arrays that `runtime.PREDICTORS[head]` evaluates with numpy
alone. Scores may be soft (F1, judge grades), so the classifiers are fit on soft labels.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return float(np.log(p / (1 - p)))


# Default L2 penalty on the mean training loss per model, chosen on MMLU routing labels (eval/bench_route.py):
# routing labels are noisy, so every model wants strong regularization.
DEFAULT_L2: dict[str, float] = {"logreg": 1.0, "mlp": 1.5e-3, "mf": 1e-2}


def l2_of(cfg) -> float:
    return cfg.l2 if cfg.l2 is not None else DEFAULT_L2[cfg.model]


def fit_logreg(x: np.ndarray, emb: np.ndarray, S: np.ndarray, cfg, seed: int) -> tuple[str, dict]:
    """One L2 logistic regression per model. Soft labels: each row appears once as positive with weight s
    and once as negative with weight 1 - s (the exact soft-label log loss)."""
    from sklearn.linear_model import LogisticRegression

    n, d = x.shape
    coef = np.zeros((d, S.shape[1]), dtype=np.float32)
    intercept = np.zeros(S.shape[1], dtype=np.float32)
    xx = np.concatenate([x, x])
    yy = np.concatenate([np.ones(n), np.zeros(n)])
    for m in range(S.shape[1]):
        s = S[:, m]
        if s.min() == s.max():  # a model that is always right (or wrong): its quality is a constant
            intercept[m] = _logit(float(s[0]))
            continue
        # l2 is the penalty on the mean loss; sklearn's C weighs the summed loss, hence the 1 / n
        clf = LogisticRegression(C=1.0 / (l2_of(cfg) * n), max_iter=2000, random_state=seed)
        clf.fit(xx, yy, sample_weight=np.concatenate([s, 1 - s]))
        coef[:, m] = clf.coef_[0]
        intercept[m] = clf.intercept_[0]
    return "linear", {"coef": coef, "intercept": intercept}


def fit_mlp(x: np.ndarray, emb: np.ndarray, S: np.ndarray, cfg, seed: int) -> tuple[str, dict]:
    """A one-hidden-layer ReLU MLP regressing all models' scores at once (output clipped to [0, 1])."""
    from sklearn.neural_network import MLPRegressor

    # sklearn divides alpha by n: alpha = l2 * n puts the penalty on the mean loss
    reg = MLPRegressor(hidden_layer_sizes=(cfg.hidden,), alpha=l2_of(cfg) * len(x), early_stopping=len(x) >= 200,
                       max_iter=300, random_state=seed)
    reg.fit(x, S)
    w2, b2 = reg.coefs_[1], reg.intercepts_[1]
    return "mlp", {"w1": reg.coefs_[0], "b1": reg.intercepts_[0], "w2": w2.reshape(cfg.hidden, S.shape[1]),
                   "b2": b2.reshape(S.shape[1])}


def fit_knn(x: np.ndarray, emb: np.ndarray, S: np.ndarray, cfg, seed: int) -> tuple[str, dict]:
    """Memorize the labeled prompts' unit embeddings; predict the mean scores of the k most similar."""
    # default k: 5 % of the labeled prompts, between 5 and 100 (a local average of the quality gap)
    k = cfg.k if cfg.k is not None else int(np.clip(len(emb) // 20, 5, 100))
    k = min(k, len(emb))
    return "knn", {"keys": emb.astype(np.float32), "values": S.astype(np.float32), "k": np.array([k], np.int64)}


def fit_mf(x: np.ndarray, emb: np.ndarray, S: np.ndarray, cfg, seed: int) -> tuple[str, dict]:
    """Matrix factorization: quality logit of model m on prompt x = (x @ proj) . model_emb[m] + bias[m],
    trained full-batch with soft-label BCE (RouteLLM's MF router, with per-model scores instead of
    pairwise preferences, so it extends to N models)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    st = torch.from_numpy(np.ascontiguousarray(S, dtype=np.float32))
    d, h, M = x.shape[1], cfg.hidden, S.shape[1]
    proj = torch.nn.Parameter(torch.randn(d, h, generator=g) / np.sqrt(d))
    model_emb = torch.nn.Parameter(torch.randn(M, h, generator=g) / np.sqrt(h))
    bias = torch.nn.Parameter(torch.logit(st.mean(0).clamp(1e-3, 1 - 1e-3)))
    opt = torch.optim.Adam([proj, model_emb, bias], lr=0.01)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    l2 = l2_of(cfg)
    for _ in range(300):
        opt.zero_grad()
        loss = loss_fn((xt @ proj) @ model_emb.T + bias, st) + l2 * (proj.square().sum() + model_emb.square().sum())
        loss.backward()
        opt.step()
    return "mf", {"proj": proj.detach().numpy(), "model_emb": model_emb.detach().numpy(),
                  "bias": bias.detach().numpy()}


# route.model -> fitter(x scaled features, unit embeddings, S [n, M], RouteConfig, seed) -> (head, weights)
FITTERS: dict[str, Callable] = {
    "logreg": fit_logreg,
    "mlp": fit_mlp,
    "knn": fit_knn,
    "mf": fit_mf,
}


def contiguous(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """C-ordered copies: sklearn's coef_ can be Fortran-ordered, and safetensors writes raw memory."""
    return {k: np.ascontiguousarray(v) for k, v in weights.items()}
