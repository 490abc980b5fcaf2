"""Seeded fuzz of the files a user (or a disk) hands optkit (issue 12, "done when"): recipes (bytes and values),
data files (jsonl / csv / parquet bytes, rows with wrong types, missing columns, bad UTF-8), router.json and its
weights, cache.json, stage manifests and bundle manifests. Whatever the damage, each loader gives a valid object
or one OptkitError; the CLI exits 0 or 2 (verify: 1 = mismatch found) and never prints a traceback; a damaged
input never leaves a stage marked done that should not be. Seeded: a failure names its case and reproduces."""

from __future__ import annotations

import copy
import io
import json
import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.spine.test_pipeline import make_recipe, stages  # noqa: F401  (the spine's two small real stages)
from toolkit.cli import main
from toolkit.errors import OptkitError

REPO = Path(__file__).resolve().parents[1]
BITEXT = REPO / "recipes" / "data" / "bitext" / "bitext_cs_quickstart.jsonl"

NASTY_BYTES = [b"", b"null", b"[]", b"{}", b"-1", b"1e999", b"NaN", b".nan", b"\x00", b"\xff\xfe", b"\xe9",
               b"\xc3", b"../../etc", b"{{", b":", b"- -", b'"', b"'", b"\t", b"&a", b"*a", b"!!python/object:os.system",
               b"%", b"\r", b",", b"\n\n"]
NASTY_VALUES = [None, float("nan"), float("inf"), -float("inf"), -5, -1, 0, 1, 2.5, 1e308, 10 ** 30, True, "",
                "x", "NaN", "-1", "../../outside.txt", "/etc/hostname", [], {}, [1, "a"], {"a": None}, [[[]]],
                "é" * 3]


def _rng(seed: int) -> random.Random:
    """Seeded per test; OPTKIT_FUZZ_SEED=k shifts every seed to explore other cases (the default is what CI runs)."""
    return random.Random(seed + 100_003 * int(os.environ.get("OPTKIT_FUZZ_SEED", "0")))


