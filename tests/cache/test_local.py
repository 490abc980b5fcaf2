"""cache.adaptive: query (toolkit/cache/local.py): a threshold that moves with the query's neighbourhood among the
calibration queries -- the features against a plain re-implementation, the choice against the global threshold,
the runtime serving exactly the per-query thresholds, and cache.json's checks.

Synthetic vectors on purpose: they make the right answer known (a region whose nearest neighbours are never
reusable at the same similarity as a region whose neighbours are). tests/cache/test_stage.py runs the same code on
real MiniLM embeddings of real data."""

import dataclasses
import json

import numpy as np
import pytest

from toolkit.cache import SemanticCache, local, tune
from toolkit.cache.pairs import Pairs, nearest_pairs
from toolkit.cache.runtime import l2_normalize
from toolkit.cache.stage import choose_metric, choose_query_threshold, pair_fn, split
from toolkit.config.cache import CacheConfig
from toolkit.errors import OptkitError


def plain_features(q, ref, labels, skip=None, crowd_skip=None):
    """The definition, written out: over the reference rows nearest q (identical vectors left out, and the rows
    `skip` / `crowd_skip` bar), the mean label of the 10 and 40 nearest and the mean similarity to the 5 and 50
    nearest."""
    out = []
    for i, v in enumerate(q):
        sims = ref @ v
        order = [j for j in np.argsort(-sims, kind="stable") if sims[j] < 1 - 1e-4]
        near = [j for j in order if skip is None or not skip[i, j]]
        crowd = [j for j in order if crowd_skip is None or not crowd_skip[i, j]]
        out.append([labels[near[:10]].mean(), labels[near[:40]].mean(), sims[crowd[:5]].mean(),
                    sims[crowd[:50]].mean()])
    return np.array(out)


def plain_entry_features(c, ref, skip=None):
    """The entry's part of the definition: the mean similarity of c to its 5 and 50 nearest reference queries."""
    return plain_features(c, ref, np.zeros(len(ref)), None, skip)[:, 2:]


def plain_thresholds(gate, q, c):
    """offset - slopes . [f(q), g(c)], the fallback as the floor of an unfamiliar query's, written out; g(c) never
    counts a reference text identical to the query (calibration never counts a pair's own query)."""
    f = plain_features(q, gate.ref_vecs, gate.ref_labels)
    own = q @ gate.ref_vecs.T >= 1 - 1e-4
    t = gate.offset - np.column_stack([f, plain_entry_features(c, gate.ref_vecs, own)]) @ gate.slopes
    floor = np.inf if gate.fallback is None else gate.fallback
    return np.where(f[:, 2] < gate.support, np.maximum(t, floor), t)


def test_features_are_the_neighbourhood_label_rates_and_crowding():
    rng = np.random.default_rng(0)
    ref = l2_normalize(rng.normal(size=(120, 16))).astype(np.float32)
    labels = rng.integers(0, 2, 120)
    q = np.concatenate([ref[:3], l2_normalize(rng.normal(size=(5, 16))).astype(np.float32)])  # 3 are reference texts
    skip, crowd_skip = np.zeros((8, 120), bool), np.zeros((8, 120), bool)
    skip[5, np.argsort(-(ref @ q[5]))[:4]] = True  # a query barred from its 4 nearest reference pairs' labels
    crowd_skip[5, np.argsort(-(ref @ q[5]))[1:3]] = True  # and from 2 of them for the crowding
    got = local.features(q, ref, labels, skip, crowd_skip)
    assert got.shape == (8, len(local.QUERY_FEATURES))
    assert np.allclose(got, plain_features(q, ref, labels, skip, crowd_skip), atol=1e-5)
    # Both skips mattered, each to its own columns, and a query identical to a reference text does not read its
    # own label.
    assert not np.allclose(got[5, :2], local.features(q[5:6], ref, labels, None, crowd_skip[5:6])[0, :2])
    assert not np.allclose(got[5, 2:], local.features(q[5:6], ref, labels, skip[5:6])[0, 2:])
    assert np.allclose(got[0], plain_features(q[:1], ref, labels)[0], atol=1e-5)
    # The entry's features are its crowding (a pair's own query never counts).
    entry = local.entry_features(q, ref, skip)
    assert entry.shape == (8, len(local.ENTRY_FEATURES))
    assert np.allclose(entry, plain_entry_features(q, ref, skip), atol=1e-5)


