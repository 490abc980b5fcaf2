"""The serving-side router: numpy + the embedder, nothing else (no sklearn, no torch of its own).

A router predicts, for every prompt, the quality each model would reach (`P`, shape [n, M]) and picks
the model with the best `P - threshold * normalized_cost` (normalized cost: cheapest = 0, strong = 1).
With two models that is simply "strong when score = P_strong - P_weak >= threshold", so the threshold
is in quality units: the predicted quality gain that is worth one strong call.

Everything the router needs is in two files written by the route stage (or `save_router`):
`router.json` (models, costs, threshold, feature spec, calibration facts) and `router.safetensors`
(feature scaling and the model head's weights). `Router.load` validates both against each other before routing
anything (toolkit/route/spec.py): a damaged file is one OptkitError naming the file and field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from toolkit.errors import OptkitError

ROUTER_JSON = "router.json"
ROUTER_WEIGHTS = "router.safetensors"
FORMAT_VERSION = 1

# ------------------------------------------------------------------------------------------ text features

_CODE = re.compile(r"```|\bdef |\bclass |\breturn\b|[{};]\s*$|#include|\bimport |=>|\bSELECT\b", re.M)
_QWORDS = re.compile(r"\b(what|why|how|which|who|whom|whose|when|where|explain|prove|derive|calculate)\b", re.I)
_MATH = re.compile(r"[=+\-*/^<>∑√π∫]|\\frac|\\sqrt")


def _text_row(text: str) -> list[float]:
    n = max(len(text), 1)
    words = text.split()
    return [
        np.log1p(len(text)),
        np.log1p(len(words)),
        sum(c.isdigit() for c in text) / n,
        len(_MATH.findall(text)) / n * 10,
        float(bool(_CODE.search(text))),
        np.log1p(len(_QWORDS.findall(text))),
        text.count("?") / max(len(words), 1) * 10,
        np.log1p(text.count("\n")),
        sum(c.isupper() for c in text) / n,
        float(any(ord(c) > 127 for c in text)),
    ]


TEXT_FEATURES = ("log_chars", "log_words", "digit_frac", "math_symbols", "has_code", "question_words",
                 "question_marks", "log_lines", "upper_frac", "non_ascii")


def text_features(texts: Sequence[str]) -> np.ndarray:
    """Cheap per-prompt features (float32 [n, len(TEXT_FEATURES)]), unscaled."""
    return np.asarray([_text_row(t) for t in texts], dtype=np.float32).reshape(len(texts), len(TEXT_FEATURES))


# ------------------------------------------------------------------------------------------ model heads
# Each router model's numpy predictor lives in its module (toolkit/route/routers/, registered there); the Router
# imports only the module of the model it loads.


def decide(P: np.ndarray, cost_norm: np.ndarray, threshold: float) -> np.ndarray:
    """Index of the chosen model per row: argmax of P - threshold * cost; ties go to the costlier model
    (so with two models: strong iff P_strong - P_weak >= threshold)."""
    if P.shape[1] == 2 and cost_norm[0] != cost_norm[1]:
        # The calibrated threshold is one of the scores P_s - P_w: compare that same difference, not
        # P_s - threshold >= P_w, which rounds differently (a constant router tied at its threshold went all weak).
        s = int(np.argmax(cost_norm))
        return np.where(P[:, s] - P[:, 1 - s] >= threshold, s, 1 - s)
    order = np.argsort(-cost_norm, kind="stable")  # costliest first: argmax keeps the first maximum
    utility = P[:, order] - threshold * cost_norm[order]
    return order[np.argmax(utility, axis=1)]


# ------------------------------------------------------------------------------------------ static embedder


class StaticEmbedder:
    """Prompt embedding = normalized mean of static token vectors (built by `toolkit.route.static`).
    Needs numpy + the Rust `tokenizers` library only: no torch at serving time."""

    VECTORS, TOKENIZER = "static_embedder.safetensors", "tokenizer.json"

    def __init__(self, directory: str | Path, max_tokens: int = 512):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        directory = Path(directory)
        self.vectors = load_file(str(directory / self.VECTORS))["vectors"].astype(np.float32)
        self.known = np.any(self.vectors != 0, axis=1)  # tokens left out of a partial build are skipped
        self.tokenizer = Tokenizer.from_file(str(directory / self.TOKENIZER))
        self.tokenizer.no_padding()
        self.max_tokens = max_tokens

    def encode(self, texts: Sequence[str], batch_size: int = 64, normalize_embeddings: bool = True,
               convert_to_numpy: bool = True, show_progress_bar: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.vectors.shape[1]), dtype=np.float32)
        for i, enc in enumerate(self.tokenizer.encode_batch(list(texts), add_special_tokens=False)):
            ids = [t for t in enc.ids[:self.max_tokens] if self.known[t]]
            if ids:
                v = self.vectors[ids].mean(0)
                out[i] = v / (np.linalg.norm(v) + 1e-12) if normalize_embeddings else v
        return out


# ------------------------------------------------------------------------------------------ Router


class Router:
    """A trained, calibrated router. `Router.load(dir)`, then `.route(prompt) -> model name`."""

    def __init__(self, spec: dict, weights: dict[str, np.ndarray], embedder=None):
        self.spec = spec
        self.weights = weights
        self.models: list[str] = list(spec["models"])
        self.strong: str = spec["strong"]
        # None while the stage is still calibrating (the router predicts but cannot route yet)
        self.threshold: float = float("nan") if spec.get("threshold") is None else float(spec["threshold"])
        self.costs: dict[str, float] = dict(spec["costs"])
        self._cost_norm = np.asarray(spec["cost_norm"], dtype=np.float64)
        self._head = spec["head"]
        from toolkit.route.routers import load as load_router_model  # numpy-only modules

        self._predict = load_router_model(spec["model"]).predict
        self._head_weights = {k[len("head."):]: v for k, v in weights.items() if k.startswith("head.")}
        self._head_weights["weighting"] = spec.get("knn_weights", "uniform")
        self._embedder = embedder
        self.directory: Optional[Path] = None  # set by load(): static embedders live beside router.json
        self.shift_guard = None  # the gateway's hook: .check(prompt, vector) -> None | "teacher" | "warn"
        if spec.get("shift") and "shift.keys" in weights:
            from toolkit.route.shift import ShiftGuard

            self.shift_guard = ShiftGuard(spec["shift"], weights, self.embed)

    # --- loading

    @classmethod
    def load(cls, path: str | Path, embedder=None) -> "Router":
        """Load from a route stage directory (or the router.json inside it). `embedder`: anything with
        `.encode(list[str]) -> array`; default = the sentence-transformers model named in router.json."""
        path = Path(path)
        directory = path.parent if path.suffix == ".json" else path
        from toolkit.route.spec import read_router  # pydantic: validates both files against each other

        spec, weights = read_router(directory)
        router = cls(spec, weights, embedder)
        router.directory = directory
        return router

    @property
    def embedder(self):
        if self._embedder is None:
            feats = self.spec["features"]
            if feats.get("embedding") == "static":
                self._embedder = StaticEmbedder(self.directory)
                return self._embedder
            from toolkit.models import load_embedder, set_truncation  # sentence-transformers, torch: only here

            embedder = load_embedder(feats["embedder"])
            set_truncation(embedder, feats["max_seq_length"], "router.json features.max_seq_length")
            self._embedder = embedder
        return self._embedder

    # --- features

    def embed(self, prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        emb = self.embedder.encode(list(prompts), batch_size=batch_size, normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)

    def features(self, prompts: Sequence[str], emb: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """(scaled feature matrix, unit embeddings) exactly as the router was trained on."""
        if emb is None:
            emb = self.embed(prompts)
        parts = [emb]
        if self.spec["features"]["text_features"]:
            parts.append(text_features(prompts))
        x = np.concatenate(parts, axis=1) if len(parts) > 1 else emb
        if x.shape[1] != self.weights["feat.mean"].shape[0]:  # another embedder than the one trained with
            raise OptkitError(f"router: the embedder gives {emb.shape[1]}-dim vectors; this router was trained on "
                              f"features.embedder '{self.spec['features']['embedder']}' "
                              f"({self.weights['feat.mean'].shape[0] - x.shape[1] + emb.shape[1]} dims)")
        x = (x - self.weights["feat.mean"]) / self.weights["feat.scale"]
        return x.astype(np.float32), emb

    # --- prediction

    def predict_quality(self, prompts: Sequence[str], emb: Optional[np.ndarray] = None) -> np.ndarray:
        """Predicted quality of every model per prompt: [n, len(models)]."""
        x, emb = self.features(prompts, emb)
        return self.predict_from_features(x, emb)

    def predict_from_features(self, x: np.ndarray, emb: np.ndarray) -> np.ndarray:
        return self._predict(self._head_weights, x, emb)

    def score(self, prompts: Sequence[str], emb: Optional[np.ndarray] = None) -> np.ndarray:
        """Two models: predicted quality gain of the strong model, shape [n] (route strong iff >= threshold).
        More models: the predicted quality matrix [n, M] (columns in `models` order)."""
        P = self.predict_quality(prompts, emb)
        return self._to_score(P)

    def _to_score(self, P: np.ndarray) -> np.ndarray:
        if len(self.models) != 2:
            return P
        s = self.models.index(self.strong)
        return P[:, s] - P[:, 1 - s]

    def route_batch(self, prompts: Sequence[str], threshold: Optional[float] = None,
                    explain: bool = False) -> list:
        """Model name per prompt; `explain=True`: (model, reason) pairs. A prompt the shift guard flags goes
        to the strong model when the guard's action is `strong` (reason "shift: ..."), whatever its score."""
        if not len(prompts):
            return []
        t = self.threshold if threshold is None else float(threshold)
        emb = self.embed(prompts)
        P = self.predict_quality(prompts, emb)
        choice = decide(P, self._cost_norm, t)
        shifted = self.shift_guard.why(prompts, emb) if self.shift_guard is not None else [None] * len(prompts)
        out = []
        for i, c in enumerate(choice):
            model, reason = self.models[c], self._reason(P[i], t)
            if shifted[i] is not None:
                why = f"shift: {shifted[i]} (unlike the training prompts)"
                if self.shift_guard.action == "strong":
                    model, reason = self.strong, why + " -> strong model"
                else:
                    reason = f"{reason}; warning: {why}"
            out.append((model, reason) if explain else model)
        return out

    def _reason(self, p: np.ndarray, t: float) -> str:
        if len(self.models) == 2:
            s = self.models.index(self.strong)
            score = float(p[s] - p[1 - s])
            return f"score {score:.4f} {'>=' if score >= t else '<'} threshold {t:.4f}"
        return f"highest predicted quality - {t:.4g} x normalized cost"

    def route(self, prompt: str, threshold: Optional[float] = None, explain: bool = False):
        """The model for one prompt; `explain=True`: (model, reason)."""
        return self.route_batch([prompt], threshold, explain)[0]

    def __repr__(self) -> str:
        return (f"Router(models={self.models}, strong={self.strong!r}, threshold={self.threshold:.4g}, "
                f"head={self._head!r})")