def damage_bytes(data: bytes, rng: random.Random) -> bytes:
    """A few random byte-level damages: flip, delete, insert, splice a nasty token, truncate."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(max(len(b), 1))
        op = rng.choice(["flip", "delete", "insert", "nasty", "truncate"])
        if op == "flip" and b:
            b[i] ^= 1 << rng.randrange(8)
        elif op == "delete":
            del b[i:i + rng.randint(1, 20)]
        elif op == "insert":
            b[i:i] = bytes([rng.randrange(256)]) * rng.randint(1, 3)
        elif op == "nasty":
            b[i:i] = rng.choice(NASTY_BYTES)
        else:
            del b[i:]
    return bytes(b)


def _paths(node, prefix=()) -> list[tuple]:
    out = [prefix] if prefix else []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        out += _paths(v, prefix + (k,))
    return out


def damage_value(obj, rng: random.Random):
    """A deep copy with one or two random values replaced, deleted, retyped, or an unknown key added."""
    obj = copy.deepcopy(obj)
    for _ in range(rng.randint(1, 2)):
        paths = _paths(obj)
        if not paths:
            break
        path = rng.choice(paths)
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        op = rng.choice(["replace", "replace", "replace", "delete", "retype", "add"])
        if op == "replace":
            parent[key] = copy.deepcopy(rng.choice(NASTY_VALUES))
        elif op == "delete":
            del parent[key]
        elif op == "retype":
            v = parent[key]
            parent[key] = [v] if not isinstance(v, list) else (v[0] if v else {})
        elif isinstance(parent, dict):
            parent[key + "x" if isinstance(key, str) else "extra"] = rng.choice(NASTY_VALUES)
    return obj


def _json_bytes(obj) -> bytes:
    return json.dumps(obj).encode()  # NaN / Infinity stay in as a careless writer would leave them


def _one_line(exc: OptkitError, name: str) -> None:
    msg = str(exc)
    assert msg.strip() and "Traceback" not in msg, msg
    assert "\n" not in msg or name in msg, msg


def _cli(capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


# ------------------------------------------------------------------------------------------ recipes


def _base_recipe() -> dict:
    recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    recipe["data"]["path"] = str(BITEXT)
    recipe["tracking"] = {"enabled": False}
    return recipe


def test_damaged_recipes_validate_or_exit_2(tmp_path, capsys):
    rng = _rng(1201)
    base = _base_recipe()
    source = yaml.safe_dump(base, sort_keys=False).encode()
    codes = {0: 0, 2: 0}
    for n in range(300):
        path = tmp_path / f"r{n}.yaml"
        if n % 2:
            path.write_bytes(damage_bytes(source, rng))
        else:
            path.write_text(yaml.safe_dump(damage_value(base, rng), sort_keys=False, allow_unicode=True))
        code, err = _cli(capsys, ["validate", str(path)])
        assert code in codes, (n, code, err)
        assert code == 0 or err.startswith("error: "), (n, err)
        codes[code] += 1
    assert codes[2] > 120, codes  # the damage was real


# ------------------------------------------------------------------------------------------ data files


def _rows(n: int = 30) -> list[dict]:
    return [json.loads(line) for line in BITEXT.read_text().splitlines()[:n]]


def _encode(rows: list, fmt: str) -> bytes:
    if fmt == "jsonl":
        return b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    if fmt == "csv":
        import csv

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["id", "instruction", "category"])
        for r in rows:
            w.writerow([r.get(k) if isinstance(r, dict) else r for k in ("id", "instruction", "category")])
        return buf.getvalue().encode()
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{k: str(v) for k, v in r.items()} for r in rows]), buf)
    return buf.getvalue()


def _damaged_rows(rows: list[dict], rng: random.Random) -> list:
    rows = copy.deepcopy(rows)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(rows))
        op = rng.choice(["drop_key", "nasty_value", "not_a_row", "duplicate"])
        if not isinstance(rows[i], dict):
            continue
        if op == "drop_key":
            rows[i].pop(rng.choice(["id", "instruction", "category"]), None)
        elif op == "nasty_value":
            rows[i][rng.choice(["id", "instruction", "category"])] = copy.deepcopy(rng.choice(NASTY_VALUES))
        elif op == "not_a_row":
            rows[i] = rng.choice([None, [], 3, "row"])
        else:
            rows.append(copy.deepcopy(rows[i]))
    return rows


def _damaged_data(rng: random.Random) -> tuple[str, bytes]:
    fmt = rng.choice(["jsonl", "jsonl", "csv", "csv", "parquet"])
    kind = rng.choice(["bytes", "rows", "encoding"]) if fmt != "parquet" else "bytes"
    rows = _rows()
    if kind == "rows":
        damaged = _damaged_rows(rows, rng)
        if fmt == "csv":  # a CSV cannot hold a non-row; drop those, keep the rest of the damage
            damaged = [r for r in damaged if isinstance(r, dict)]
        return fmt, _encode(damaged, fmt)
    content = _encode(rows, fmt)
    if kind == "encoding":
        return fmt, rng.choice([content.decode().encode("utf-16"), content.decode().encode("latin-1"),
                                content.replace(b"a", b"\xe9", rng.randint(1, 5)), content[:rng.randrange(len(content))]
                                + b"\xc3"])
    return fmt, damage_bytes(content, rng)


def test_damaged_data_files_load_or_raise_one_line(tmp_path):
    from toolkit.collect.prompts import Prompt, load_prompts
    from toolkit.config import DataConfig

    rng = _rng(1209)
    outcomes = {"ok": 0, "error": 0}
    for n in range(500):
        fmt, content = _damaged_data(rng)
        path = tmp_path / f"d{n}.{fmt}"
        path.write_bytes(content)
        template = rng.choice([None, None, "Classify: {instruction}", "{instruction} [{category}]"])
        cfg = DataConfig(path=str(path), prompt_column="instruction", id_column=rng.choice(["id", None]),
                         reference_column="category", prompt_template=template)
        try:
            prompts = load_prompts(cfg, path, seed=0)
        except OptkitError as exc:
            _one_line(exc, path.name)
            assert path.name in str(exc) or "data." in str(exc), str(exc)
            outcomes["error"] += 1
            continue
        assert prompts and all(isinstance(p, Prompt) and p.id and isinstance(p.prompt, str) for p in prompts)
        outcomes["ok"] += 1
    assert outcomes["error"] > 150 and outcomes["ok"] > 40, outcomes


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_damaged_data_through_optkit_run_exits_2_and_nothing_is_done(workdir, capsys):
    """The CLI on damaged data: a bad file is refused before any request; a file that still parses reaches the
    (unreachable) endpoint and fails there. Exit 2 either way, and collect is never marked done."""
    rng = _rng(1210)
    collect = {"backend": "openai", "openai": {"base_url": f"http://127.0.0.1:{_dead_port()}/v1", "model": "m",
                                               "max_retries": 0, "timeout_s": 1.0}}
    for n in range(16):
        fmt, content = _damaged_data(rng)
        path = workdir / f"d{n}.{fmt}"
        path.write_bytes(content)
        recipe = {"name": "t", "teacher": {"model": "smollm2-135m-instruct"}, "tracking": {"enabled": False},
                  "data": {"path": str(path), "prompt_column": "instruction", "id_column": "id",
                           "reference_column": "category", "limit": 3},
                  "collect": collect}
        (workdir / "t.yaml").write_text(yaml.safe_dump(recipe))
        code, err = _cli(capsys, ["run", str(workdir / "t.yaml")])
        assert code == 2 and err.startswith("error: "), (n, code, err)
        manifest = workdir / "artifacts" / "t" / "collect" / "manifest.json"
        assert not manifest.exists() or json.loads(manifest.read_text()).get("status") != "done", n


# ------------------------------------------------------------------------------------------ router.json


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory):
    from tests.route.conftest import write_small_router

    directory = tmp_path_factory.mktemp("router")
    write_small_router(directory)
    return directory


def test_damaged_routers_load_or_raise_one_line(router_dir, tmp_path):
    from toolkit.route import Router
    from toolkit.route.runtime import decide, text_features

    rng = _rng(1204)
    spec = json.loads((router_dir / "router.json").read_text())
    good_json, good_weights = (router_dir / "router.json").read_bytes(), (router_dir / "router.safetensors").read_bytes()
    x = text_features(["What is 2 + 2?", "Prove that there are infinitely many primes.", "hi"])
    loaded = refused = 0
    for n in range(600):
        what = rng.choice(["value", "value", "json_bytes", "weights_bytes"])
        (tmp_path / "router.json").write_bytes(_json_bytes(damage_value(spec, rng)) if what == "value" else
                                               damage_bytes(good_json, rng) if what == "json_bytes" else good_json)
        (tmp_path / "router.safetensors").write_bytes(damage_bytes(good_weights, rng) if what == "weights_bytes"
                                                      else good_weights)
        try:
            router = Router.load(tmp_path, embedder=object())
        except OptkitError as exc:
            _one_line(exc, "router")
            assert "router." in str(exc), str(exc)
            refused += 1
            continue
        loaded += 1  # what loads is a usable router: finite threshold, one cost per model, sane predictions
        assert np.isfinite(router.threshold) and len(router._cost_norm) == len(router.models) >= 2, n
        z = (x - router.weights["feat.mean"]) / router.weights["feat.scale"]
        P = router.predict_from_features(z, z)
        assert P.shape == (3, len(router.models)) and np.all((P >= 0) & (P <= 1)), n
        assert set(decide(P, router._cost_norm, router.threshold)) <= set(range(len(router.models)))
    assert refused > 300 and loaded > 20, (loaded, refused)


# ------------------------------------------------------------------------------------------ cache.json


def _hash_embedder(texts):
    """A deterministic 16-dim text embedder (character trigram counts, hashed): no model to load."""
    import zlib

    out = np.zeros((len(texts), 16), np.float32)
    for i, t in enumerate(texts):
        for j in range(max(len(t) - 2, 1)):
            out[i, zlib.crc32(t[j:j + 3].encode()) % 16] += 1
    return out


def _good_cache_json() -> dict:
    from toolkit.cache.runtime import FORMAT, PROBES, SIMILARITY, embed_texts

    probes = embed_texts(_hash_embedder, PROBES)
    return {"format": FORMAT, "similarity": SIMILARITY, "threshold": 0.8, "feasible": True, "epsilon": 0.05,
            "embedder": {"model": "hash-16", "revision": "1", "dim": 16, "normalize": True, "probes": list(PROBES),
                         "probe_vectors": np.round(probes, 6).tolist()},
            "adaptive": {"kind": "cluster", "exported": True, "thresholds": [0.7, None],
                         "centroids": np.round(probes[:2], 5).tolist()},
            "runtime": {"ttl_s": 60.0, "max_entries": 10, "max_entries_per_namespace": None, "ann": "numpy",
                        "ann_min_entries": 10},
            "metrics": {"heldout_fhr": 0.03}}


def test_damaged_cache_json_loads_or_raises_one_line(tmp_path):
    from toolkit.cache import SemanticCache

    rng = _rng(1205)
    good = _good_cache_json()
    path = tmp_path / "cache.json"
    path.write_bytes(_json_bytes(good))
    SemanticCache.load(path, embedder=_hash_embedder)  # the undamaged file loads
    source = path.read_bytes()
    loaded = refused = 0
    for n in range(500):
        path.write_bytes(_json_bytes(damage_value(good, rng)) if n % 3 else damage_bytes(source, rng))
        try:
            cache = SemanticCache.load(path, embedder=_hash_embedder)
        except OptkitError as exc:
            _one_line(exc, "cache.json")
            refused += 1
            continue
        loaded += 1  # what loads serves within its stated settings
        assert cache.threshold is None or -1 <= cache.threshold <= 1, n
        assert (cache.ttl_s is None or cache.ttl_s > 0) and cache.max_entries >= 1, n
        cache.insert("how do I reset my password", "a")
        hit = cache.lookup("how do I reset my password")
        assert hit is not None and hit.answer == "a", n
    assert refused > 200 and loaded > 20, (loaded, refused)


def test_cluster_centroids_without_a_direction_refuse_and_large_ones_keep_theirs(tmp_path):
    """Centroids are normalized in float64: a large finite value (beyond float32) still names a direction; an
    all-zero row, or one whose norm overflows even float64, refuses (float32 normalizing made NaN or zero
    centroids that loaded)."""
    from toolkit.cache import SemanticCache

    good = _good_cache_json()
    path = tmp_path / "cache.json"
    big = json.loads(json.dumps(good))
    big["adaptive"]["centroids"][0] = [1e39] + [0.0] * 15
    path.write_bytes(_json_bytes(big))
    cache = SemanticCache.load(path, embedder=_hash_embedder)
    assert np.array_equal(cache.centroids[0], np.eye(16, dtype=np.float32)[0])
    for row in ([0.0] * 16, [1e308] * 16):  # no direction; a norm beyond float64 (strict JSON has no inf)
        bad = json.loads(json.dumps(good))
        bad["adaptive"]["centroids"][1] = row
        path.write_bytes(_json_bytes(bad))
        with pytest.raises(OptkitError, match=r"cache.json: adaptive.centroids must be .* finite, non-zero") as exc:
            SemanticCache.load(path, embedder=_hash_embedder)
        _one_line(exc.value, "cache.json")


# ------------------------------------------------------------------------------------------ bundle manifests


def _bundle(root: Path) -> Path:
    from toolkit.bundle import FORMAT
    from toolkit.export.build import file_table

    (root / "route").mkdir(parents=True)
    (root / "cache.json").write_text('{"threshold": 0.84}')
    (root / "route" / "router.json").write_text("{}")
    (root / "route" / "router.safetensors").write_bytes(b"\x00" * 32)
    (root / "manifest.json").write_text(json.dumps({"format": FORMAT, "models": [], "files": file_table(root)},
                                                   indent=2))
    return root


def test_damaged_bundle_manifests_through_optkit_verify(tmp_path, capsys):
    rng = _rng(1203)
    root = _bundle(tmp_path / "bundle")
    source = (root / "manifest.json").read_bytes()
    good = json.loads(source)
    codes = {0: 0, 1: 0, 2: 0}
    for n in range(300):
        damaged = _json_bytes(damage_value(good, rng)) if n % 2 else damage_bytes(source, rng)
        (root / "manifest.json").write_bytes(damaged)
        code, err = _cli(capsys, ["verify", str(root)])
        assert code in codes, (n, code, err)
        if code == 0:  # "ok" only for a manifest whose file table still lists exactly the true files and hashes
            files = json.loads(damaged)["files"]
            assert {rel: (m["sha256"], m["bytes"]) for rel, m in files.items()} == \
                {rel: (m["sha256"], m["bytes"]) for rel, m in good["files"].items()}, (n, damaged)
        codes[code] += 1
    assert codes[1] + codes[2] > 180, codes
    (root / "manifest.json").write_bytes(source)
    assert _cli(capsys, ["verify", str(root)])[0] == 0


# ------------------------------------------------------------------------------------------ stage manifests


def test_damaged_stage_manifest_values_never_pass_for_done(workdir, stages):
    """A finished stage whose manifest values were edited: the pipeline refuses it, re-runs it, or skips it only
    when the manifest still vouches for exactly the files on disk."""
    from toolkit import pipeline
    from toolkit.io import sha256_file
    from toolkit.tracking import NullTracker

    rng = _rng(1206)
    r = make_recipe(workdir)
    pipeline.run_pipeline(r, tracker=NullTracker())
    stage_dir = workdir / "artifacts" / "run1" / "collect"
    path = stage_dir / "manifest.json"
    good = json.loads(path.read_text())
    for n in range(80):
        path.write_bytes(_json_bytes(damage_value(good, rng)))
        damaged = json.loads(path.read_text())
        try:
            outcome = pipeline.run_pipeline(r, only="collect", tracker=NullTracker())[0]
        except OptkitError as exc:
            _one_line(exc, "manifest")
            path.write_text(json.dumps(good))
            continue
        if outcome.status == "skipped":
            assert damaged["status"] == "done" and damaged["config_hash"] == good["config_hash"], n
            for rel, meta in damaged["outputs"].items():
                assert sha256_file(stage_dir / rel) == meta["sha256"], (n, rel)
        else:
            fresh = json.loads(path.read_text())
            assert fresh["status"] == "done" and _hashes(fresh) == _hashes(good), n
        path.write_text(json.dumps(good))


def _hashes(manifest: dict) -> dict:
    return {rel: (meta["sha256"], meta["bytes"]) for rel, meta in manifest["outputs"].items()}
