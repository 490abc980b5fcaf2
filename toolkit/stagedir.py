"""A stage directory on disk: its manifest, the content check of its outputs, and recovery after a crash.

Kept apart from the stage loop (pipeline.py) because `optkit run`, the evaluate fixtures and the tests all read
manifests the same way. Standard library only.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

from toolkit.io import atomic_write_json, is_temporary, sha256_file
from toolkit.redact import redact_data

log = logging.getLogger("optkit.pipeline")

MANIFEST = "manifest.json"
WORK = "work"


def read_manifest(stage_dir: Path) -> Optional[dict]:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a torn manifest means "not done"; the stage runs again
    return data if _well_formed(data) else None


def _well_formed(m) -> bool:
    """A manifest the loop can trust the shape of; anything else (hand-edited, damaged) counts as not done."""
    if not isinstance(m, dict) or not isinstance(m.get("status"), str):
        return False
    if m["status"] != "done":
        return True
    tables = (m.get("outputs"), m.get("inputs", {}), m.get("upstream", {}), m.get("metrics", {}))
    return (isinstance(m.get("config_hash"), str) and all(isinstance(t, dict) for t in tables)
            and all(isinstance(v, dict) for v in m["outputs"].values()))


def write_manifest(stage_dir: Path, manifest: dict) -> None:
    """Strict JSON, every URL redacted (stages put free-form facts in it)."""
    atomic_write_json(Path(stage_dir) / MANIFEST, redact_data(manifest))


def is_done(manifest: Optional[dict]) -> bool:
    return bool(manifest and manifest.get("status") == "done")


def hash_outputs(stage_dir: Path) -> dict[str, dict]:
    """sha256, size and mtime of every file a stage produced (not its manifest, work/ or hidden temp files)."""
    outputs = {}
    for path in sorted(Path(stage_dir).rglob("*")):
        rel = path.relative_to(stage_dir)
        if not path.is_file() or rel.parts[0] in (MANIFEST, WORK) or any(p.startswith(".") for p in rel.parts):
            continue
        st = path.stat()
        outputs[rel.as_posix()] = {"sha256": sha256_file(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return outputs


def changed_output(stage_dir: Path, outputs: dict, verify: bool = False) -> Optional[str]:
    """The first output that no longer matches the manifest, as a reason; None when all match.

    Size and mtime equal to the manifest's are trusted (a stat per file); anything else, or every file when
    `verify`, is hashed. An edit that keeps size and restores the mtime needs `verify` to be seen.
    """
    if not isinstance(outputs, dict):
        return "manifest has no output table"
    for rel, meta in outputs.items():
        path = Path(stage_dir) / rel
        if not path.is_file():
            return f"output missing: {rel}"
        st = path.stat()
        if not isinstance(meta, dict) or st.st_size != meta.get("bytes"):
            return f"output changed: {rel}"
        if not verify and meta.get("mtime_ns") == st.st_mtime_ns:
            continue
        if sha256_file(path) != meta.get("sha256"):
            return f"output changed: {rel}"
    return None


def fingerprint(manifest: dict) -> str:
    """What downstream stages remember of this one: its config and the content of its outputs (not mtimes)."""
    from toolkit.config import config_hash

    outputs = {rel: {"sha256": m.get("sha256"), "bytes": m.get("bytes")} for rel, m in manifest["outputs"].items()}
    return config_hash({"config": manifest["config_hash"], "outputs": outputs})


def recover(stage_dir: Path) -> None:
    """Clean up after a run that died in this stage (kill -9, power loss, disk full).

    Called with the run lock held, so nothing else is writing here: a manifest still saying `running` belongs to a
    dead process and becomes `failed`; half-written temporaries (`.name.tmp-*`, `.name.old-*`) are removed. Work
    under `work/` that was completed (checkpoints, result stores) is kept, so the next attempt resumes.
    """
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return
    stale = [p for p in stage_dir.rglob(".*") if is_temporary(p.name)]
    removed = 0
    for path in sorted(stale, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    if removed:
        log.warning("%s: removed %d half-written temporary file(s) left by an interrupted run", stage_dir.name,
                    removed)
    manifest = read_manifest(stage_dir)
    if manifest and manifest.get("status") == "running":
        manifest.update(status="failed", finished_at=time.time(),
                        error=f"interrupted: process {manifest.get('pid')} ended while the stage was running "
                              "(killed, crashed or out of disk); finished work under work/ is kept")
        write_manifest(stage_dir, manifest)
        log.warning("%s: the previous attempt (pid %s) died while running; marked failed, resuming",
                    stage_dir.name, manifest.get("pid"))


def disk_full(exc: BaseException) -> Optional[OSError]:
    """The ENOSPC / EDQUOT error behind an exception (libraries often wrap it), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
