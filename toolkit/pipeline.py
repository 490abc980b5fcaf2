"""The one loop over stages.

A run directory holds the resolved recipe (written first) and one directory per stage. Each stage writes
`manifest.json`: status, config hash, upstream fingerprints, input files with sha256, outputs with sha256,
metrics and timings. A stage is done only when its manifest says `done`; a done stage whose config,
inputs and upstream outputs are unchanged is skipped on re-run. A stage that was interrupted resumes from
whatever it keeps under `<stage>/work/` (content-addressed results, checkpoints); that folder is not an output.

A stage is a module with `run(ctx: StageContext) -> dict | None` (the dict = headline metrics).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from toolkit import __version__
from toolkit.config import STAGE_ORDER, Recipe, config_hash
from toolkit.errors import OptkitError
from toolkit.io import atomic_write_json, atomic_write_text, sha256_file
from toolkit.tracking import NullTracker, Tracker, flatten

log = logging.getLogger("optkit.pipeline")

# stage name -> module with run(ctx). A plain dict: adding a stage is one line here and one module.
STAGES: dict[str, str] = {
    "collect": "toolkit.collect",
    "distill": "toolkit.distill",
    "quantize": "toolkit.quantize",
    "route": "toolkit.route",
    "cache": "toolkit.cache",
    "evaluate": "toolkit.evaluate",
    "export": "toolkit.export",
}

# Which earlier stages' outputs a stage reads (only those present in the recipe count).
UPSTREAM: dict[str, tuple[str, ...]] = {
    "collect": (),
    "distill": ("collect",),
    "quantize": ("distill", "collect"),
    "route": ("collect", "distill"),
    "cache": (),
    "evaluate": ("collect", "distill", "quantize", "route", "cache"),
    "export": ("collect", "distill", "quantize", "route", "cache", "evaluate"),
}

# Which top-level recipe sections, besides its own, change a stage's result.
GLOBALS: dict[str, tuple[str, ...]] = {
    "collect": ("teacher", "data", "seed"),
    "distill": ("teacher", "seed"),
    "quantize": ("seed",),
    "route": ("seed", "pricing"),
    "cache": ("seed", "data"),
    "evaluate": ("teacher", "seed", "pricing"),
    "export": ("teacher", "pricing"),
}

MANIFEST = "manifest.json"
WORK = "work"

assert set(STAGES) == set(STAGE_ORDER) == set(UPSTREAM) == set(GLOBALS)


def stage_config_hash(recipe: Recipe, stage: str) -> str:
    public = recipe.public_dict()
    return config_hash({"stage": public[stage], **{k: public[k] for k in GLOBALS[stage]},
                        "optkit": __version__})


def read_manifest(stage_dir: Path) -> Optional[dict]:
    import json

    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a torn manifest means "not done"; the stage runs again


def hash_outputs(stage_dir: Path) -> dict[str, dict]:
    """sha256 and size of every file a stage produced (not its manifest, work/ or hidden temp files)."""
    outputs = {}
    for path in sorted(Path(stage_dir).rglob("*")):
        rel = path.relative_to(stage_dir)
        if not path.is_file() or rel.parts[0] in (MANIFEST, WORK) or any(p.startswith(".") for p in rel.parts):
            continue
        outputs[rel.as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return outputs


def fingerprint(manifest: dict) -> str:
    return config_hash({"config": manifest["config_hash"], "outputs": manifest["outputs"]})


@dataclass
class StageContext:
    """What a stage gets: its config, its directory, upstream outputs, and somewhere to log."""

    name: str
    recipe: Recipe
    run_dir: Path
    dir: Path
    tracker: Tracker
    metrics: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form facts for the manifest

    @property
    def config(self) -> Any:
        return getattr(self.recipe, self.name)

    @property
    def work_dir(self) -> Path:
        """Resumable state (result stores, checkpoints). Kept across interrupted runs; not an output."""
        path = self.dir / WORK
        path.mkdir(parents=True, exist_ok=True)
        return path

    def upstream(self, stage: str) -> Path:
        """Directory of a finished earlier stage; an error if that stage has not finished."""
        path = self.run_dir / stage
        manifest = read_manifest(path)
        if not manifest or manifest.get("status") != "done":
            raise OptkitError(f"stage '{self.name}' needs the outputs of stage '{stage}', which has not finished "
                              f"in {self.run_dir}; run it first (optkit run RECIPE --only {stage})")
        return path

    def has_upstream(self, stage: str) -> bool:
        manifest = read_manifest(self.run_dir / stage)
        return bool(manifest and manifest.get("status") == "done")

    def add_input(self, path: Path) -> Path:
        """Record a user-supplied input file; a changed file makes the stage run again."""
        path = Path(path)
        if not path.exists():
            raise OptkitError(f"{self.name}: input file not found: {path}")
        self.inputs[str(path.resolve())] = sha256_file(path) if path.is_file() else "dir"
        return path

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        """Headline metrics (no step) go to the manifest too; stepped ones (curves) only to MLflow."""
        if step is None:
            self.metrics.update(metrics)
        self.tracker.log_metrics(metrics, step=step)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.tracker.log_artifact(path, artifact_path)

    @contextlib.contextmanager
    def progress(self, description: str, total: Optional[int]) -> Iterator[Callable[[int], None]]:
        """A rich progress bar; yields advance(n)."""
        from toolkit.ui import progress_bar

        with progress_bar(f"{self.name}: {description}", total) as advance:
            yield advance


@dataclass
class StageOutcome:
    stage: str
    status: str  # ran | skipped | failed | interrupted
    seconds: float
    metrics: dict[str, Any]
    reason: str = ""


def _is_fresh(run_dir: Path, stage: str, expected_hash: str, upstream_fps: dict[str, str]) -> tuple[bool, str]:
    manifest = read_manifest(run_dir / stage)
    if manifest is None:
        return False, "not run yet"
    if manifest.get("status") != "done":
        return False, f"previous attempt {manifest.get('status')}"
    if manifest.get("config_hash") != expected_hash:
        return False, "config changed"
    if manifest.get("upstream", {}) != upstream_fps:
        return False, "upstream outputs changed"
    for path, digest in manifest.get("inputs", {}).items():
        p = Path(path)
        if not p.exists() or (digest != "dir" and sha256_file(p) != digest):
            return False, f"input changed: {path}"
    for rel, meta in manifest.get("outputs", {}).items():
        p = run_dir / stage / rel
        if not p.is_file() or p.stat().st_size != meta["bytes"]:
            return False, f"output missing or changed: {rel}"
    return True, "unchanged"


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OptkitError(f"another optkit run is using {run_dir}") from None
        yield


def select_stages(recipe: Recipe, only: Optional[str], from_stage: Optional[str]) -> tuple[list[str], set[str]]:
    """(stages to consider, stages forced to re-run)."""
    present = recipe.stages()
    if not present:
        raise OptkitError("the recipe has no stage sections (collect, distill, ...): nothing to run")
    for flag, value in (("--only", only), ("--from", from_stage)):
        if value is not None and value not in present:
            raise OptkitError(f"{flag} {value}: not a stage of this recipe (stages: {', '.join(present)})")
    if only:
        return [only], set()
    if from_stage:
        return present, set(present[present.index(from_stage):])
    return present, set()


def run_dir_for(recipe: Recipe) -> Path:
    return Path(recipe.artifacts_dir) / recipe.name


def run_pipeline(recipe: Recipe, only: Optional[str] = None, from_stage: Optional[str] = None,
                 force: bool = False, tracker: Optional[Tracker] = None) -> list[StageOutcome]:
    """Run the recipe's stages in order; returns what happened to each."""
    import yaml

    stages, forced = select_stages(recipe, only, from_stage)
    if force:
        forced = set(stages)
    run_dir = run_dir_for(recipe)
    outcomes: list[StageOutcome] = []
    with _run_lock(run_dir):
        atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.public_dict(), sort_keys=False))
        if tracker is None:
            from toolkit.tracking import make_tracker

            t = recipe.tracking
            tracker = make_tracker(t.enabled, t.uri, t.experiment, Path(recipe.artifacts_dir))
        with tracker.run(recipe.name, tags={"optkit.version": __version__, "optkit.run_dir": str(run_dir)}):
            tracker.log_params(flatten(recipe.public_dict()))
            tracker.log_artifact(run_dir / "recipe.yaml")
            for stage in stages:
                outcome = _run_stage(recipe, stage, run_dir, tracker, force=stage in forced)
                outcomes.append(outcome)
                # Stage metrics also on the parent run, prefixed, so runs compare in one MLflow table.
                tracker.log_metrics({f"{stage}.{k}": v for k, v in outcome.metrics.items()})
    return outcomes


