"""The serving-side view of an exported bundle: read its manifest, check files against their sha256, and load
the router and the semantic cache from it.

Runtime only: this module imports the standard library at top level; `Bundle.router()` / `Bundle.cache()`
import `toolkit.route` / `toolkit.cache` (numpy + the embedder) when called. No torch, transformers,
peft, sklearn or mlflow, so a serving process needs none of optkit's training dependencies.

Every file a loader reads is checked against the manifest first, and a mismatch is refused with
`BundleIntegrityError`. The check protects against corruption and edits after export; it does not stop someone
who rewrites the manifest too: compare `manifest_sha256()` with the digest printed at export (and stored in
the export stage's manifest / MLflow) when that matters.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Optional

from toolkit.errors import OptkitError
from toolkit.io import sha256_file  # stdlib-only module: the bundle loader stays runtime-light

MANIFEST = "manifest.json"
FORMAT = "optkit-bundle/1"
# Files inside a bundle that the manifest does not list on purpose (editor/OS litter is still reported).
UNLISTED = (MANIFEST,)


class BundleIntegrityError(OptkitError):
    """A bundle file is missing, changed, or not listed in the manifest."""


def list_files(root: Path) -> list[str]:
    """Every regular file under root, as sorted posix paths relative to root (symlinks count as files)."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def list_dirs(root: Path) -> list[str]:
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir())


def _entry_problem(rel: Any, meta: Any) -> Optional[str]:
    """Why a manifest `files` entry is malformed or points outside the bundle (None = well-formed)."""
    if not isinstance(rel, str) or not rel:
        return f"{rel!r}: not a file path"
    parts = PurePosixPath(rel).parts
    if rel.startswith(("/", "\\")) or PureWindowsPath(rel).drive or ".." in parts or "\\" in rel:
        return f"{rel}: path leaves the bundle (absolute, drive or '..'); manifest entries must be relative"
    if not isinstance(meta, dict):
        return f"{rel}: entry is {type(meta).__name__}, want an object with bytes and sha256"
    missing = [k for k in ("bytes", "sha256") if k not in meta]
    if missing:
        return f"{rel}: entry has no {' or '.join(missing)}"
    unknown = sorted(set(meta) - {"bytes", "sha256"})
    if unknown:  # e.g. a misspelled 'sha256x' next to a stale 'sha256': a hand-edited entry, not ours
        return f"{rel}: unknown key(s) {', '.join(map(repr, unknown))} in the entry; want only bytes and sha256"
    if not isinstance(meta["bytes"], int) or isinstance(meta["bytes"], bool) or meta["bytes"] < 0:
        return f"{rel}: bytes must be a non-negative integer, got {meta['bytes']!r}"
    if not isinstance(meta["sha256"], str) or len(meta["sha256"]) != 64:
        return f"{rel}: sha256 must be 64 hex digits"
    return None


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise OptkitError(f"{root}: not an optkit bundle (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleIntegrityError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise OptkitError(f"{path}: not an optkit bundle manifest (format {got!r}, want {FORMAT})")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleIntegrityError(f"{path}: bundle format {FORMAT} wants 'files' to be an object mapping each "
                                   f"relative path to {{bytes, sha256}}, got {type(files).__name__}")
    for rel, meta in files.items():
        problem = _entry_problem(rel, meta)
        if problem:
            raise BundleIntegrityError(f"{path}: files: {problem}")
    return manifest


