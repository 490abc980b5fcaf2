"""Randomly damaged inputs of the spine (issue 12, "done when"): recipe files, stage manifests and bundle manifests.
Whatever the damage, the loaders answer with a valid object or an OptkitError — never another exception — and a
damaged manifest is never taken for a finished stage. Seeded, so a failure reproduces."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.spine.test_pipeline import CALLS, make_recipe, stages  # noqa: F401  (fixture)
from tests.test_fuzz_inputs import damage_bytes
from toolkit import pipeline
from toolkit.bundle import FORMAT, verify_bundle
from toolkit.config import Recipe, load_recipe
from toolkit.errors import OptkitError
from toolkit.tracking import NullTracker

REPO = Path(__file__).resolve().parents[2]
# one byte-level damage routine for every fuzz test (tests/test_fuzz_inputs.py holds it)
mutate = damage_bytes


def test_damaged_recipes_load_or_raise_optkit_error(tmp_path):
    rng = random.Random(12)
    source = (REPO / "recipes" / "quickstart.yaml").read_bytes()
    outcomes = {"ok": 0, "error": 0}
    for n in range(400):
        path = tmp_path / f"r{n}.yaml"
        path.write_bytes(mutate(source, rng))
        try:
            assert isinstance(load_recipe(path), Recipe)
            outcomes["ok"] += 1
        except OptkitError as exc:
            assert str(exc).strip(), path
            outcomes["error"] += 1
    assert outcomes["error"] > 100  # the damage was real


def _bundle(root: Path) -> Path:
    from toolkit.export.build import file_table

    root.mkdir()
    (root / "cache.json").write_text('{"threshold": 0.84}')
    (root / "route").mkdir()
    (root / "route" / "router.json").write_text("{}")
    (root / "manifest.json").write_text(json.dumps({"format": FORMAT, "models": [], "files": file_table(root)},
                                                   indent=2))
    return root


def test_damaged_bundle_manifests_verify_or_raise_optkit_error(tmp_path):
    rng = random.Random(5)
    root = _bundle(tmp_path / "b")
    source = (root / "manifest.json").read_bytes()
    refused = 0
    for _ in range(400):
        (root / "manifest.json").write_bytes(mutate(source, rng))
        try:
            problems = verify_bundle(root)
        except OptkitError:
            refused += 1
            continue
        assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
    assert refused > 100  # the damage was real
    (root / "manifest.json").write_bytes(source)
    assert verify_bundle(root) == []


def test_damaged_stage_manifests_are_never_taken_for_done(workdir, stages):
    rng = random.Random(7)
    r = make_recipe(workdir)
    pipeline.run_pipeline(r, tracker=NullTracker())
    path = workdir / "artifacts" / "run1" / "collect" / "manifest.json"
    good = path.read_bytes()
    original = json.loads(good)
    for _ in range(60):
        damaged = mutate(good, rng)
        path.write_bytes(damaged)
        CALLS.clear()
        try:
            outcomes = pipeline.run_pipeline(r, only="collect", tracker=NullTracker())
        except OptkitError:
            continue
        try:
            parsed = json.loads(damaged)
        except ValueError:
            parsed = None
        if outcomes[0].status == "skipped":  # only a manifest that still says what the good one said
            assert parsed["status"] == "done" and parsed["config_hash"] == original["config_hash"]
            assert sha256s(parsed) == sha256s(original)
        else:  # ran again: a fresh, complete manifest replaced the damaged one
            m = json.loads(path.read_text())
            assert m["status"] == "done" and sha256s(m) == sha256s(original)
        path.write_bytes(good)


def sha256s(manifest: dict) -> dict:
    return {rel: meta["sha256"] for rel, meta in manifest["outputs"].items()}


@pytest.mark.parametrize("bad", [[], "x", {"status": "done"}, {"status": "done", "config_hash": "h", "outputs": []},
                                 {"status": "done", "config_hash": "h", "outputs": {"a": 1}}, {"status": 3}])
def test_wrong_shaped_manifest_counts_as_not_done(workdir, stages, bad):
    r = make_recipe(workdir)
    pipeline.run_pipeline(r, tracker=NullTracker())
    (workdir / "artifacts/run1/collect/manifest.json").write_text(json.dumps(bad))
    with pytest.raises(OptkitError, match="needs the outputs of stage 'collect', which has not finished"):
        pipeline.run_pipeline(r, only="distill", tracker=NullTracker())
    # collect runs again and writes the same outputs, so distill, which consumed exactly those, stays done
    assert [o.status for o in pipeline.run_pipeline(r, tracker=NullTracker())] == ["ran", "skipped"]
