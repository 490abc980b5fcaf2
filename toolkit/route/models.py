"""Fitting a router model (training side: sklearn / torch, imported inside each model's `fit`).

Each model lives in its own module, registered in toolkit.route.routers: it learns every model's expected
quality per prompt from the per-model scores S [n, M] in [0, 1] and returns plain numpy arrays that its own
numpy `predict` evaluates at serving time. Scores may be soft (F1, judge grades), so classifiers fit soft labels.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from toolkit.route import routers


def fit(name: str, x: np.ndarray, emb: np.ndarray, S: np.ndarray, cfg, seed: int) -> tuple[str, dict]:
    """(head, weights) of router model or baseline `name` fit on (scaled features, unit embeddings, scores)."""
    module = routers.load(name)
    return module.HEAD, module.fit(x, emb, S, cfg, seed)


def predict(name: str, weights: dict, x: np.ndarray, emb: np.ndarray) -> np.ndarray:
    return routers.load(name).predict(weights, x, emb)


class _Fitters(Mapping):
    """FITTERS[name](x, emb, S, cfg, seed) -> (head, weights): a read-only view of the registry (older callers)."""

    def __getitem__(self, name: str):
        if name not in routers.names():
            raise KeyError(name)
        return lambda x, emb, S, cfg, seed: fit(name, x, emb, S, cfg, seed)

    def __iter__(self):
        return iter(routers.names())

    def __len__(self) -> int:
        return len(routers.names())


FITTERS = _Fitters()


def contiguous(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """C-ordered copies: sklearn's coef_ can be Fortran-ordered, and safetensors writes raw memory."""
    return {k: np.ascontiguousarray(v) for k, v in weights.items()}
