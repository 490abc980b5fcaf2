"""A threshold that moves with the query's neighbourhood (cache.adaptive: query).

One similarity threshold is too strict where nearest neighbours are usually reusable (a dense intent) and too
loose where they are not (an out-of-scope region, a topic whose queries differ in one detail). The calibration
pairs say which is which: for a query q, look at its nearest calibration queries and ask how often THEIR nearest
entry was reusable (label rate), and how crowded the region is (mean similarity to them); with cache.query_entry,
also how crowded the region of calibration queries around the entry c it would be served is (an entry many
different queries sit close to is one a near miss lands on). The gate is a logistic score on [s(q, c), those
numbers]; a hit is served when it clears a threshold set with the cache's own bound on cross-fitted gate scores.
The score enters linearly, so the gate is a threshold on the similarity that moves with the query (and entry):

    serve the nearest entry c  iff  s(q, c) >= offset - slopes . [f(q), g(c)]

so retrieval, the stores (memory, Redis) and the ANN index are unchanged; the runtime adds one mat-vec of the query
(and one of the nearest entry) against the calibration queries (a few thousand x dim) per lookup. f and g read a
FIXED reference set -- the calibration queries' unit vectors and labels, shipped beside cache.json -- never what the
cache holds, so the bound's calibration describes the runtime exactly. No feature reads a reference text identical
to the query, and the entry's none identical to the query or the entry (in calibration: the pair's own texts).
Calibration also hides from the label rates what a runtime query could not know (pair_skip); the crowding reads
no label and keeps every other calibration query, as the runtime does.

Measured against issue 15's goal in eval/bench_cache.py --parts bound (policy `query`): see the README.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from toolkit.errors import OptkitError

LABEL_KS = (10, 40)  # neighbours whose label rate is a feature
CROWD_KS = (5, 50)  # neighbours whose mean similarity is a feature
QUERY_FEATURES = tuple(f"label_rate_{k}" for k in LABEL_KS) + tuple(f"crowding_{k}" for k in CROWD_KS)
ENTRY_FEATURES = tuple(f"entry_crowding_{k}" for k in CROWD_KS)
FEATURES = QUERY_FEATURES + ENTRY_FEATURES
FOLDS = 5
SAME_TEXT = 1.0 - 1e-4  # unit vectors this close are the same text (re-embedded elsewhere it may not be exactly 1)
# A query less crowded than this share of the calibration queries is unfamiliar: the gate's slopes were fitted where
# calibration queries live and may extrapolate to a LOWER threshold out there, so such a query gets the global
# threshold when that is stricter (the guard only ever raises a threshold).
SUPPORT_QUANTILE = 0.01
REFERENCE_FILE = "cache-reference.safetensors"
DEFINITION = ("serve the nearest entry c iff s(q, c) >= offset - sum_j slopes_j x_j; x = f(q), or [f(q), g(c)] when "
              "`features` lists the entry's; f(q) = over the reference calibration queries nearest q (identical texts "
              "skipped): the mean label of the 10 and 40 nearest, the mean similarity to the 5 and 50 nearest; g(c) = "
              "the mean similarity of c to its 5 and 50 nearest reference queries (identical texts skipped); a query "
              "with crowding_5 < support gets at least the fallback (the global threshold; null: no semantic hit)")


def features(query_vecs: np.ndarray, ref_vecs: np.ndarray, ref_labels: np.ndarray,
             skip: Optional[np.ndarray] = None, crowd_skip: Optional[np.ndarray] = None) -> np.ndarray:
    """[n, len(QUERY_FEATURES)] neighbourhood features of unit query vectors against the reference set. `skip` /
    `crowd_skip` [n, len(ref)]: reference pairs the label rates / the crowding may not read (see pair_skip)."""
    sims = np.asarray(query_vecs, np.float32) @ np.asarray(ref_vecs, np.float32).T
    return _features(sims, ref_labels, skip, crowd_skip)


def _features(sims: np.ndarray, ref_labels: np.ndarray, skip: Optional[np.ndarray],
              crowd_skip: Optional[np.ndarray]) -> np.ndarray:
    labels = np.asarray(ref_labels, np.float64)
    return np.column_stack([_nearest_means(sims, skip, labels, LABEL_KS, 0.5),
                            _nearest_means(sims, crowd_skip, None, CROWD_KS, 0.0)])


def _nearest_means(sims: np.ndarray, skip: Optional[np.ndarray], values: Optional[np.ndarray], ks: tuple,
                   empty: float) -> np.ndarray:
    """[n, len(ks)]: the mean of `values` (None: of the similarity itself) over each row's ks nearest reference
    rows, identical texts and `skip` left out (`empty` where none is left)."""
    sims = sims.copy()
    sims[sims >= SAME_TEXT] = -np.inf
    if skip is not None:
        sims[skip] = -np.inf
    k = min(max(ks), sims.shape[1])
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else np.argsort(-sims, axis=1)
    top_sims = np.take_along_axis(sims, top, 1)
    order = np.argsort(-top_sims, axis=1)
    top, top_sims = np.take_along_axis(top, order, 1), np.take_along_axis(top_sims, order, 1)
    valid = np.isfinite(top_sims)
    picked = np.where(valid, top_sims if values is None else values[top], 0.0).astype(np.float64)
    cols = []
    for kk in ks:
        n = valid[:, :kk].sum(1)
        cols.append(np.where(n > 0, picked[:, :kk].sum(1) / np.maximum(n, 1), empty))
    return np.stack(cols, 1)


def entry_features(entry_vecs: np.ndarray, ref_vecs: np.ndarray, skip: Optional[np.ndarray] = None) -> np.ndarray:
    """[n, len(ENTRY_FEATURES)]: how crowded each entry's region of reference queries is -- the query features'
    crowding columns, read from the entry. `skip` [n, len(ref)]: Skip.crowding, the pair's own query (whose
    similarity to the entry IS the pair's score) and the entry's own text; at runtime, the reference texts identical
    to the query."""
    sims = np.asarray(entry_vecs, np.float32) @ np.asarray(ref_vecs, np.float32).T
    return _nearest_means(sims, skip, None, CROWD_KS, 0.0)


class Skip(NamedTuple):
    """What pairs scored for the bound may not read (pair_skip): [n, len(ref)] masks for the label rates and for
    the crowding (the query's and the entry's)."""
    labels: np.ndarray
    crowding: np.ndarray


def inputs(scores: np.ndarray, query_vecs: np.ndarray, entry_vecs: Optional[np.ndarray], ref_vecs: np.ndarray,
           ref_labels: np.ndarray, skip: Skip) -> np.ndarray:
    """The gate's inputs [s, f(q), g(c)] of calibration pairs (q, c) with score s; [s, f(q)] when entry_vecs is
    None (the entry's features off: cache.query_entry false)."""
    cols = [scores, features(query_vecs, ref_vecs, ref_labels, skip.labels, skip.crowding)]
    if entry_vecs is not None:
        cols.append(entry_features(entry_vecs, ref_vecs, skip.crowding))
    return np.column_stack(cols)


@dataclass
class Gate:
    """The fitted gate in its runtime form: a threshold on the similarity per query and nearest entry."""
    offset: float
    slopes: np.ndarray  # [len(FEATURES)]: the query's, then the entry's (zeros: the entry's features are off)
    ref_vecs: np.ndarray  # [n, dim] float32 unit vectors of the calibration queries
    ref_labels: np.ndarray  # [n] 0/1
    support: float  # crowding_5 below this = an unfamiliar query (SUPPORT_QUANTILE of the calibration queries')
    fallback: Optional[float]  # the global threshold (None: it serves nothing)
    entry: bool = False  # the entry's features are part of the gate (cache.query_entry)

    def query_part(self, query_vecs: np.ndarray, skip: Optional[Skip] = None) -> tuple:
        """What is known before retrieval: offset - the query's slopes . f(q), whether q is unfamiliar, and which
        reference texts are the query's own (the entry's features skip them, as calibration skips a pair's query;
        None when the gate reads no entry features)."""
        sims = np.asarray(query_vecs, np.float32) @ self.ref_vecs.T
        f = _features(sims, self.ref_labels, *(skip or (None, None)))
        unfamiliar = f[:, QUERY_FEATURES.index(f"crowding_{CROWD_KS[0]}")] < self.support
        own = sims >= SAME_TEXT if self.entry else None  # an [n, len(ref)] mask: only built when it is read
        return self.offset - f @ self.slopes[:len(QUERY_FEATURES)], unfamiliar, own

    def finish(self, part: tuple, entry_vecs: Optional[np.ndarray], skip: Optional[Skip] = None) -> np.ndarray:
        """The thresholds, given query_part and the nearest entries. An unfamiliar query gets at least the fallback:
        the slopes were fitted where calibration queries live and may extrapolate to a LOWER threshold out there."""
        t, unfamiliar, own = part
        if self.entry:
            mask = own if skip is None else own | skip.crowding
            t = t - entry_features(entry_vecs, self.ref_vecs, mask) @ self.slopes[len(QUERY_FEATURES):]
        return np.where(unfamiliar, np.maximum(t, np.inf if self.fallback is None else self.fallback), t)

    def thresholds(self, query_vecs: np.ndarray, entry_vecs: Optional[np.ndarray],
                   skip: Optional[Skip] = None) -> np.ndarray:
        return self.finish(self.query_part(query_vecs, skip), entry_vecs, skip)

    def served(self, scores: np.ndarray, query_vecs: np.ndarray, entry_vecs: Optional[np.ndarray],
               skip: Optional[Skip] = None) -> np.ndarray:
        return np.asarray(scores, np.float64) >= self.thresholds(query_vecs, entry_vecs, skip)


def logistic(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """(w, b) of a standardized L2 logistic regression, folded back so that score = X @ w + b."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = X.mean(0), X.std(0) + 1e-9
    if len(np.unique(y)) < 2:
        raise Unfit("the labels are all equal")
    m = LogisticRegression(C=1.0, max_iter=1000).fit((X - mu) / sd, y)
    w = m.coef_[0] / sd
    return w, float(m.intercept_[0] - (mu * w).sum())


class Unfit(Exception):
    pass


def pair_skip(qids: np.ndarray, cids: np.ndarray, ref_qids: np.ndarray, ref_cids: np.ndarray) -> Skip:
    """The reference pairs a pair (q, c) may not read when it is scored for the bound. The label rates: a reference
    pair whose query is c (its label says whether c's own neighbour was reusable), whose cached text is q, or whose
    cached text is c too (a nearby query's label on this very entry) says something about this pair that a runtime
    query, whose entries are traffic rather than calibration texts, would not know; read, they make the calibration
    and the held-out check optimistic. The crowding reads no labels, so only the reference queries that ARE q or c
    are skipped (q's similarity to c is the pair's score; at runtime neither the query nor, as a rule, the entry is
    a reference text): the queries whose nearest entry was q or c crowd them at runtime too."""
    own = (ref_qids[None, :] == qids[:, None]) | (ref_qids[None, :] == cids[:, None])
    return Skip(own | (ref_cids[None, :] == qids[:, None]) | (ref_cids[None, :] == cids[:, None]), own)


def _fit(scores, qvecs, cvecs, labels, qids, cids) -> tuple[np.ndarray, float, np.ndarray]:
    """Gate weights on the training pairs, their neighbourhood read from the training pairs themselves; and those
    inputs. cvecs None: without the entry's features."""
    x = inputs(scores, qvecs, cvecs, qvecs, labels, pair_skip(qids, cids, qids, cids))
    return (*logistic(x, labels), x)


def crossfit_scores(scores: np.ndarray, qvecs: np.ndarray, cvecs: Optional[np.ndarray], labels: np.ndarray,
                    qids: np.ndarray, cids: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Out-of-fold gate scores of the calibration pairs: each fold's gate fitted, and its neighbourhood read,
    on the other folds only (`fold`: pairs.fold_ids, a pair and its mirror in one fold). qvecs / cvecs: unit
    vectors of each pair's query and cached entry (cvecs None: the entry's features off); qids / cids: their
    text ids."""
    out = np.empty(len(labels))
    for k in np.unique(fold):
        part, rest = fold == k, fold != k
        c_rest, c_part = (None, None) if cvecs is None else (cvecs[rest], cvecs[part])
        w, b, _ = _fit(scores[rest], qvecs[rest], c_rest, labels[rest], qids[rest], cids[rest])
        skip = pair_skip(qids[part], cids[part], qids[rest], cids[rest])
        out[part] = inputs(scores[part], qvecs[part], c_part, qvecs[rest], labels[rest], skip) @ w + b
    return out


def fit(scores: np.ndarray, qvecs: np.ndarray, cvecs: Optional[np.ndarray], labels: np.ndarray, qids: np.ndarray,
        cids: np.ndarray, tau: float, fallback: Optional[float]) -> Gate:
    """The gate on every calibration pair, with its threshold tau (chosen on the cross-fitted scores) folded into
    a per-query threshold on the similarity; `fallback`: the global threshold, for unfamiliar queries. Unfit when
    the similarity's own weight is not positive (the gate would not be a threshold on it)."""
    w, b, x = _fit(scores, qvecs, cvecs, labels, qids, cids)
    if not w[0] > 0:
        raise Unfit(f"the similarity's weight in the gate is {w[0]:.3g}, not positive")
    support = float(np.quantile(x[:, 1 + FEATURES.index(f"crowding_{CROWD_KS[0]}")], SUPPORT_QUANTILE))
    slopes = np.zeros(len(FEATURES))
    slopes[:len(w) - 1] = w[1:] / w[0]
    return Gate(float((tau - b) / w[0]), slopes, np.asarray(qvecs, np.float32), np.asarray(labels, np.int64),
                support, fallback, entry=cvecs is not None)


# ---------------------------------------------------------------------------------------- the reference file


def save_reference(path: Path, gate: Gate) -> str:
    """The reference set as safetensors (atomic); returns its sha256, which cache.json records."""
    import hashlib

    from safetensors.numpy import save

    from toolkit.io import atomic_write_bytes

    data = save({"vectors": np.ascontiguousarray(gate.ref_vecs, np.float32),
                 "labels": np.ascontiguousarray(gate.ref_labels, np.int64)})
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_reference(path: Path, sha256: str, dim: int, n: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(unit vectors, 0/1 labels) of the reference file, checked against what cache.json recorded."""
    import hashlib

    from safetensors.numpy import load

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OptkitError(f"{source}: query_threshold.reference: cannot read {path} ({exc.strerror or exc}); it is "
                          "written by the cache stage next to cache.json") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise OptkitError(f"{source}: query_threshold.reference: {path.name} does not match the sha256 cache.json "
                          "records (a file from another run?)")
    try:
        arrays = load(data)
        vecs, labels = arrays["vectors"], arrays["labels"]
    except Exception as exc:  # safetensors raises its own error types for a malformed header
        raise OptkitError(f"{source}: query_threshold.reference: {path.name} is not a valid reference file "
                          f"({str(exc)[:80]})") from None
    if vecs.shape != (n, dim) or labels.shape != (n,) or not np.isfinite(vecs).all() or \
            not np.isin(labels, (0, 1)).all() or not np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-3):
        raise OptkitError(f"{source}: query_threshold.reference: {path.name} holds vectors {vecs.shape} and labels "
                          f"{labels.shape}; want ({n}, {dim}) finite unit vectors and {n} labels in {{0, 1}}")
    return vecs.astype(np.float32), labels.astype(np.int64)


def spec(gate: Gate, sha256: str, reason: str) -> dict:
    """cache.json's `query_threshold`."""
    names = FEATURES if gate.entry else QUERY_FEATURES
    return {"definition": DEFINITION, "offset": gate.offset, "slopes": [float(x) for x in gate.slopes[:len(names)]],
            "support": gate.support, "fallback": gate.fallback,
            "features": list(names),
            "reference": {"file": REFERENCE_FILE, "sha256": sha256, "n": int(len(gate.ref_labels))}, "reason": reason}


def from_spec(qt, directory: Path, dim: int, source: str) -> Gate:
    """The Gate of a validated cachefile.QueryThresholdSpec."""
    vecs, labels = load_reference(directory / qt.reference.file, qt.reference.sha256, dim, qt.reference.n, source)
    slopes = np.zeros(len(FEATURES))
    slopes[:len(qt.slopes)] = qt.slopes
    return Gate(qt.offset, slopes, vecs, labels, qt.support, qt.fallback, entry=len(qt.features) == len(FEATURES))
