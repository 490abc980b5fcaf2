"""mf: matrix factorization. Quality logit of model m on prompt x = (x @ proj) . model_emb[m] + bias[m], trained
full-batch with soft-label BCE (RouteLLM's MF router, with per-model scores instead of pairwise preferences, so
it extends to N models)."""

from __future__ import annotations

import numpy as np

from toolkit.route.routers.logreg import sigmoid

HEAD = "mf"
TENSORS = {"proj": ("dim", "H"), "model_emb": ("M", "H"), "bias": ("M",)}
L2 = 1e-2  # chosen on MMLU routing labels (eval/bench_route.py)


def predict(w: dict, x: np.ndarray, emb: np.ndarray) -> np.ndarray:
    return sigmoid((x @ w["proj"]) @ w["model_emb"].T + w["bias"])


def fit(x: np.ndarray, emb: np.ndarray, S: np.ndarray, cfg, seed: int) -> dict:
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
    l2 = cfg.l2 if cfg.l2 is not None else L2
    for _ in range(300):
        opt.zero_grad()
        loss = loss_fn((xt @ proj) @ model_emb.T + bias, st) + l2 * (proj.square().sum() + model_emb.square().sum())
        loss.backward()
        opt.step()
    return {"proj": proj.detach().numpy(), "model_emb": model_emb.detach().numpy(), "bias": bias.detach().numpy()}