class Bundle:
    """An export bundle on disk. `Bundle.open(dir)`, then `.router()`, `.cache()`, `.model_path(name)`."""

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self.files: dict[str, dict] = manifest["files"]
        self._checked: set[str] = set()

    @classmethod
    def open(cls, root: str | Path, verify: bool = False) -> "Bundle":
        """Read the manifest; with verify=True check every file now (else each file is checked on first use)."""
        root = Path(root)
        bundle = cls(root, _read_manifest(root))
        if verify:
            problems = bundle.verify()
            if problems:
                raise BundleIntegrityError(f"{root}: {len(problems)} problem(s): " + "; ".join(problems[:5]))
        return bundle

    def manifest_sha256(self) -> str:
        return sha256_file(self.root / MANIFEST)

    # ------------------------------------------------------------------ checking

    def verify(self) -> list[str]:
        """Every problem found: listed files missing, changed or reached through a link that leaves the bundle;
        files and directories present but not listed. [] = intact."""
        problems = [p for rel in self.files for p in self._check(rel)]
        listed = set(self.files) | set(UNLISTED)
        problems += [f"{rel}: not listed in the manifest" for rel in list_files(self.root) if rel not in listed]
        parents = {str(PurePosixPath(rel).parent) for rel in self.files}
        parents |= {str(p) for rel in self.files for p in PurePosixPath(rel).parents}
        problems += [f"{rel}/: directory not listed in the manifest (holds no listed file)"
                     for rel in list_dirs(self.root) if rel not in parents]
        return problems

    def _check(self, rel: str) -> list[str]:
        meta = self.files[rel]
        path = self.root / rel
        if not path.resolve().is_relative_to(self.root.resolve()):
            return [f"{rel}: resolves outside the bundle (a symlink that escapes)"]
        if not path.is_file():
            return [f"{rel}: missing"]
        if path.stat().st_size != meta["bytes"]:
            return [f"{rel}: size {path.stat().st_size} != {meta['bytes']} in the manifest"]
        if sha256_file(path) != meta["sha256"]:
            return [f"{rel}: sha256 does not match the manifest"]
        return []

    def checked(self, rels: Iterable[str]) -> None:
        """Check these files (once per process); raise BundleIntegrityError on the first problem."""
        for rel in rels:
            if rel in self._checked:
                continue
            if rel not in self.files:
                raise BundleIntegrityError(f"{self.root}: {rel} is not listed in the bundle manifest")
            problems = self._check(rel)
            if problems:
                raise BundleIntegrityError(f"{self.root}: refusing to load {problems[0]}")
            self._checked.add(rel)

    def under(self, prefix: str) -> list[str]:
        """Manifest entries at or below a bundle-relative path."""
        prefix = prefix.rstrip("/")
        return [rel for rel in self.files if rel == prefix or rel.startswith(prefix + "/")]

    def path(self, rel: str) -> Path:
        """A checked path: every listed file at or under `rel` matches the manifest."""
        rels = self.under(rel)
        if not rels:
            raise BundleIntegrityError(f"{self.root}: {rel} is not in the bundle manifest")
        self.checked(rels)
        return self.root / rel

    # ------------------------------------------------------------------ parts

    @property
    def models(self) -> list[dict]:
        return list(self.manifest.get("models", []))

    def model_path(self, name: str) -> Path:
        """Checked directory (or GGUF file) of a bundled model, e.g. to hand to vLLM or llama.cpp."""
        for m in self.models:
            if m["name"] == name:
                return self.path(m["path"])
        raise OptkitError(f"bundle has no model '{name}' (has: {', '.join(m['name'] for m in self.models)})")

    def router(self, embedder: Any = None):
        """The bundled Router (files checked first)."""
        rel = self.manifest.get("router")
        if not rel:
            raise OptkitError(f"{self.root}: the bundle has no router")
        from toolkit.route import Router

        return Router.load(self.path(rel), embedder=embedder)

    def cache(self, embedder: Any = None, **overrides):
        """The bundled SemanticCache (empty, configured by the tuned cache.json; file checked first)."""
        rel = self.manifest.get("cache")
        if not rel:
            raise OptkitError(f"{self.root}: the bundle has no cache config")
        from toolkit.cache import SemanticCache

        path = self.path(rel)
        static = (path.parent / "cache-embedder").relative_to(self.root).as_posix()
        if self.under(static):  # cache.embedding = static: the vectors the threshold was tuned on, checked too
            self.path(static)
        return SemanticCache.load(path, embedder=embedder, **overrides)


def verify_bundle(root: str | Path, expect_manifest_sha256: Optional[str] = None) -> list[str]:
    """Problems with a bundle on disk ([] = intact), for `optkit verify`."""
    bundle = Bundle.open(root)
    problems = bundle.verify()
    if expect_manifest_sha256 and bundle.manifest_sha256() != expect_manifest_sha256.lower():
        problems.insert(0, f"{MANIFEST}: sha256 {bundle.manifest_sha256()} != expected {expect_manifest_sha256}")
    return problems