def test_pair_skip_hides_what_a_runtime_query_could_not_know():
    # pair (q=0, c=5) against reference pairs (1->5): another query's label on this very entry; (5->9): the entry's
    # own neighbour; (2->0): a pair about q; (3->4): unrelated, the only one it may read.
    got = local.pair_skip(np.array([0]), np.array([5]), np.array([1, 5, 2, 3]), np.array([5, 9, 0, 4]))
    assert got.labels.tolist() == [[True, True, True, False]]
    # The crowding reads no label: only the reference queries that ARE q or c are hidden (q's similarity to c is
    # the pair's score); the query 1, whose nearest entry is c, crowds c at runtime too.
    got = local.pair_skip(np.array([0]), np.array([5]), np.array([1, 5, 0, 3]), np.array([5, 9, 7, 4]))
    assert got.crowding.tolist() == [[False, True, True, False]]


def regions(seed=0, groups=30, per=12, oos=300, dim=32):
    """In-scope texts in tight groups (a nearest neighbour of the same group is reusable) and out-of-scope texts
    clustered just as tightly in their own region, each its own group (a neighbour there is never reusable). Their
    cosines to their nearest neighbours look alike, so one threshold cannot tell the regions apart."""
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.normal(size=(groups, dim)))
    rows, names = [], []
    for g in range(groups):
        for _ in range(per):
            rows.append(centres[g] + 0.22 * rng.normal(size=dim) / np.sqrt(dim) * 4)
            names.append(f"g{g}")
    region = l2_normalize(rng.normal(size=(1, dim)))[0]
    for i in range(oos):  # a sub-cluster of 6 per 6 texts: as close to each other as a group's texts are
        sub = l2_normalize(region + 0.5 * rng.normal(size=dim) / np.sqrt(dim) * 4) if i % 6 == 0 else sub
        rows.append(sub + 0.22 * rng.normal(size=dim) / np.sqrt(dim) * 4)
        names.append(f"oos{i}")
    vecs = l2_normalize(np.array(rows)).astype(np.float32)
    queries = list(range(len(vecs)))
    cached, labels = nearest_pairs(vecs, names, queries)
    return Pairs([f"t{i}" for i in queries], np.array(queries), cached, labels, "synthetic", {}, names), vecs


