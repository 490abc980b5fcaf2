"""Shift guard: flag prompts unlike the ones the router was trained and calibrated on.

A router's quality promise holds for traffic like its calibration data; on other traffic (an MMLU-trained
router meeting GSM8K word problems) its scores are extrapolations and the promise silently fails. The guard
scores how unlike the router's training prompts a prompt is, twice:
- topic: `1 - mean cosine similarity of the k nearest training embeddings`;
- form (with route.text_features): the Mahalanobis distance of the cheap text features (length, lines,
  digits, question marks...) from the training prompts' (covariance shrunk 10% towards the identity on
  standardized features). Sentence embeddings alone miss a change of form: on MiniLM, GSM8K word problems sit
  *closer* to MMLU training prompts than held-out MMLU prompts do, while their text features are far off.
Each score gets a split-conformal threshold on held-out in-distribution prompts (the calibration part, never
in the reference set): with n held-out scores, the ceil((n + 1)(1 - alpha / J))-th smallest, J = number of
scores. A new prompt exchangeable with the calibration prompts is flagged by one score with probability
<= alpha / J (Vovk et al. 2005; Angelopoulos & Bates 2021), so by any with probability <= alpha: in domain the
guard costs at most `alpha` extra strong calls, while flagged prompts go to the strong model
(`action: strong`) or are only reported (`action: warn`).

Runtime: numpy only. `ShiftGuard.check(prompt, vector)` is the gateway's hook (toolkit/serve/decide.py):
None for an in-distribution prompt, "teacher" (send it to the strong model) or "warn" otherwise.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

METHOD = "knn_distance"


def knn_distance(emb: np.ndarray, keys: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """1 - mean cosine similarity of the k most similar keys (unit vectors), per row of `emb`."""
    emb = np.asarray(emb, dtype=np.float32)
    out = np.empty(len(emb), dtype=np.float64)
    k = min(k, len(keys))
    for start in range(0, len(emb), chunk):
        sims = emb[start:start + chunk] @ keys.T
        top = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:] if k < sims.shape[1] else sims
        out[start:start + chunk] = 1.0 - top.mean(axis=1)
    return out


def conformal_threshold(held: np.ndarray, alpha: float) -> Optional[float]:
    """The ceil((n + 1)(1 - alpha))-th smallest held-out score; None when n is too small to flag anything
    at level alpha (n + 1 < 1 / alpha)."""
    n = len(held)
    rank = math.ceil((n + 1) * (1 - alpha))
    if rank > n:
        return None
    return float(np.sort(held)[rank - 1])


SHRINK = 0.1  # covariance shrinkage of the text-feature score (towards the identity, standardized features)


def _text_stats(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, precision) of raw text features: Mahalanobis on standardized features, shrunk covariance."""
    mean = t.mean(0)
    scale = t.std(0)
    scale[scale < 1e-6] = 1.0
    z = (t - mean) / scale
    cov = (1 - SHRINK) * np.cov(z, rowvar=False) + SHRINK * np.eye(t.shape[1])
    prec = np.linalg.inv(cov) / np.outer(scale, scale)
    return mean.astype(np.float32), ((prec + prec.T) / 2).astype(np.float32)


def mahalanobis(t: np.ndarray, mean: np.ndarray, prec: np.ndarray) -> np.ndarray:
    d = np.asarray(t, dtype=np.float64) - mean
    return np.einsum("ij,jk,ik->i", d, prec.astype(np.float64), d)


def fit_guard(ref_emb: np.ndarray, held_emb: np.ndarray, shift_cfg, seed: int, ref_text: Optional[np.ndarray] = None,
              held_text: Optional[np.ndarray] = None) -> tuple[Optional[dict], dict]:
    """(spec for router.json or None, tensors) from reference (training) and held-out in-distribution
    embeddings (and raw text features, when the router uses them). (None, {}) when the held-out part is too
    small to flag anything at alpha."""
    rng = np.random.default_rng(seed)
    keys = np.asarray(ref_emb, dtype=np.float32)
    if len(keys) > shift_cfg.max_reference:  # bound memory and latency: a uniform subsample of the references
        keys = keys[np.sort(rng.choice(len(keys), shift_cfg.max_reference, replace=False))]
    k = min(shift_cfg.k, len(keys))
    level = shift_cfg.alpha / (2 if ref_text is not None else 1)
    held = knn_distance(held_emb, keys, k)
    thr = conformal_threshold(held, level)
    if thr is None:
        return None, {}
    tensors = {"shift.keys": np.ascontiguousarray(keys)}
    flagged = held > thr
    spec = {"method": METHOD, "k": k, "threshold": thr, "alpha": shift_cfg.alpha, "action": shift_cfg.action,
            "n_reference": int(len(keys)), "n_calibration": int(len(held))}
    if ref_text is not None:
        mean, prec = _text_stats(np.asarray(ref_text, dtype=np.float64))
        held_t = mahalanobis(held_text, mean, prec)
        spec["text_threshold"] = conformal_threshold(held_t, level)
        tensors.update({"shift.text_mean": mean, "shift.text_precision": prec})
        flagged |= held_t > spec["text_threshold"]
    spec["calibration_flagged"] = float(flagged.mean())
    spec["reading"] = ("flag a prompt when 1 - mean cosine similarity of its k nearest training prompts > threshold"
                       + (" or the Mahalanobis distance of its text features > text_threshold" if ref_text is not None
                          else "") + " (split-conformal: <= alpha of in-distribution prompts flagged)")
    return spec, tensors


class ShiftGuard:
    """The runtime guard of a loaded router (`Router.shift_guard`)."""

    def __init__(self, spec: dict, tensors: dict, embed=None):
        self.spec = spec
        self.keys = np.asarray(tensors["shift.keys"], dtype=np.float32)
        self.k = int(spec["k"])
        self.threshold = float(spec["threshold"])
        self.text_threshold = spec.get("text_threshold")
        self.text_mean, self.text_prec = tensors.get("shift.text_mean"), tensors.get("shift.text_precision")
        self.action = spec["action"]
        self._embed = embed  # prompts -> unit embeddings (the router's embedder), used when no vector is given

    def distances(self, prompts, emb: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(topic distance, text-feature distance or None) per prompt."""
        d = knn_distance(np.atleast_2d(emb), self.keys, self.k)
        if self.text_threshold is None:
            return d, None
        from toolkit.route.runtime import text_features

        return d, mahalanobis(text_features(list(prompts)), self.text_mean, self.text_prec)

    def why(self, prompts, emb: np.ndarray) -> list[Optional[str]]:
        """Per prompt: None (in distribution) or why it is flagged."""
        d, t = self.distances(prompts, emb)
        out = []
        for i in range(len(d)):
            parts = []
            if d[i] > self.threshold:
                parts.append(f"topic distance {d[i]:.3f} > {self.threshold:.3f}")
            if t is not None and t[i] > self.text_threshold:
                parts.append(f"text-feature distance {t[i]:.1f} > {self.text_threshold:.1f}")
            out.append(" and ".join(parts) or None)
        return out

    def flags(self, prompts, emb: np.ndarray) -> np.ndarray:
        return np.array([w is not None for w in self.why(prompts, emb)], dtype=bool)

    def check(self, prompt: str, vector: Optional[np.ndarray] = None) -> Optional[str]:
        """None (in distribution), or the action for a flagged prompt: "teacher" (strong model) | "warn"."""
        if vector is None:
            vector = self._embed([prompt])[0]
        if not self.flags([prompt], np.asarray(vector, dtype=np.float32))[0]:
            return None
        return "teacher" if self.action == "strong" else "warn"
