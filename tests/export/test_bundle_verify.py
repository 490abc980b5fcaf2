"""`optkit verify` on hand-made bundles (issue 12 items 3, 5, 9, 10): paths that leave the bundle, malformed entries,
unlisted files and directories, a wrong `files` type; and the modes a real export gives its files under a
restrictive umask. Fast: no model involved."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest

from toolkit.bundle import FORMAT, Bundle, BundleIntegrityError, verify_bundle
from toolkit.errors import OptkitError
from toolkit.export.build import file_table


def make_bundle(root: Path) -> Path:
    root.mkdir()
    (root / "route").mkdir()
    (root / "route" / "router.json").write_text('{"threshold": 0.5}')
    (root / "cache.json").write_text('{"threshold": 0.84}')
    write_manifest(root, file_table(root))
    return root


def write_manifest(root: Path, files) -> None:
    (root / "manifest.json").write_text(json.dumps({"format": FORMAT, "models": [], "files": files}))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "toolkit.cli", *args], capture_output=True, text=True)


def test_intact_bundle_verifies(tmp_path):
    b = make_bundle(tmp_path / "b")
    assert verify_bundle(b) == []
    p = cli("verify", str(b))
    assert p.returncode == 0 and "ok" in p.stdout


@pytest.mark.parametrize("rel", ["../outside.txt", "/etc/hostname", "route/../../outside.txt", "C:/x.txt"])
def test_manifest_paths_must_stay_inside(tmp_path, rel):
    b = make_bundle(tmp_path / "b")
    (tmp_path / "outside.txt").write_text("secret")
    m = json.loads((b / "manifest.json").read_text())
    target = Path("/etc/hostname") if rel.startswith("/") else tmp_path / "outside.txt"
    meta = {"bytes": target.stat().st_size if target.exists() else 1, "sha256": "0" * 64}
    write_manifest(b, {**m["files"], rel: meta})
    with pytest.raises(BundleIntegrityError, match="leaves the bundle"):
        verify_bundle(b)
    p = cli("verify", str(b))
    assert p.returncode == 1 and "leaves the bundle" in p.stderr and "Traceback" not in p.stderr  # a failed check


def test_symlink_that_escapes_is_refused(tmp_path):
    b = make_bundle(tmp_path / "b")
    (tmp_path / "outside.json").write_text('{"threshold": 0.14}')
    (b / "cache.json").unlink()
    (b / "cache.json").symlink_to(tmp_path / "outside.json")
    (b / "manifest.json").unlink()
    write_manifest(b, file_table(b))  # a manifest that matches the linked content
    problems = verify_bundle(b)
    assert problems == ["cache.json: resolves outside the bundle (a symlink that escapes)"]
    with pytest.raises(BundleIntegrityError, match="outside the bundle"):
        Bundle.open(b).path("cache.json")


@pytest.mark.parametrize("entry,msg", [
    ({"sha256": "0" * 64}, "entry has no bytes"),
    ({"bytes": 3}, "entry has no sha256"),
    ({"bytes": "3", "sha256": "0" * 64}, "bytes must be a non-negative integer"),
    ([3, "abc"], "entry is list"),
    ({"bytes": 3, "sha256": "0" * 64, "sha256x": "1" * 64}, "unknown key"),
])
def test_malformed_entry_is_one_line_not_a_traceback(tmp_path, entry, msg):
    b = make_bundle(tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    write_manifest(b, {**m["files"], "cache.json": entry})
    with pytest.raises(BundleIntegrityError, match=msg):
        verify_bundle(b)
    p = cli("verify", str(b))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: ") and "cache.json" in p.stderr and len(p.stderr.splitlines()) == 1


def test_files_as_a_list_gets_a_bundle_format_message(tmp_path):
    b = make_bundle(tmp_path / "b")
    write_manifest(b, ["cache.json", "route/router.json"])
    p = cli("verify", str(b))
    assert p.returncode == 1 and "wants 'files' to be an object" in p.stderr and "got list" in p.stderr


def test_unlisted_files_and_directories_are_reported(tmp_path):
    b = make_bundle(tmp_path / "b")
    (b / "extra.txt").write_text("x")
    (b / "empty").mkdir()
    (b / "route" / "nested").mkdir()
    problems = verify_bundle(b)
    assert "extra.txt: not listed in the manifest" in problems
    assert "empty/: directory not listed in the manifest (holds no listed file)" in problems
    assert "route/nested/: directory not listed in the manifest (holds no listed file)" in problems
    assert not any(p.startswith("route/:") for p in problems)
    assert cli("verify", str(b)).returncode == 1


def test_same_size_edit_is_caught(tmp_path):
    b = make_bundle(tmp_path / "b")
    (b / "cache.json").write_text('{"threshold": 0.14}')
    assert verify_bundle(b) == ["cache.json: sha256 does not match the manifest"]


# ------------------------------------------------------------------------------------ modes of a real export


def _fake_route(ctx):
    from tests.route.conftest import write_small_router

    write_small_router(ctx.dir)  # a real router: export reads (and validates) it for serve.yaml's backends
    for name in ("router.json", "router.safetensors"):
        (ctx.dir / name).chmod(0o600)  # what a training job under umask 077 leaves
    return {}


def _fake_cache(ctx):
    (ctx.dir / "cache.json").write_text('{"threshold": 0.84}')
    (ctx.dir / "cache.json").chmod(0o600)
    return {}


@pytest.fixture
def umask_077():
    old = os.umask(0o077)
    yield
    os.umask(old)


def test_export_bundle_is_0755_0644_whatever_the_umask(workdir, monkeypatch, umask_077):
    """Issue 12.5: bundle dirs came out 0700 and weights 0600; a serving process of another user could not read."""
    from toolkit import pipeline
    from toolkit.config import recipe_from_dict
    from toolkit.tracking import NullTracker

    for stage, fn in (("route", _fake_route), ("cache", _fake_cache)):
        mod = types.ModuleType(f"optkit_test_{stage}")
        mod.run, mod.READS = fn, ()
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
        monkeypatch.setitem(pipeline.STAGES, stage, mod.__name__)
    (workdir / "d.jsonl").write_text('{"prompt": "p"}\n')
    r = recipe_from_dict({"name": "perm", "teacher": {"model": "x/y"}, "data": {"path": "d.jsonl"},
                          "route": {"labels": {"source": "file", "path": "d.jsonl",
                                               "score_columns": {"a": "a", "b": "b"}}},
                          "cache": {}, "export": {"include": ["route", "cache"]}})
    outcomes = pipeline.run_pipeline(r, tracker=NullTracker())
    assert [o.status for o in outcomes] == ["ran", "ran", "ran"]
    bundle = workdir / "artifacts" / "perm" / "export" / "bundle"
    modes = {p.relative_to(bundle).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [bundle, *bundle.rglob("*")]}
    assert modes.pop(".") == 0o755 and modes.pop("serve.sh") == 0o755
    dirs = {rel for rel in modes if (bundle / rel).is_dir()}
    assert "route" in dirs and {modes.pop(d) for d in dirs} == {0o755}
    assert modes and set(modes.values()) == {0o644}, modes
    assert verify_bundle(bundle) == []


def test_cache_refuses_tampered_static_embedder_vectors(tmp_path):
    """A static-embedder cache ships the vectors its threshold was tuned on: Bundle.cache() checks them too."""
    from toolkit.bundle import Bundle

    b = tmp_path / "b"
    b.mkdir()
    (b / "cache.json").write_text('{"threshold": 0.84}')
    (b / "cache-embedder").mkdir()
    (b / "cache-embedder" / "vectors.safetensors").write_bytes(b"tuned vectors")
    m = {"format": FORMAT, "models": [], "cache": "cache.json", "files": file_table(b)}
    (b / "manifest.json").write_text(json.dumps(m))
    (b / "cache-embedder" / "vectors.safetensors").write_bytes(b"other vectors")
    with pytest.raises(BundleIntegrityError, match="cache-embedder/vectors.safetensors"):
        Bundle.open(b).cache()


def test_a_manifest_that_is_not_json_fails_the_check(tmp_path):
    b = make_bundle(tmp_path / "b")
    (b / "manifest.json").write_text('{"format": ')
    p = cli("verify", str(b))
    assert p.returncode == 1 and p.stderr.startswith("error: ") and "not valid JSON" in p.stderr
