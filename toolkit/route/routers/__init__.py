"""Router models: name -> (module, one-line description). Adding a router model = one module + one line here.

A router module (logreg.py is the model to copy) holds everything about its model:
  HEAD             router.json's "head": the name of its numpy predictor (models that write the same tensors and
                   predict the same way, e.g. logreg and the length baseline, share a head)
  TENSORS          head tensor (without "head.") -> symbolic shape: dim = scaled feature width, E = embedding
                   width, M = models; any other letter is free but must agree across the tensors
  INTEGER_TENSORS  (optional) the tensors of an integer dtype; the others are finite floats
  fit(x, emb, S, cfg, seed) -> {tensor: array}   training side: sklearn / torch imported inside fit only
  predict(w, x, emb) -> P [n, M] in [0, 1]          numpy only (the gateway runs it): each model's quality
  check(w)         (optional) raise ValueError on weights the shapes cannot catch (ranges)
  L2               (optional) default of route.l2 for this model (see toolkit.route.models.l2_of)
  NEEDS_TEXT       (optional) True when the model reads the text features (left out when route.text_features
                   is off)
`x` is the scaled feature matrix [n, dim] (embedding, then text features), `emb` the unit embeddings [n, E],
`S` the per-model scores [n, M] in [0, 1] (soft labels allowed), `cfg` the RouteConfig.

This file imports nothing: toolkit.config builds the recipe's choices (route.model, route.select) from these
names without numpy, and the runtime imports only the module of the router it loads.
"""

from __future__ import annotations

import importlib

# Learned router models: route.model and route.select choices.
ROUTERS: dict[str, tuple[str, str]] = {
    "logreg": ("toolkit.route.routers.logreg", "one logistic regression per model"),
    "mlp": ("toolkit.route.routers.mlp", "small multi-output MLP"),
    "knn": ("toolkit.route.routers.knn", "mean scores of the k nearest labeled prompts"),
    "mf": ("toolkit.route.routers.mf", "matrix factorization (prompt projection x learned model embeddings)"),
}

# Baselines: route.select choices only; exported when no learned router beats them (toolkit.route.select).
BASELINES: dict[str, tuple[str, str]] = {
    "length": ("toolkit.route.routers.length", "prompt length alone"),
    "constant": ("toolkit.route.routers.constant", "no routing signal: always strong or always weak after "
                 "calibration"),
}


def names() -> list[str]:
    """Every router model and baseline name, learned models first."""
    return [*ROUTERS, *BASELINES]


def describe(table: dict[str, tuple[str, str]]) -> str:
    return "; ".join(f"{name} = {desc}" for name, (_, desc) in table.items())


def load(name: str):
    """The module of a router model or baseline (read from the live tables: a name registered later counts)."""
    entry = ROUTERS.get(name) or BASELINES.get(name)
    if entry is None:
        raise KeyError(f"unknown router model '{name}' (known: {', '.join(names())})")
    return importlib.import_module(entry[0])