@pytest.mark.parametrize("entry", [False, True], ids=["query", "query_entry"])
def test_the_query_threshold_serves_more_within_the_bound_where_one_threshold_cannot_tell_regions_apart(entry):
    pairs, vecs = regions()
    cal, held = split(pairs, 0.3, seed=0)
    ratio = len(held) / len(cal)
    cfg = CacheConfig(metric="cosine", adaptive="query", epsilon=0.05, query_entry=entry)
    choice = choose_metric(cfg, 0, pairs, vecs, cal, ratio)
    query = choose_query_threshold(cfg, 0, pairs, vecs, cal, choice, ratio)
    rep = query.report
    assert rep["exported"] and query.gate is not None
    assert rep["calibration_served"]["query_crossfit"] > rep["calibration_served"]["global"]
    assert str(rep["calibration_served"]["query_crossfit"]) in rep["reason"]
    # The neighbours' label rate carries the region: a higher rate lowers the threshold.
    assert rep["slopes"]["label_rate_10"] + rep["slopes"]["label_rate_40"] > 0
    assert (query.gate.ref_labels == choice.calibration[1]).all() and len(query.gate.ref_vecs) == len(cal)
    # A query unlike every calibration query never gets a threshold below the global one, whatever the slopes say.
    # (Here no global threshold meets the bound at all, so such a query gets no semantic hit.)
    assert query.gate.fallback == choice.selection.threshold and not choice.selection.feasible
    pool = l2_normalize(np.random.default_rng(5).normal(size=(400, vecs.shape[1]))).astype(np.float32)
    f = local.features(pool, query.gate.ref_vecs, query.gate.ref_labels)
    far = f[:, local.FEATURES.index("crowding_5")] < query.gate.support
    entries = pool[::-1]
    t = query.gate.thresholds(pool, entries)
    assert far.sum() >= 10 and (t[far] == np.inf).all()
    assert np.allclose(t, plain_thresholds(query.gate, pool, entries), atol=1e-5)
    # With cache.query_entry the entry's crowding moves the threshold too (the same query, another entry, another
    # threshold); without, the entry is never read.
    inside = vecs[pairs.query[cal][:50]]
    moves = np.ptp(query.gate.thresholds(inside[:1].repeat(50, 0), inside))
    assert rep["features"] == list(local.FEATURES if entry else local.QUERY_FEATURES)
    assert (moves > 0.01 and all(rep["slopes"][f] != 0 for f in local.ENTRY_FEATURES)) if entry else moves == 0

    s_held, y_held, c_held = pair_fn(pairs, vecs)(None, held)
    q = pairs.query[held]
    skip = local.pair_skip(q, c_held, pairs.query[cal], choice.calibration[2])
    gated = tune.rates(query.gate.served(s_held, vecs[q], vecs[c_held], skip), y_held)
    global_ = tune.evaluate(s_held, y_held, choice.selection.threshold)
    assert gated["fhr"] <= 0.05 and gated["hit_rate"] > global_["hit_rate"] + 0.1, (gated, global_)

    # The runtime serves the per-query thresholds exactly: each held-out query against its cached text alone.
    cache = SemanticCache(choice.selection.threshold, query_gate=query.gate)
    want = s_held >= query.gate.thresholds(vecs[q], vecs[c_held])  # at runtime no pair is skipped
    for i in range(len(held)):
        cache.insert_many([f"c{i}"], [i], namespace=str(i), vectors=vecs[c_held[i]][None])
        hit = cache.lookup_vector(vecs[q[i]], namespace=str(i))
        assert (hit is not None) == bool(want[i]), i
    assert want.any() and (~want).any()
    # A query that is itself a calibration text: the entry's crowding never counts it (calibration never counts a
    # pair's own query, whose similarity to the entry is the score), at runtime as in the definition.
    qc, cc = pairs.query[cal][:40], choice.calibration[2][:40]
    assert np.allclose(query.gate.thresholds(vecs[qc], vecs[cc]), plain_thresholds(query.gate, vecs[qc], vecs[cc]),
                       atol=1e-5)


def test_not_exported_when_it_serves_no_more_than_the_global_threshold():
    # One region only, every neighbour reusable above a clean cosine gap: the neighbourhood adds nothing.
    pairs, vecs = regions(oos=0, groups=40)
    cal, held = split(pairs, 0.3, seed=0)
    cfg = CacheConfig(metric="cosine", adaptive="query")
    choice = choose_metric(cfg, 0, pairs, vecs, cal, len(held) / len(cal))
    query = choose_query_threshold(cfg, 0, pairs, vecs, cal, choice, len(held) / len(cal))
    assert query.gate is None and not query.report["exported"]
    assert query.report["reason"].startswith("not exported")


def cache_file(tmp_path, gate):
    from toolkit.cache.runtime import PROBES, probe_vectors

    class Embedder:  # deterministic vectors of the gate's dim: the probes only need to be reproducible
        def encode(self, texts, **_):
            dim = gate.ref_vecs.shape[1]
            return np.stack([l2_normalize(np.random.default_rng(abs(hash(t)) % 2**32).normal(size=dim)) for t in texts])

    emb = Embedder()
    sha = local.save_reference(tmp_path / local.REFERENCE_FILE, gate)
    cfg = {"format": "optkit-cache/1", "similarity": {"kind": "cosine"}, "threshold": gate.fallback,
           "embedder": {"model": "synthetic", "dim": gate.ref_vecs.shape[1], "probes": list(PROBES),
                        "probe_vectors": probe_vectors(emb).tolist()},
           "query_threshold": local.spec(gate, sha, "test")}
    return cfg, emb