def _run_stage(recipe: Recipe, stage: str, run_dir: Path, tracker: Tracker, force: bool) -> StageOutcome:
    stage_dir = run_dir / stage
    expected = stage_config_hash(recipe, stage)
    upstream_fps = {}
    for up in UPSTREAM[stage]:
        if getattr(recipe, up) is None:
            continue
        m = read_manifest(run_dir / up)
        if not m or m.get("status") != "done":
            # Checked before the stage starts, so a stage that cannot run leaves no manifest behind.
            raise OptkitError(f"stage '{stage}' needs the outputs of stage '{up}', which has not finished in "
                              f"{run_dir}; run it first (optkit run RECIPE --only {up})")
        upstream_fps[up] = fingerprint(m)
    if not force:
        fresh, reason = _is_fresh(run_dir, stage, expected, upstream_fps)
        if fresh:
            old = read_manifest(stage_dir) or {}
            log.info("%s: skipped (%s)", stage, reason)
            return StageOutcome(stage, "skipped", 0.0, old.get("metrics", {}), reason)

    module = importlib.import_module(STAGES[stage])
    stage_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    manifest: dict[str, Any] = {
        "stage": stage, "status": "running", "config_hash": expected, "upstream": upstream_fps,
        "inputs": {}, "outputs": {}, "metrics": {}, "started_at": started, "optkit": __version__,
        "pid": os.getpid(),
    }
    atomic_write_json(stage_dir / MANIFEST, manifest)
    ctx = StageContext(stage, recipe, run_dir, stage_dir, tracker)
    log.info("%s: running", stage)
    with tracker.run(stage, tags={"optkit.stage": stage}):
        try:
            result = module.run(ctx) or {}
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            manifest.update(status=status, error=f"{type(exc).__name__}: {exc}"[:2000],
                            finished_at=time.time(), inputs=ctx.inputs, metrics=ctx.metrics)
            atomic_write_json(stage_dir / MANIFEST, manifest)
            raise
        ctx.metrics.update({k: v for k, v in result.items() if k not in ctx.metrics})
        finished = time.time()
        manifest.update(status="done", inputs=ctx.inputs, outputs=hash_outputs(stage_dir), metrics=ctx.metrics,
                        finished_at=finished, seconds=round(finished - started, 3), **ctx.extra)
        manifest["fingerprint"] = fingerprint(manifest)
        tracker.log_metrics({"stage_seconds": finished - started,
                             **{k: v for k, v in ctx.metrics.items() if isinstance(v, (int, float))}})
        atomic_write_json(stage_dir / MANIFEST, manifest)
        tracker.log_artifact(stage_dir / MANIFEST)
    return StageOutcome(stage, "ran", finished - started, ctx.metrics)
