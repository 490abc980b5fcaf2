"""cache.json is validated like a recipe: every value the runtime uses is checked (range, finiteness, type,
length), and anything off is one OptkitError line naming the field. Plus a fuzz test: randomly corrupted files
give a loaded cache or an OptkitError, never a traceback, never a cache with an out-of-range setting."""

import copy
import json
import math

import numpy as np
import pytest

from toolkit.cache import SemanticCache
from toolkit.cache.runtime import FORMAT, PROBES, SIMILARITY, embed_texts
from toolkit.errors import OptkitError


@pytest.fixture(scope="module")
def minilm():
    from toolkit.models import load_embedder

    return load_embedder("minilm-l6")


@pytest.fixture(scope="module")
def good(minilm):
    probes = embed_texts(minilm, PROBES)
    centroids = np.round(probes[:2], 5)
    return {"format": FORMAT, "similarity": SIMILARITY, "threshold": 0.8, "feasible": True, "epsilon": 0.05,
            "embedder": {"model": "minilm-l6", "revision": "x", "dim": 384, "normalize": True,
                         "probes": list(PROBES), "probe_vectors": np.round(probes, 6).tolist()},
            "adaptive": {"kind": "cluster", "exported": True, "thresholds": [0.7, None],
                         "centroids": centroids.tolist()},
            "runtime": {"ttl_s": 60.0, "max_entries": 10, "max_entries_per_namespace": None, "ann": "numpy",
                        "ann_min_entries": 10},
            "metrics": {"heldout_fhr": 0.03}}


def write(tmp_path, cfg, raw=None):
    path = tmp_path / "cache.json"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(json.dumps(cfg))
    return path


def edited(cfg, dotted, value):
    out = copy.deepcopy(cfg)
    *parents, last = dotted.split(".")
    node = out
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


class _Delete:
    def __repr__(self):
        return "DELETE"


DELETE = _Delete()  # edited(): remove the field

BAD = [  # (field, value, what the one-line error must say)
    ("threshold", -5, r"field 'threshold': Input should be greater than or equal to -1"),
    ("threshold", 1.5, r"field 'threshold': Input should be less than or equal to 1"),
    ("threshold", "0.8", r"field 'threshold'"),
    ("threshold", DELETE, r"field 'threshold': Field required"),
    ("runtime.ttl_s", -1, r"field 'runtime.ttl_s': Input should be greater than 0"),
    ("runtime.ttl_s", 0, r"field 'runtime.ttl_s'"),
    ("runtime.max_entries", 0, r"field 'runtime.max_entries'"),
    ("runtime.max_entries", 2.5, r"field 'runtime.max_entries'"),
    ("runtime.max_entries", True, r"field 'runtime.max_entries'"),
    ("runtime.max_entries_per_namespace", 0, r"field 'runtime.max_entries_per_namespace'"),
    ("runtime.ann", "hnsw", r"field 'runtime.ann'"),
    ("runtime.tll_s", 5, r"field 'runtime.tll_s': Extra inputs are not permitted"),
    ("similarity.kind", "dot", r"field 'similarity.kind'"),
    ("embedder", DELETE, r"field 'embedder': Field required"),
    ("embedder.dim", 0, r"field 'embedder.dim'"),
    ("embedder.probe_vectors", [[0.1] * 384], r"field 'embedder': .*probe_vectors has 1 rows"),
    ("embedder.probe_vectors.0", [0.1] * 12, r"field 'embedder': .*dim=384"),
    ("adaptive.thresholds", [0.7], r"field 'adaptive': .*2 centroids but 1 thresholds"),
    ("adaptive.thresholds.0", -3, r"field 'adaptive': thresholds\.0 should be greater than or equal to -1"),
    ("similarity.kind", "diagonal", r"field 'similarity': kind diagonal needs weights"),
    ("similarity.weights", [1.0] * 384, r"field 'similarity': kind cosine takes no weights"),
    ("adaptive.centroids.1", [0.5] * 10, r"field 'adaptive': .*centroids differ in length"),
    ("adaptive.exported", "yes", r"field 'adaptive.exported'"),
]


@pytest.mark.parametrize("field, value, message", BAD, ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD])
def test_bad_values_are_one_line_errors_naming_the_field(tmp_path, minilm, good, field, value, message):
    path = write(tmp_path, edited(good, field, value))
    with pytest.raises(OptkitError, match=message) as err:
        SemanticCache.load(path, embedder=minilm)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


DIAGONAL = {"kind": "diagonal", "weights": [2.0] * 384}
BAD_DIAGONAL = [  # a learned metric's scores range over [-max w, max w]: its thresholds are checked against that
    ("threshold", 2.5, r"field 'threshold': Input should be less than or equal to 2 "),
    ("adaptive.thresholds.0", -2.5, r"field 'adaptive': thresholds\.0 should be greater than or equal to -2 "),
    ("similarity.weights", [2.0] * 10, r"field '\(top level\)': similarity weights have 10 values, the embedder dim "
                                       r"is 384"),
    ("similarity.weights.3", -0.5, r"field 'similarity.weights.3': Input should be greater than or equal to 0"),
    ("similarity.weights", [0.0] * 384, r"field 'similarity': kind diagonal needs weights \(>= 0, not all zero\)"),
    ("similarity.weights.0", "1", r"field 'similarity.weights.0'"),
]