def test_cache_json_and_its_reference_file_are_checked(tmp_path):
    pairs, vecs = regions(seed=1)
    cal, held = split(pairs, 0.3, seed=0)
    cfg = CacheConfig(metric="cosine", adaptive="query", query_entry=True)
    choice = choose_metric(cfg, 0, pairs, vecs, cal, len(held) / len(cal))
    gate = choose_query_threshold(cfg, 0, pairs, vecs, cal, choice, len(held) / len(cal)).gate
    assert gate is not None and gate.entry and len(local.spec(gate, "0" * 64, "")["slopes"]) == len(local.FEATURES)
    spec, emb = cache_file(tmp_path, gate)
    path = tmp_path / "cache.json"

    def write(obj):
        path.write_text(json.dumps(obj))
        return path

    loaded = SemanticCache.load(write(spec), embedder=emb)
    assert np.allclose(loaded.query_gate.thresholds(vecs[:20], vecs[20:40]), gate.thresholds(vecs[:20], vecs[20:40]))
    # The query's features only (the default, and every cache.json from before cache.query_entry): served as tuned.
    four = {**spec["query_threshold"], "features": list(local.QUERY_FEATURES),
            "slopes": spec["query_threshold"]["slopes"][:4]}
    before = SemanticCache.load(write({**spec, "query_threshold": four}), embedder=emb).query_gate
    assert not before.entry
    as_tuned = dataclasses.replace(gate, slopes=np.r_[gate.slopes[:4], 0.0, 0.0])
    assert np.allclose(before.thresholds(vecs[:20], vecs[20:40]), plain_thresholds(as_tuned, vecs[:20], vecs[20:40]),
                       atol=1e-5)
    bad = [({"features": ["label_rate_10"]}, "query_threshold.features"),
           ({"slopes": [0.1, 0.2]}, "query_threshold"),
           ({"features": list(local.QUERY_FEATURES)}, "slopes: 6 values, want one per feature"),
           ({"offset": "0.5"}, "query_threshold.offset"),
           ({"fallback": -5.0}, "query_threshold.fallback"),  # would switch the guard off: not the threshold
           ({"reference": {**spec["query_threshold"]["reference"], "file": "../cache-reference.safetensors"}},
            "query_threshold.reference.file"),
           ({"reference": {**spec["query_threshold"]["reference"], "n": len(cal) + 1}}, "holds vectors")]
    for change, where in bad:
        with pytest.raises(OptkitError, match=where.replace(".", r"\.")):
            SemanticCache.load(write({**spec, "query_threshold": {**spec["query_threshold"], **change}}), embedder=emb)
    with pytest.raises(OptkitError, match="exclude each other"):
        SemanticCache.load(write({**spec, "adaptive": {"exported": True, "thresholds": [0.9],
                                                      "centroids": [[1.0] + [0.0] * (vecs.shape[1] - 1)]}}),
                           embedder=emb)
    ref = tmp_path / local.REFERENCE_FILE
    ref.write_bytes(ref.read_bytes()[:-8] + b"\0" * 8)  # a file from another run: the sha256 no longer matches
    with pytest.raises(OptkitError, match="does not match the sha256"):
        SemanticCache.load(write(spec), embedder=emb)
    ref.unlink()
    with pytest.raises(OptkitError, match="cannot read"):
        SemanticCache.load(write(spec), embedder=emb)


def test_query_entry_needs_the_query_threshold():
    with pytest.raises(ValueError, match="query_entry: true needs adaptive: query"):
        CacheConfig(adaptive="cluster", query_entry=True)
