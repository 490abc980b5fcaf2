"""knn: memorize the labeled prompts' unit embeddings; predict the (similarity-weighted) mean scores of the k
most similar."""

from __future__ import annotations

import numpy as np

HEAD = "knn"
TENSORS = {"keys": ("K", "E"), "values": ("K", "M"), "k": (1,)}
INTEGER_TENSORS = ("k",)


def check(w: dict) -> None:
    if int(w["k"][0]) < 1:
        raise ValueError(f"head.k: {int(w['k'][0])} neighbours; must be >= 1")
    if np.any((w["values"] < 0) | (w["values"] > 1)):
        raise ValueError("head.values: stored scores must lie in [0, 1]")


def fit(x: np.ndarray, emb: np.ndarray, S: np.ndarray, cfg, seed: int) -> dict:
    # default k: 5 % of the labeled prompts, between 5 and 100 (a local average of the quality gap)
    k = cfg.k if cfg.k is not None else int(np.clip(len(emb) // 20, 5, 100))
    k = min(k, len(emb))
    return {"keys": emb.astype(np.float32), "values": S.astype(np.float32), "k": np.array([k], np.int64)}


def predict(w: dict, x: np.ndarray, emb: np.ndarray) -> np.ndarray:
    # Cosine similarity on unit-norm embeddings; the scores of the k most similar labeled prompts, averaged
    # uniformly (old routers) or weighted by sim_i - sim_(k+1) ("distance": the prediction moves continuously
    # with the prompt, since a neighbour enters or leaves the k with weight 0; scores no longer step by 1/k).
    sims = emb @ w["keys"].T
    k = int(w["k"][0])
    if k >= sims.shape[1]:
        return np.repeat(w["values"].mean(0, keepdims=True), len(x), axis=0)
    if w.get("weighting") != "distance":
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        return w["values"][top].mean(axis=1)
    kk = min(k + 1, sims.shape[1])
    top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
    ts = np.take_along_axis(sims, top, axis=1)
    order = np.argsort(-ts, axis=1)
    top, ts = np.take_along_axis(top, order, axis=1), np.take_along_axis(ts, order, axis=1)
    if kk > k:
        wt = ts[:, :k] - ts[:, k:k + 1] + 1e-6
    else:
        wt = np.ones((len(ts), k))
    wt = wt / wt.sum(axis=1, keepdims=True)
    return np.clip(np.einsum("nk,nkm->nm", wt, w["values"][top[:, :k]]), 0.0, 1.0)