@pytest.mark.parametrize("field, value, message", BAD_DIAGONAL, ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD_DIAGONAL])
def test_a_learned_metric_is_validated_against_its_own_range(tmp_path, minilm, good, field, value, message):
    diag = {**edited(good, "similarity", DIAGONAL), "threshold": 1.5}
    cache = SemanticCache.load(write(tmp_path, diag), embedder=minilm)  # 1.5 > 1 is inside [-2, 2]: loads
    assert cache.threshold == 1.5 and list(cache.weights[:2]) == [2.0, 2.0]
    with pytest.raises(OptkitError, match=message) as err:
        SemanticCache.load(write(tmp_path, edited(diag, field, value)), embedder=minilm)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("raw, message", [
    (b'{"threshold": NaN}', "NaN is not allowed"), (b'{"threshold": Infinity}', "Infinity is not allowed"),
    (b"[1, 2]", "a JSON object is expected"), (b'{"format": "optkit-cache/1", "thr', "not valid JSON"),
    (b'\xff\xfe{"format": 1}', "not UTF-8"), (b"", "not valid JSON")])
def test_unreadable_files(tmp_path, minilm, raw, message):
    with pytest.raises(OptkitError, match=message):
        SemanticCache.load(write(tmp_path, None, raw), embedder=minilm)


def test_nan_threshold_in_file_and_bad_overrides(tmp_path, minilm, good):
    text = json.dumps(good).replace('"threshold": 0.8', '"threshold": NaN')
    with pytest.raises(OptkitError, match="NaN"):
        SemanticCache.load(write(tmp_path, None, text.encode()), embedder=minilm)
    path = write(tmp_path, good)
    cache = SemanticCache.load(path, embedder=minilm, ttl_s=5)
    assert cache.ttl_s == 5 and cache.threshold == 0.8 and list(cache.cluster_thresholds[:1]) == [0.7]
    with pytest.raises(OptkitError, match=r"runtime settings\): field 'ttl_s'"):
        SemanticCache.load(path, embedder=minilm, ttl_s=-1)
    with pytest.raises(OptkitError, match="threshold must be a cosine similarity"):
        SemanticCache(threshold=float("nan"))


def random_value(rng):
    return [None, -5, 0, 1, 2.5, -1e9, 1e300, "x", "", [], {}, True, [[1.0]], {"a": 1}][int(rng.integers(14))]


def paths(node, prefix=""):
    """Every dotted path in the config (dict keys and list indices)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in items:
        here = f"{prefix}{k}"
        yield here
        if not (isinstance(v, list) and len(v) > 8):  # long vectors: the whole list and its first rows only
            yield from paths(v, here + ".")
        else:
            yield from (f"{here}.{i}" for i in range(2))


def test_fuzzed_cache_json_loads_or_fails_in_one_line(tmp_path, minilm, good):
    """300 corruptions: a value replaced or deleted (1-3 per file), or the bytes cut or flipped. Each either
    loads into a cache whose settings are in range, or raises OptkitError; nothing else escapes."""
    rng = np.random.default_rng(12)
    all_paths = list(paths(good))
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(300):
        cfg, raw = good, None
        if case % 5 == 4:
            text = bytearray(json.dumps(good).encode())
            if rng.random() < 0.5:
                text = text[: int(rng.integers(0, len(text)))]
            else:
                for _ in range(3):
                    text[int(rng.integers(len(text)))] = int(rng.integers(256))
            raw = bytes(text)
        else:
            for _ in range(int(rng.integers(1, 4))):
                try:
                    cfg = edited(cfg, str(rng.choice(all_paths)), DELETE if rng.random() < 0.25 else
                                 random_value(rng))
                except (KeyError, IndexError, TypeError, ValueError):
                    pass  # the path no longer exists after an earlier edit
        try:
            cache = SemanticCache.load(write(tmp_path, cfg, raw), embedder=minilm)
        except OptkitError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
            continue
        outcomes["loaded"] += 1
        assert cache.threshold is None or -1 <= cache.threshold <= 1
        assert cache.ttl_s is None or (cache.ttl_s > 0 and math.isfinite(cache.ttl_s))
        assert isinstance(cache.max_entries, int) and cache.max_entries >= 1
        if cache.cluster_thresholds is not None:
            assert len(cache.cluster_thresholds) == len(cache.centroids)
    assert outcomes["refused"] > 150 and outcomes["loaded"] > 10, outcomes


def test_overflowing_probe_vector_refuses_instead_of_passing(tmp_path, minilm, good):
    # 1e308 is a valid finite JSON number, but it overflows float32: the probe cosine becomes NaN, and a NaN
    # compared with the minimum cosine used to let any embedder through.
    cfg = copy.deepcopy(good)
    cfg["embedder"]["probe_vectors"][0] = [1e308] * 384
    with pytest.raises(OptkitError, match="embedder differs"):
        SemanticCache.load(write(tmp_path, cfg), embedder=minilm)
